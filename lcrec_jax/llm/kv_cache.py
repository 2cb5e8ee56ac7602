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

Beam search uses `BeamKVCache` instead: the prompt's keys and values are kept once per
user (`[layers, batch, prompt_len, ...]`) and only the generated tokens get per-beam
slots (`[layers, batch * beams, steps, ...]`). Attention reads both parts; reordering beams
gathers only the small per-beam part:

  cache = init_cache(cfg, batch, prompt_len)
  logits, cache = model.apply(v, prompt, attention_mask=prompt_mask, cache=cache)
  cache = split_beam_cache(cache, num_beams, steps)
  logits, cache = model.apply(v, beam_tok[:, None], cache=cache)    # [batch * beams, 1]
  cache = reorder_beam_kv(cache, beam_parent_rows)

Each decoder layer gets its slice of the cache as a typed per-layer view, `LayerKV` (k, v)
from a `KVCache` or `BeamLayerKV` (prompt_k, prompt_v, k, v) from a `BeamKVCache`
(`cache.layers()`, leading `[layers]` axis kept for scanned layers), and tells the two
layouts apart with `isinstance`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcrec_jax.llm.config import LlamaConfig


class LayerKV(NamedTuple):
  """A layer's keys and values (of `KVCache`), also what an attention layer returns.

  Attributes:
    k: keys after RoPE, `[batch, max_len, kv_heads, head_dim]` (with a leading
      `[layers]` axis when all layers are handed to scanned layers at once).
    v: values, same shape as `k`.
  """
  k: jax.Array
  v: jax.Array


class BeamLayerKV(NamedTuple):
  """A layer's part of a `BeamKVCache` (with a leading `[layers]` axis when stacked).

  Attributes:
    prompt_k: prompt keys after RoPE, `[users, prompt_len, kv_heads, head_dim]`, shared by
      the `batch // users` consecutive beam rows of each user.
    prompt_v: prompt values, same shape as `prompt_k`.
    k: keys of generated tokens, `[batch, steps, kv_heads, head_dim]` (per beam row).
    v: values of generated tokens, same shape as `k`.
  """
  prompt_k: jax.Array
  prompt_v: jax.Array
  k: jax.Array
  v: jax.Array


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

  def layers(self) -> LayerKV:
    """The per-layer view of every layer, stacked: `LayerKV` with `[layers, ...]` leaves."""
    return LayerKV(k=self.k, v=self.v)


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


class BeamKVCache(NamedTuple):
  """A prompt cache shared by each user's beams plus a per-beam cache of generated tokens.

  Row `r` of the per-beam part belongs to user `r // beams` (beams of one user are
  contiguous). The prompt slots come before every generated slot, so a generated token
  attends to all real prompt slots and, causally, to the generated slots.

  Attributes:
    prompt_k: keys after RoPE, `[layers, batch, prompt_len, kv_heads, head_dim]`.
    prompt_v: values, `[layers, batch, prompt_len, kv_heads, head_dim]`.
    prompt_mask: `[batch, prompt_len]` bool, True where a prompt slot holds a real token.
    k: keys of generated tokens, `[layers, batch * beams, steps, kv_heads, head_dim]`.
    v: values of generated tokens, same shape as `k`.
    mask: `[batch * beams, steps]` bool, True where a generated slot holds a real token.
    index: `[]` int32, the next generated slot to write (same for every row).
    next_pos: `[batch * beams]` int32, RoPE position of each row's next real token.
  """
  prompt_k: jax.Array
  prompt_v: jax.Array
  prompt_mask: jax.Array
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array
  next_pos: jax.Array

  @property
  def max_len(self) -> int:
    """Number of generated slots."""
    return self.k.shape[2]

  @property
  def batch(self) -> int:
    """Rows of the per-beam part (`batch * beams`)."""
    return self.k.shape[1]

  @property
  def num_beams(self) -> int:
    """Beams per user."""
    return self.k.shape[1] // self.prompt_k.shape[1]

  def layers(self) -> BeamLayerKV:
    """The per-layer view of every layer, stacked: `BeamLayerKV` with `[layers, ...]` leaves."""
    return BeamLayerKV(prompt_k=self.prompt_k, prompt_v=self.prompt_v, k=self.k, v=self.v)


def split_beam_cache(cache: KVCache, num_beams: int, steps: int) -> BeamKVCache:
  """Turns a prefilled prompt cache into a `BeamKVCache` for `num_beams` beams per user.

  The prompt part is `cache` itself (slots `[0, cache.index)` must all have been
  written, i.e. the cache is sized to the prompt); the per-beam part is empty.

  Args:
    cache: a prefilled `KVCache` of `batch` rows, `index == max_len` (the prompt length).
    num_beams: beams per user W.
    steps: per-beam slots, the tokens to feed back (e.g. generated tokens - 1).

  Returns:
    A `BeamKVCache` with `k`, `v` `[layers, batch * W, steps, kv_heads, head_dim]` of zeros,
    `index` 0 and each beam's `next_pos` that of its user.
  """
  layers, batch, _, kv_heads, head_dim = cache.k.shape
  shape = (layers, batch * num_beams, steps, kv_heads, head_dim)
  return BeamKVCache(
      prompt_k=cache.k, prompt_v=cache.v, prompt_mask=cache.mask,
      k=jnp.zeros(shape, cache.k.dtype), v=jnp.zeros(shape, cache.v.dtype),
      mask=jnp.zeros((batch * num_beams, steps), jnp.bool_),
      index=jnp.zeros((), jnp.int32),
      next_pos=jnp.repeat(cache.next_pos, num_beams, axis=0))


def reorder_beam_kv(cache: BeamKVCache, rows: jax.Array) -> BeamKVCache:
  """Gathers the per-beam part of a `BeamKVCache` (beam parents); the prompt part is kept.

  Args:
    cache: a `BeamKVCache` of `batch * beams` beam rows.
    rows: `[batch * beams]` int source row of each row; must stay within the same user's
      beams (`rows[r] // beams == r // beams`), as the prompt part is not moved.

  Returns:
    The cache with `k`, `v`, `mask` and `next_pos` gathered by `rows`.
  """
  idx = jnp.asarray(rows, jnp.int32)
  return cache._replace(
      k=jnp.take(cache.k, idx, axis=1), v=jnp.take(cache.v, idx, axis=1),
      mask=jnp.take(cache.mask, idx, axis=0), next_pos=jnp.take(cache.next_pos, idx, axis=0))
