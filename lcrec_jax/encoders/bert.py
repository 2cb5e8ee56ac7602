"""BERT encoder in Flax Linen (the architecture of all-MiniLM-L6-v2).

Post-LayerNorm BERT as in the original paper and HF ``BertModel``: embeddings (word +
absolute position + token type, LayerNorm), then ``num_hidden_layers`` blocks of
multi-head self-attention and a GELU MLP, each followed by residual + LayerNorm. No
pooler (sentence encoders pool the last hidden state themselves). Deterministic only:
dropout is omitted because this module is used for inference.

The parameter tree mirrors HF names so weight loading is a plain rename
(see :mod:`lcrec_jax.encoders.minilm`)::

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/LayerNorm/{scale,bias}
  layer_{i}/attention/{query,key,value,output}/{kernel,bias}
  layer_{i}/attention/LayerNorm/{scale,bias}
  layer_{i}/intermediate/{kernel,bias}
  layer_{i}/output/{kernel,bias}
  layer_{i}/output_LayerNorm/{scale,bias}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a HF BERT ``config.json`` this encoder uses."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  @classmethod
  def from_json(cls, path: str) -> "BertConfig":
    """Reads a HF ``config.json``; unknown keys are ignored, bad values raise."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"BERT config not found: {path}")
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    model_type = raw.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(f"{path}: model_type {model_type!r} is not 'bert'")
    pos = raw.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"{path}: position_embedding_type {pos!r} unsupported (need 'absolute')")
    kwargs = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
    cfg = cls(**kwargs)
    if cfg.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"{path}: hidden_act {cfg.hidden_act!r} not in {sorted(_ACTIVATIONS)}")
    if cfg.hidden_size % cfg.num_attention_heads:
      raise ValueError(f"{path}: hidden_size {cfg.hidden_size} not divisible by "
                       f"num_attention_heads {cfg.num_attention_heads}")
    return cfg


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """``[batch, len]`` ids -> ``[batch, len, hidden]``."""
    cfg = self.config
    init = nn.initializers.normal(0.02)
    word = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                    name="word_embeddings")(input_ids)
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                   name="position_embeddings")(positions)
    typ = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                   name="token_type_embeddings")(token_type_ids)
    x = word + pos + typ
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm")(x)
    return x.astype(self.dtype)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention, output projection, residual + LayerNorm."""

  config: BertConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """``x [batch, len, hidden]``, additive ``bias [batch, 1, 1, len]`` -> same shape as x."""
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    dense = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype,
                                  precision=self.precision, name=name)
    b, n, _ = x.shape
    q = dense("query")(x).reshape(b, n, heads, head_dim)
    k = dense("key")(x).reshape(b, n, heads, head_dim)
    v = dense("value")(x).reshape(b, n, heads, head_dim)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
    scores = scores.astype(jnp.float32) / jnp.sqrt(jnp.float32(head_dim)) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision)
    out = dense("output")(ctx.reshape(b, n, cfg.hidden_size))
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                        name="LayerNorm")(out + x)


class BertLayer(nn.Module):
  """One post-LN transformer block: attention, then GELU MLP with residual + LayerNorm."""

  config: BertConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """``x [batch, len, hidden]`` -> ``[batch, len, hidden]``."""
    cfg = self.config
    x = BertSelfAttention(cfg, self.dtype, self.precision, name="attention")(x, bias)
    h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, precision=self.precision,
                 name="intermediate")(x)
    h = _ACTIVATIONS[cfg.hidden_act](h)
    h = nn.Dense(cfg.hidden_size, dtype=self.dtype, precision=self.precision,
                 name="output")(h)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                        name="output_LayerNorm")(h + x)


class BertEncoder(nn.Module):
  """BERT without pooler: returns the last hidden state.

  Attributes:
    config: architecture, usually from :meth:`BertConfig.from_json`.
    dtype: activation dtype (float32 for parity with the reference; bfloat16 on TPU
      if speed matters more than the last digits).
    precision: matmul precision, e.g. ``"highest"`` to keep float32 maths on TPU.
  """

  config: BertConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """Encodes a padded batch.

    Args:
      input_ids: ``[batch, len]`` int token ids.
      attention_mask: ``[batch, len]``, 1 for real tokens and 0 for padding
        (default: all ones).
      token_type_ids: ``[batch, len]`` segment ids (default: zeros).

    Returns:
      ``[batch, len, hidden]`` last hidden state.
    """
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(self.config, self.dtype, name="embeddings")(input_ids, token_type_ids)
    # Additive mask over keys, as HF: the most negative float32, so padded keys get an
    # exactly-zero probability and an all-padding row stays finite (uniform).
    neg = jnp.finfo(jnp.float32).min
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg).astype(jnp.float32)
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.dtype, self.precision, name=f"layer_{i}")(x, bias)
    return x
