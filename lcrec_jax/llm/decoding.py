"""The LLaMA side of beam search: prompt prefill, a logits callback, the cache's beam axes.

The searches in :mod:`lcrec_jax.decode` know nothing of the model. As in flax's
``examples/wmt/decode.py`` they take

* the next-token logits after each user's prompt, ``[batch, vocab]``;
* a decode cache, any pytree with one row per user;
* ``beam_axes``, a pytree of the same structure whose leaves say along which axis each
  cache leaf holds its rows (``None``: a leaf shared by all beams of a user, never copied
  or gathered, e.g. the prompt's keys and values of the split layout);
* ``tokens_to_logits(tokens [rows, 1], cache) -> (logits [rows, vocab], new_cache)``, one
  decoding step over ``rows = batch * beams`` beam rows.

They expand the cache to ``beams`` rows per user and reorder it after each step with tree
maps over ``beam_axes`` (``lcrec_jax.decode.beam_search.expand_beams`` /
``gather_beams``). This module builds those three things for :class:`Llama`:

  pre = prefill(model, params, prompt, prompt_mask, steps=levels - 1)
  step = logits_fn(model, params)
  result = search_codes(step, pre.logits, pre.cache, pre.beam_axes, ...)

Cache layouts (``layout``):
  * ``"split"`` (default): the prompt's keys and values stay once per user
    (:class:`BeamKVCache`, axis ``None``) and only the ``steps`` fed-back tokens get
    per-beam slots, so reordering beams moves only those.
  * ``"full"``: a :class:`KVCache` of ``prompt_len + steps`` slots copied into every beam
    and gathered whole at each reorder (the former layout; same results, far more traffic).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

from lcrec_jax.llm.kv_cache import BeamKVCache, KVCache, init_cache, split_beam_cache
from lcrec_jax.llm.model import Llama

Layout = Literal["split", "full"]
TokensToLogits = Callable[[jax.Array, Any], tuple[jax.Array, Any]]

# Row axis of every leaf of each cache type (None: one copy per user, shared by its beams).
KV_BEAM_AXES = KVCache(k=1, v=1, mask=0, index=None, next_pos=0)
SPLIT_BEAM_AXES = BeamKVCache(prompt_k=None, prompt_v=None, prompt_mask=None, k=1, v=1,
                              mask=0, index=None, next_pos=0)


class Prefilled(NamedTuple):
  """What a search starts from.

  Attributes:
    logits: ``[batch, vocab]`` next-token logits after each prompt (compute dtype).
    cache: the decode cache, one row per user (a :class:`BeamKVCache` with one beam per
      user for ``"split"``, a :class:`KVCache` for ``"full"``).
    beam_axes: ``cache``'s row axes (:data:`SPLIT_BEAM_AXES` or :data:`KV_BEAM_AXES`).
  """

  logits: jax.Array
  cache: Any
  beam_axes: Any


def prefill(model: Llama, params: Any, prompt: jax.Array, prompt_mask: jax.Array, *,
            steps: int, layout: Layout = "split", lora: Any = None, chunk: int = 0,
            groups: int = 1) -> Prefilled:
  """Runs the left-padded prompts once and sizes the cache for ``steps`` fed-back tokens.

  Only the last position goes through the output head (``[batch, len, vocab]`` logits of
  the whole prompt would cost ~20% of a small model's prefill and much memory).

  With ``chunk > 0`` the prompts are bucketed by length instead of all running at the
  padded length: rows are sorted by length and split into ``groups`` groups, and each
  group runs only the ``chunk``-token slices (counted from the end) that hold a real token
  of one of its rows (:func:`_bucketed_prefill`). Same keys, values and logits up to float
  rounding; the prompt part of the cache is ``len`` rounded up to a multiple of ``chunk``.

  Args:
    model: the Flax LLaMA.
    params: its parameters.
    prompt: ``[batch, len]`` int32, LEFT-padded so every row's last token is real.
    prompt_mask: ``[batch, len]``, 1 for real tokens.
    steps: tokens each beam will feed back (e.g. code levels - 1; the split layout keeps
      at least one slot).
    layout: ``"split"`` or ``"full"`` (see the module docstring).
    lora: optional LoRA adapters applied on the fly.
    chunk: static slice length of the bucketed prefill; 0: one pass at the padded length.
    groups: static number of length groups of the bucketed prefill (at most ``batch``).
  """
  if layout not in ("split", "full"):
    raise ValueError(f"cache_layout must be 'split' or 'full', got {layout!r}")
  split = layout == "split"
  extra = 0 if split else steps
  if chunk > 0:
    last, cache = _bucketed_prefill(model, params, prompt, prompt_mask, extra, lora, chunk,
                                    groups)
  else:
    cache = init_cache(model.config, prompt.shape[0], prompt.shape[1] + extra)
    hidden, cache = model.apply({"params": params}, prompt, attention_mask=prompt_mask,
                                cache=cache, lora=lora, return_hidden=True)
    last = hidden[:, -1]
  logits = model.apply({"params": params}, last, method=Llama.logits)
  if split:
    return Prefilled(logits, split_beam_cache(cache, 1, max(steps, 1)), SPLIT_BEAM_AXES)
  return Prefilled(logits, cache, KV_BEAM_AXES)


def _bucketed_prefill(model: Llama, params: Any, prompt: jax.Array, prompt_mask: jax.Array,
                      extra: int, lora: Any, chunk: int, groups: int
                      ) -> tuple[jax.Array, KVCache]:
  """Prefill by length groups: ``([batch, E] last hidden state, KVCache)``, rows in order.

  The prompts are left-padded to ``n * chunk`` columns; rows are sorted longest first and
  cut into ``groups`` static groups; group ``g`` starts its cache at the first ``chunk``
  slice holding a real token of its longest row and runs one ``chunk``-token cached step
  per slice from there (a ``fori_loop`` with a traced start), so a short group skips the
  padding a long row forces on the batch. Slots never run stay zero and masked. The
  cache has ``n * chunk + extra`` slots.
  """
  batch, length = prompt.shape
  n = -(-length // chunk)
  pad = n * chunk - length
  tok = jnp.pad(jnp.asarray(prompt, jnp.int32), ((0, 0), (pad, 0)))
  mask = jnp.pad(jnp.asarray(prompt_mask).astype(jnp.int32), ((0, 0), (pad, 0)))
  lengths = jnp.sum(mask, axis=1)
  order = jnp.argsort(-lengths, stable=True)                         # longest first
  groups = max(1, min(groups, batch))
  sizes = [batch // groups + (1 if g < batch % groups else 0) for g in range(groups)]
  hidden_size = model.config.hidden_size
  dtype = jnp.dtype(model.config.compute_dtype)
  lasts, caches, start = [], [], 0
  for size in sizes:
    rows = order[start:start + size]
    start += size
    tok_g, mask_g = jnp.take(tok, rows, axis=0), jnp.take(mask, rows, axis=0)
    first = n - (jnp.max(lengths[rows]) + chunk - 1) // chunk         # first slice to run
    cache = init_cache(model.config, size, n * chunk + extra)
    cache = cache._replace(index=(first * chunk).astype(jnp.int32))

    def body(j, carry, tok_g=tok_g, mask_g=mask_g):
      cache, _ = carry
      t = jax.lax.dynamic_slice_in_dim(tok_g, j * chunk, chunk, axis=1)
      m = jax.lax.dynamic_slice_in_dim(mask_g, j * chunk, chunk, axis=1)
      hidden, cache = model.apply({"params": params}, t, attention_mask=m, cache=cache,
                                  lora=lora, return_hidden=True)
      return cache, hidden[:, -1]

    cache, last = jax.lax.fori_loop(first, n, body,
                                    (cache, jnp.zeros((size, hidden_size), dtype)))
    lasts.append(last)
    caches.append(cache)
  inverse = jnp.argsort(order)
  cat = lambda xs, axis: jnp.take(jnp.concatenate(xs, axis=axis), inverse, axis=axis)
  cache = KVCache(k=cat([c.k for c in caches], 1), v=cat([c.v for c in caches], 1),
                  mask=cat([c.mask for c in caches], 0), index=caches[0].index,
                  next_pos=cat([c.next_pos for c in caches], 0))
  return cat(lasts, 0), cache


def logits_fn(model: Llama, params: Any, lora: Any = None) -> TokensToLogits:
  """``tokens_to_logits(tokens [rows, 1] int32, cache) -> (logits [rows, vocab], cache)``.

  One cached decoding step of every beam row (``cache`` from :func:`prefill`, expanded to
  the rows); logits in the model's compute dtype.
  """
  def tokens_to_logits(tokens: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    logits, cache = model.apply({"params": params}, tokens, cache=cache, lora=lora)
    return logits[:, 0], cache
  return tokens_to_logits
