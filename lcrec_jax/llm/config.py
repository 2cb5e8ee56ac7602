"""LLaMA-family model configuration: `LlamaConfig`, presets, HF config.json mapping.

The config is a frozen (hashable) dataclass so it can be a static attribute of a Flax
module and a static argument of `jax.jit`. Dtypes are stored as strings ("float32",
"bfloat16", ...); `compute_dtype` / `weight_dtype` give the jnp dtypes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from lcrec_jax.llm.names import DTYPE_NAMES, REMAT_POLICIES

# Dtype names a config may give (model dtypes, `train.compute_dtype`) -> jnp dtypes.
DTYPES = {**{name: getattr(jnp, name) for name in DTYPE_NAMES}, "float64": jnp.float64}
ROPE_TYPES = ("default", "linear", "llama3")


def _dtype_name(value: Any, field: str) -> str:
  """Normalises a dtype given as a string or a numpy/jnp dtype to its name."""
  try:
    name = jnp.dtype(value).name
  except TypeError as e:
    raise ValueError(f"LlamaConfig.{field}: unknown dtype {value!r}") from e
  if name not in DTYPES:
    raise ValueError(f"LlamaConfig.{field}: dtype {name!r} not one of {tuple(DTYPES)}")
  return name


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary-embedding frequency scaling (HF `rope_parameters` / `rope_scaling`).

  Attributes:
    rope_type: "linear" (positions divided by `factor`) or "llama3" (LLaMA 3.1
      wavelength-dependent scaling).
    factor: scaling factor.
    low_freq_factor: llama3 only.
    high_freq_factor: llama3 only.
    original_max_position_embeddings: llama3 only, the pre-training context length.
  """
  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("linear", "llama3"):
      raise ValueError(
          f"LlamaConfig.rope_scaling.rope_type {self.rope_type!r} is not supported "
          "(supported: None, 'linear', 'llama3')")
    if self.factor <= 0:
      raise ValueError(f"LlamaConfig.rope_scaling.factor must be > 0, got {self.factor}")
    if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      raise ValueError("LlamaConfig.rope_scaling: high_freq_factor must exceed "
                       "low_freq_factor for llama3 scaling")

  def to_hf_dict(self) -> dict[str, Any]:
    """HF-style dict (without rope_theta)."""
    if self.rope_type == "linear":
      return {"rope_type": "linear", "factor": float(self.factor)}
    return {
        "rope_type": "llama3",
        "factor": float(self.factor),
        "low_freq_factor": float(self.low_freq_factor),
        "high_freq_factor": float(self.high_freq_factor),
        "original_max_position_embeddings": int(self.original_max_position_embeddings),
    }


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and numerics of a LLaMA-family decoder.

  Attributes:
    vocab_size: rows of the embedding and output head.
    hidden_size: model width E.
    intermediate_size: SwiGLU width F.
    num_hidden_layers: decoder layers L.
    num_attention_heads: query heads H.
    num_key_value_heads: key/value heads (GQA); must divide H.
    head_dim: per-head width D (default E // H).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base.
    rope_scaling: optional `RopeScaling`.
    tie_word_embeddings: output head shares the embedding matrix.
    max_position_embeddings: context length recorded in config.json.
    bos_token_id, eos_token_id, pad_token_id: special ids (eos may be a tuple).
    initializer_range: std of the normal init of random weights.
    dtype: compute dtype ("float32" on CPU, "bfloat16" on TPU).
    param_dtype: parameter storage dtype.
    scan_layers: stack layers with `nn.scan` (params get a leading "layers" axis).
    remat_policy: "none" | "full" | "dots" | "dots_no_batch" (jax.checkpoint policy
      of each layer).
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  initializer_range: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(
            f"LlamaConfig: hidden_size {self.hidden_size} is not divisible by "
            f"num_attention_heads {self.num_attention_heads}; set head_dim")
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim"):
      if int(getattr(self, k)) <= 0:
        raise ValueError(f"LlamaConfig.{k} must be positive, got {getattr(self, k)}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"LlamaConfig: num_attention_heads {self.num_attention_heads} is not a multiple "
          f"of num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if isinstance(self.rope_scaling, Mapping):
      set_("rope_scaling", _rope_scaling_from_dict(dict(self.rope_scaling)))
    if isinstance(self.eos_token_id, list):
      set_("eos_token_id", tuple(self.eos_token_id))
    set_("dtype", _dtype_name(self.dtype, "dtype"))
    set_("param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"LlamaConfig.remat_policy {self.remat_policy!r} not one of {REMAT_POLICIES}")

  # --- derived ---------------------------------------------------------------------
  @property
  def compute_dtype(self) -> jnp.dtype:
    """jnp dtype of activations."""
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    """jnp dtype of parameters."""
    return jnp.dtype(self.param_dtype)

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_attention_heads // self.num_key_value_heads

  def replace(self, **kw) -> "LlamaConfig":
    """Returns a copy with fields replaced (validated again)."""
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count (for logs and benchmarks)."""
    e, f, h, kv, d = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                      self.num_key_value_heads, self.head_dim)
    layer = e * h * d * 2 + e * kv * d * 2 + 3 * e * f + 2 * e
    head = 0 if self.tie_word_embeddings else e * self.vocab_size
    return self.vocab_size * e + self.num_hidden_layers * layer + e + head

  # --- HF config.json ----------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], **overrides) -> "LlamaConfig":
    """Builds a config from an HF `config.json` dict (transformers 4.x or 5.x style).

    Args:
      d: the parsed config.json.
      **overrides: fields to set afterwards (e.g. dtype, scan_layers).

    Raises:
      ValueError: for a non-llama `model_type`, biases, a non-SiLU activation or an
        unsupported rope scaling type; the message names the config.json field.
    """
    d = dict(d)
    mt = d.get("model_type", "llama")
    if mt != "llama":
      raise ValueError(f"config.json: model_type {mt!r} is not supported (only 'llama')")
    archs = d.get("architectures") or ["LlamaForCausalLM"]
    if not any(a in ("LlamaForCausalLM", "LlamaModel") for a in archs):
      raise ValueError(f"config.json: architectures {archs} not supported "
                       "(only LlamaForCausalLM)")
    act = d.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"config.json: hidden_act {act!r} not supported (only 'silu')")
    for k in ("attention_bias", "mlp_bias"):
      if d.get(k, False):
        raise ValueError(f"config.json: {k}=true is not supported")
    rope_theta = d.get("rope_theta")
    rope = d.get("rope_scaling")
    params = d.get("rope_parameters")
    if isinstance(params, Mapping):
      if rope_theta is None:
        rope_theta = params.get("rope_theta")
      if rope is None and params.get("rope_type", params.get("type", "default")) != "default":
        rope = params
    if isinstance(rope, Mapping):
      if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    kw = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads"),
        head_dim=d.get("head_dim"),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=_rope_scaling_from_dict(dict(rope)) if rope else None,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        initializer_range=d.get("initializer_range", 0.02),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    """HF `config.json` dict for `LlamaForCausalLM` (readable by transformers 4.x and 5.x).

    Writes both the 5.x `rope_parameters` and the 4.x `rope_theta`/`rope_scaling` keys.
    """
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    rope_params = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
    rope_scaling = None
    if self.rope_scaling is not None:
      rope_scaling = self.rope_scaling.to_hf_dict()
      rope_params = dict(rope_scaling, rope_theta=float(self.rope_theta))
    torch_dtype = self.param_dtype
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(self.vocab_size),
        "hidden_size": int(self.hidden_size),
        "intermediate_size": int(self.intermediate_size),
        "num_hidden_layers": int(self.num_hidden_layers),
        "num_attention_heads": int(self.num_attention_heads),
        "num_key_value_heads": int(self.num_key_value_heads),
        "head_dim": int(self.head_dim),
        "hidden_act": "silu",
        "rms_norm_eps": float(self.rms_norm_eps),
        "rope_theta": float(self.rope_theta),
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_params,
        "tie_word_embeddings": bool(self.tie_word_embeddings),
        "max_position_embeddings": int(self.max_position_embeddings),
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": self.pad_token_id,
        "initializer_range": float(self.initializer_range),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def _rope_scaling_from_dict(d: dict[str, Any]) -> RopeScaling | None:
  """Parses an HF rope_scaling / rope_parameters dict."""
  typ = d.get("rope_type", d.get("type", "default"))
  if typ == "default":
    return None
  if typ == "linear":
    return RopeScaling(rope_type="linear", factor=float(d["factor"]))
  if typ == "llama3":
    try:
      return RopeScaling(
          rope_type="llama3",
          factor=float(d["factor"]),
          low_freq_factor=float(d["low_freq_factor"]),
          high_freq_factor=float(d["high_freq_factor"]),
          original_max_position_embeddings=int(d["original_max_position_embeddings"]))
    except KeyError as e:
      raise ValueError(f"config.json: rope_scaling of type llama3 lacks {e}") from e
  raise ValueError(f"config.json: rope_scaling type {typ!r} is not supported "
                   "(supported: default, linear, llama3)")


# --- presets -------------------------------------------------------------------------


def llama1_7b(**kw) -> LlamaConfig:
  """LLaMA-1 7B (LC-Rec's backbone)."""
  return LlamaConfig(**{**dict(
      vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
      num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
      rope_theta=10000.0, max_position_embeddings=2048, bos_token_id=1,
      eos_token_id=2), **kw})


def llama2_7b(**kw) -> LlamaConfig:
  """LLaMA-2 7B."""
  return llama1_7b(**{**dict(rms_norm_eps=1e-5, max_position_embeddings=4096), **kw})


def llama3_8b(**kw) -> LlamaConfig:
  """LLaMA-3 8B (no rope scaling; use `llama3_1_8b` for 3.1)."""
  return LlamaConfig(**{**dict(
      vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
      num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
      rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000,
      eos_token_id=128001), **kw})


def llama3_1_8b(**kw) -> LlamaConfig:
  """LLaMA-3.1 8B (llama3 rope scaling, 128k context)."""
  return llama3_8b(**{**dict(
      rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
      max_position_embeddings=131072), **kw})


def llama3_2_1b(**kw) -> LlamaConfig:
  """LLaMA-3.2 1B (tied embeddings, llama3 rope scaling factor 32)."""
  return LlamaConfig(**{**dict(
      vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
      num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
      rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
      tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=128000,
      eos_token_id=128001), **kw})


def smollm2_135m(**kw) -> LlamaConfig:
  """SmolLM2-135M(-Instruct): LLaMA architecture, GQA 9/3 heads, tied embeddings."""
  return LlamaConfig(**{**dict(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
      rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
      bos_token_id=1, eos_token_id=2, pad_token_id=2), **kw})


def tiny(vocab: int = 128, hidden: int = 64, layers: int = 2, heads: int = 4,
         kv_heads: int = 2, intermediate: int = 128, **kw) -> LlamaConfig:
  """A small random-init config for tests and quick runs (GQA by default)."""
  return LlamaConfig(**{**dict(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
      rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
      bos_token_id=1, eos_token_id=2, pad_token_id=0), **kw})


PRESETS = {
    "llama1_7b": llama1_7b, "llama2_7b": llama2_7b, "llama3_8b": llama3_8b,
    "llama3_1_8b": llama3_1_8b, "llama3_2_1b": llama3_2_1b,
    "smollm2_135m": smollm2_135m, "tiny": tiny,
}


def preset(name: str, **kw) -> LlamaConfig:
  """Looks up a preset by name (for ml_collections configs)."""
  if name not in PRESETS:
    raise ValueError(f"unknown LLaMA preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name](**kw)
