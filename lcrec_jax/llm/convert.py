"""Hugging Face LLaMA state dict <-> `Llama` params pytree.

The interchange format is an HF-named dict of numpy arrays in torch layout
(`model.layers.{i}.self_attn.q_proj.weight [H*D, E]`, ...). `params_from_hf` and
`hf_from_params` are exact inverses. Per-tensor helpers (`hf_param_table`,
`hf_to_param_layout`, `param_to_hf_layout`) let loaders convert one tensor at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from lcrec_jax.llm.config import LlamaConfig
from lcrec_jax.llm.tree_paths import get_path, set_path

# HF per-layer key suffix -> (path inside a decoder layer, layout kind).
_LAYER_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"), "q"),
    "self_attn.k_proj.weight": (("self_attn", "k_proj", "kernel"), "kv"),
    "self_attn.v_proj.weight": (("self_attn", "v_proj", "kernel"), "kv"),
    "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), "o"),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), "t"),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), "t"),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), "t"),
    "input_layernorm.weight": (("input_layernorm", "scale"), "id"),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), "id"),
}
# Keys some checkpoints carry that hold no weights we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """Where one HF tensor goes.

  Attributes:
    key: HF name.
    path: path of the target leaf in the params pytree.
    layer: layer index when the target is stacked (`scan_layers=True`), else None.
    kind: layout kind ("id", "t", "q", "kv", "o", "head").
    hf_shape: expected torch-layout shape.
  """
  key: str
  path: tuple[str, ...]
  layer: int | None
  kind: str
  hf_shape: tuple[int, ...]


def _hf_shape(kind: str, cfg: LlamaConfig, suffix: str = "") -> tuple[int, ...]:
  e, f, h, kv, d, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                       cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
  if kind == "q":
    return (h * d, e)
  if kind == "kv":
    return (kv * d, e)
  if kind == "o":
    return (e, h * d)
  if kind == "t":
    return (e, f) if "down_proj" in suffix else (f, e)
  if kind == "head":
    return (v, e)
  if kind == "embed":
    return (v, e)
  return (e,)


def hf_param_table(cfg: LlamaConfig) -> dict[str, HFTensor]:
  """All HF keys the config needs (no `lm_head.weight` when tied), in file order."""
  table: dict[str, HFTensor] = {}
  table["model.embed_tokens.weight"] = HFTensor(
      "model.embed_tokens.weight", ("embed_tokens", "embedding"), None, "id",
      _hf_shape("embed", cfg))
  for i in range(cfg.num_hidden_layers):
    for suffix, (sub, kind) in _LAYER_KEYS.items():
      key = f"model.layers.{i}.{suffix}"
      if cfg.scan_layers:
        path, layer = ("layers",) + sub, i
      else:
        path, layer = (f"layers_{i}",) + sub, None
      table[key] = HFTensor(key, path, layer, kind, _hf_shape(kind, cfg, suffix))
  table["model.norm.weight"] = HFTensor("model.norm.weight", ("norm", "scale"), None, "id",
                                        _hf_shape("id", cfg))
  if not cfg.tie_word_embeddings:
    table["lm_head.weight"] = HFTensor("lm_head.weight", ("lm_head", "kernel"), None, "head",
                                       _hf_shape("head", cfg))
  return table


def hf_to_param_layout(w: np.ndarray, kind: str, cfg: LlamaConfig) -> np.ndarray:
  """Torch layout -> our layout for one tensor (no layer axis)."""
  e, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  if kind == "id":
    return w
  if kind in ("t", "head"):
    return np.ascontiguousarray(w.T)
  if kind == "q":
    return np.ascontiguousarray(w.T).reshape(e, h, d)
  if kind == "kv":
    return np.ascontiguousarray(w.T).reshape(e, kv, d)
  if kind == "o":
    return np.ascontiguousarray(w.T).reshape(h, d, e)
  raise ValueError(f"unknown layout kind {kind!r}")


def param_to_hf_layout(w: np.ndarray, kind: str, cfg: LlamaConfig) -> np.ndarray:
  """Our layout -> torch layout for one tensor (no layer axis); inverse of the above."""
  e = cfg.hidden_size
  if kind == "id":
    return w
  if kind in ("t", "head"):
    return np.ascontiguousarray(w.T)
  if kind in ("q", "kv"):
    return np.ascontiguousarray(w.reshape(e, -1).T)
  if kind == "o":
    return np.ascontiguousarray(w.reshape(-1, e).T)
  raise ValueError(f"unknown layout kind {kind!r}")


def param_shape(t: HFTensor, cfg: LlamaConfig) -> tuple[int, ...]:
  """Shape of the target leaf of `t` (with the layer axis when stacked)."""
  probe = np.empty(t.hf_shape, np.bool_)
  shape = hf_to_param_layout(probe, t.kind, cfg).shape
  return ((cfg.num_hidden_layers,) + shape) if t.layer is not None else shape


def check_keys(keys, cfg: LlamaConfig, where: str = "state dict") -> None:
  """Raises a `KeyError` naming missing and unexpected HF keys."""
  table = hf_param_table(cfg)
  keys = set(keys)
  missing = [k for k in table if k not in keys]
  extra = sorted(k for k in keys if k not in table and not _ignorable(k, cfg))
  if missing or extra:
    msg = [f"{where} does not match the LlamaConfig:"]
    if missing:
      msg.append(f"missing keys ({len(missing)}): {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
    if extra:
      msg.append(f"unexpected keys ({len(extra)}): {extra[:8]}" + (" ..." if len(extra) > 8 else ""))
    raise KeyError(" ".join(msg))


def _ignorable(key: str, cfg: LlamaConfig) -> bool:
  if key.endswith(_IGNORED_SUFFIXES):
    return True
  return cfg.tie_word_embeddings and key == "lm_head.weight"


def check_shape(t: HFTensor, shape: tuple[int, ...], where: str = "state dict") -> None:
  """Raises a `ValueError` naming the key when a tensor's shape is wrong."""
  if tuple(shape) != t.hf_shape:
    raise ValueError(f"{where}: {t.key} has shape {tuple(shape)}, the LlamaConfig expects "
                     f"{t.hf_shape}")


def params_from_hf(state_dict: Mapping[str, Any], cfg: LlamaConfig,
                   dtype: Any = None,
                   to_array: Callable[[np.ndarray, tuple[str, ...]], Any] | None = None
                   ) -> dict[str, Any]:
  """HF state dict -> params pytree.

  Args:
    state_dict: HF-named arrays (numpy, or anything `np.asarray` takes) in torch layout.
    cfg: target config (its `scan_layers` decides the layout).
    dtype: cast to this dtype (default `cfg.param_dtype`).
    to_array: optional `(np_array, path) -> array` placement hook (e.g. `jax.device_put`
      with a sharding); default keeps numpy arrays.

  Returns:
    The "params" pytree for `Llama(cfg)`.

  Raises:
    KeyError: missing or unexpected keys (named). ValueError: a shape mismatch (named).
  """
  check_keys(state_dict.keys(), cfg)
  dtype = np.dtype(dtype or cfg.weight_dtype)
  table = hf_param_table(cfg)
  if cfg.tie_word_embeddings and "lm_head.weight" in state_dict:
    head = np.asarray(state_dict["lm_head.weight"])
    emb = np.asarray(state_dict["model.embed_tokens.weight"])
    if head.shape != emb.shape or not np.array_equal(head, emb):
      raise ValueError("state dict: tie_word_embeddings is set but lm_head.weight differs "
                       "from model.embed_tokens.weight")
  params: dict[str, Any] = {}
  stacked: dict[tuple[str, ...], list] = {}
  for key, t in table.items():
    w = np.asarray(state_dict[key])
    check_shape(t, w.shape)
    w = hf_to_param_layout(w, t.kind, cfg).astype(dtype)
    if t.layer is None:
      set_path(params, t.path, to_array(w, t.path) if to_array else w)
    else:
      stacked.setdefault(t.path, [None] * cfg.num_hidden_layers)[t.layer] = w
  for path, ws in stacked.items():
    w = np.stack(ws)
    set_path(params, path, to_array(w, path) if to_array else w)
  return params


def iter_hf_from_params(params: Mapping[str, Any], cfg: LlamaConfig, dtype: Any = None):
  """Yields `(hf_key, numpy array)` one tensor at a time (one param leaf on host at a time).

  Args and errors as in `hf_from_params`; the order groups keys by param leaf.
  """
  by_path: dict[tuple[str, ...], list[HFTensor]] = {}
  for t in hf_param_table(cfg).values():
    by_path.setdefault(t.path, []).append(t)
  for path, ts in by_path.items():
    leaf = get_path(params, path)
    leaf = getattr(leaf, "value", leaf)  # nn.LogicallyPartitioned box
    w_all = np.asarray(leaf)
    expect = param_shape(ts[0], cfg)
    if w_all.shape != expect:
      raise ValueError(f"params: {'/'.join(path)} has shape {w_all.shape}, the LlamaConfig "
                       f"expects {expect}")
    for t in ts:
      w = w_all[t.layer] if t.layer is not None else w_all
      w = param_to_hf_layout(w, t.kind, cfg)
      yield t.key, (w.astype(dtype) if dtype is not None else w)
    del w_all


def hf_from_params(params: Mapping[str, Any], cfg: LlamaConfig,
                   dtype: Any = None) -> dict[str, np.ndarray]:
  """Params pytree -> HF state dict of numpy arrays (torch layout).

  Args:
    params: `Llama(cfg)` params (jax or numpy leaves, boxed or not).
    cfg: their config.
    dtype: output dtype (default: each leaf's own).

  Returns:
    HF-named dict in HF order; no `lm_head.weight` when embeddings are tied.

  Raises:
    KeyError: a missing param leaf. ValueError: a leaf of the wrong shape.
  """
  got = dict(iter_hf_from_params(params, cfg, dtype))
  return {k: got[k] for k in hf_param_table(cfg)}
