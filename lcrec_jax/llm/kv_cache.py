"""Preallocated key/value cache for incremental decoding with `Llama`.

The cache is a plain pytree (a NamedTuple), so it passes through `jax.jit`,
`lax.while_loop` and `jax.tree.map`. Slots are shared by all rows: a call with `T`
tokens writes slots `[index, index + T)` of every row. Padding (left or right) is
handled by `mask`, which marks the slots that hold real tokens, and `next_pos`, the
RoPE position of each row's next real token; attention never looks at slot numbers
except for causality within the batch-shared slot order.

Typical use (static shapes throughout):

  cache = init_cache(cfg, batch, max_len)
  logits, cache = model.apply(v, prompt, attention_mask=prompt_mask, cache=cache)
  logits, cache = model.apply(v, next_tok[:, None], cache=cache)      # one step
  cache = reorder_cache(cache, beam_parent_rows)                     # beam search

Writing past `max_len` is not checked under `jit` (XLA clamps the write); size the
cache as prompt length + generated tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcrec_jax.llm.config import LlamaConfig


class KVCache(NamedTuple):
  """Per-layer keys and values plus bookkeeping.

  Attributes:
    k: keys after RoPE, `[layers, batch, max_len, kv_heads, head_dim]`.
    v: values, `[layers, batch, max_len, kv_heads, head_dim]`.
    mask: `[batch, max_len]` bool, True where a slot holds a real (non-pad) token.
    index: `[]` int32, the next slot to write (same for every row).
    next_pos: `[batch]` int32, RoPE position of each row's next real token.
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array
  next_pos: jax.Array

  @property
  def max_len(self) -> int:
    """Number of slots."""
    return self.k.shape[2]

  @property
  def batch(self) -> int:
    """Rows."""
    return self.k.shape[1]


def init_cache(cfg: LlamaConfig, batch: int, max_len: int,
               dtype: jnp.dtype | str | None = None) -> KVCache:
  """An empty cache.

  Args:
    cfg: the model config (layers, kv heads, head dim).
    batch: rows B.
    max_len: slots S (prompt length + tokens to generate).
    dtype: storage dtype of k and v; default `cfg.dtype`.

  Returns:
    A `KVCache` with k, v `[L, B, S, kv_heads, head_dim]` of zeros.
  """
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
  return KVCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      mask=jnp.zeros((batch, max_len), jnp.bool_),
      index=jnp.zeros((), jnp.int32),
      next_pos=jnp.zeros((batch,), jnp.int32))


def reorder_cache(cache: KVCache, batch_indices: jax.Array) -> KVCache:
  """Gathers cache rows, e.g. beam parents, or repeats prompts over beams.

  Args:
    cache: a cache with batch B.
    batch_indices: `[B']` int rows of `cache` to take (B' may differ from B, e.g.
      `jnp.repeat(jnp.arange(B), beams)`).

  Returns:
    A cache with batch B'; `index` is unchanged.
  """
  idx = jnp.asarray(batch_indices, jnp.int32)
  return KVCache(
      k=jnp.take(cache.k, idx, axis=1),
      v=jnp.take(cache.v, idx, axis=1),
      mask=jnp.take(cache.mask, idx, axis=0),
      index=cache.index,
      next_pos=jnp.take(cache.next_pos, idx, axis=0))
