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
            steps: int, layout: Layout = "split", lora: Any = None) -> Prefilled:
  """Runs the left-padded prompts once and sizes the cache for ``steps`` fed-back tokens.

  Only the last position goes through the output head (``[batch, len, vocab]`` logits of
  the whole prompt would cost ~20% of a small model's prefill and much memory).

  Args:
    model: the Flax LLaMA.
    params: its parameters.
    prompt: ``[batch, len]`` int32, LEFT-padded so every row's last token is real.
    prompt_mask: ``[batch, len]``, 1 for real tokens.
    steps: tokens each beam will feed back (e.g. code levels - 1; the split layout keeps
      at least one slot).
    layout: ``"split"`` or ``"full"`` (see the module docstring).
    lora: optional LoRA adapters applied on the fly.
  """
  if layout not in ("split", "full"):
    raise ValueError(f"cache_layout must be 'split' or 'full', got {layout!r}")
  split = layout == "split"
  extra = 0 if split else steps
  cache = init_cache(model.config, prompt.shape[0], prompt.shape[1] + extra)
  hidden, cache = model.apply({"params": params}, prompt, attention_mask=prompt_mask,
                              cache=cache, lora=lora, return_hidden=True)
  logits = model.apply({"params": params}, hidden[:, -1], method=Llama.logits)
  if split:
    return Prefilled(logits, split_beam_cache(cache, 1, max(steps, 1)), SPLIT_BEAM_AXES)
  return Prefilled(logits, cache, KV_BEAM_AXES)


def logits_fn(model: Llama, params: Any, lora: Any = None) -> TokensToLogits:
  """``tokens_to_logits(tokens [rows, 1] int32, cache) -> (logits [rows, vocab], cache)``.

  One cached decoding step of every beam row (``cache`` from :func:`prefill`, expanded to
  the rows); logits in the model's compute dtype.
  """
  def tokens_to_logits(tokens: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    logits, cache = model.apply({"params": params}, tokens, cache=cache, lora=lora)
    return logits[:, 0], cache
  return tokens_to_logits
