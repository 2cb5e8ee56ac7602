"""Jitted beam search over item codes, constrained by the item trie.

One call decodes a batch of users: the prompt is prefilled once per user, and each of
the ``L`` code levels is one step of a ``lax.fori_loop`` over ``[batch * beams]`` rows, all
with static shapes. The prompt's keys and values stay once per user
(:class:`~lcrec_jax.llm.kv_cache.BeamKVCache`, ``cache_layout="split"``, the default);
only the ``L - 1`` fed-back code tokens get per-beam cache slots, and only those are
gathered when beams are reordered. ``cache_layout="full"`` instead copies the prompt cache
into every beam's row (the former layout; same results, ~20x the cache traffic per step).

Scores are sums of full-vocabulary log-probabilities of the code tokens, as
Hugging Face's beam search with a ``prefix_allowed_tokens_fn`` computes them (log-softmax
over the whole vocabulary, then disallowed tokens set to ``-inf``), so a beam's score is
exactly the model's log-probability of that item's code given the prompt.

Masks (``mode``):
  * ``"trie"`` (default): only continuations of real item codes; every finished beam is
    an item, and as beams are distinct paths no item appears twice.
  * ``"position"``: LC-Rec's constraint, any code seen at that level; beams may spell
    codes of no item, reported as item ``-1``.

Banned items (``banned [batch, num_items]``, trie mode): each user's banned items (e.g.
already seen) are cut out of the trie for that user before the search, by following only
nodes with an unbanned item below them (:meth:`Trie.live_nodes`). The search is then the
same beam search over the trie of the user's remaining items: no beam is spent on a banned
item, and with as many beams as items it ranks every remaining item exactly. A user with
fewer remaining items than beams gets ``-1`` items and ``-inf`` scores in the last beams.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lcrec_jax.decode.trie import Trie
from lcrec_jax.llm.kv_cache import KVCache, init_cache, reorder_beam_kv, reorder_cache
from lcrec_jax.llm.kv_cache import split_beam_cache
from lcrec_jax.llm.model import Llama

NEG_INF = -jnp.inf
Mode = Literal["trie", "position"]
CacheLayout = Literal["split", "full"]


class BeamResult(NamedTuple):
  """Top beams per user, best first.

  Attributes:
    items: ``[batch, beams]`` item numbers; ``-1`` for an invalid or empty beam.
    scores: ``[batch, beams]`` log-probability of the beam's code tokens.
    codes: ``[batch, beams, levels]`` level-local code ids.
  """

  items: jax.Array
  scores: jax.Array
  codes: jax.Array


def _prefill(model: Llama, params: Any, prompt: jax.Array, prompt_mask: jax.Array,
             max_len: int, lora: Any = None):
  """Runs the left-padded prompt once: ``([batch, vocab] log-probs, cache)``.

  Only the last position goes through the output head (``[batch, len, vocab]`` logits of
  the whole prompt would cost ~20% of a small model's prefill and much memory).
  """
  cache = init_cache(model.config, prompt.shape[0], max_len)
  hidden, cache = model.apply({"params": params}, prompt, attention_mask=prompt_mask,
                              cache=cache, lora=lora, return_hidden=True)
  logits = model.apply({"params": params}, hidden[:, -1], method=Llama.logits)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), cache


def reorder_beam_cache(cache: KVCache, rows: jax.Array, start: int) -> KVCache:
  """:func:`reorder_cache` for beams that share their user's prompt, at a fraction of the cost.

  Beams of one user hold identical rows in the prompt slots ``[0, start)``, in ``mask`` and
  in ``next_pos``, so when ``rows`` maps each beam to a beam of the same user, gathering the
  generated slots ``[start, max_len)`` alone gives the same cache (the prompt part, most of
  the cache, is neither read nor copied; XLA updates the slots in place inside a loop).

  Args:
    cache: a cache of ``batch * beams`` rows.
    rows: ``[batch * beams]`` int source row of each row, within the same user's beams.
    start: static first generated slot (the padded prompt length).
  """
  def gather(x):
    return x.at[:, :, start:].set(jnp.take(x[:, :, start:], rows, axis=1))
  return cache._replace(k=gather(cache.k), v=gather(cache.v))


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "mode", "cache_layout"))
def constrained_beam_search(model: Llama, params: Any, prompt: jax.Array, prompt_mask: jax.Array,
                            code_token_ids: jax.Array, trie: Trie | None = None,
                            allowed_codes: jax.Array | None = None, *, num_beams: int,
                            mode: Mode = "trie", lora: Any = None,
                            cache_layout: CacheLayout = "split",
                            banned: jax.Array | None = None) -> BeamResult:
  """Top ``num_beams`` item codes per user.

  Args:
    model: the Flax LLaMA (static).
    params: its parameters.
    prompt: ``[batch, len]`` int32, LEFT-padded so every row's last token is real.
    prompt_mask: ``[batch, len]``, 1 for real tokens.
    code_token_ids: ``[levels, max_codes]`` vocabulary id of each level's code ids
      (``-1`` for padding beyond a level's size).
    trie: the item trie (mode ``"trie"``).
    allowed_codes: ``[levels, max_codes]`` bool, codes seen per level (mode ``"position"``).
    num_beams: beams per user (static).
    mode: ``"trie"`` or ``"position"`` (static).
    lora: optional LoRA adapters applied on the fly.
    cache_layout: ``"split"`` (prompt cache once per user plus a per-beam cache of the
      generated slots) or ``"full"`` (prompt cache copied into every beam row); static.
      Both give the same beams and scores up to float rounding.
    banned: optional ``[batch, num_items]`` bool, items each user must not get (mode
      ``"trie"`` only; see the module docstring).

  Returns:
    A :class:`BeamResult`. Items come from the trie in ``"trie"`` mode; in
    ``"position"`` mode ``items`` is ``-1`` and the caller maps ``codes`` to items with
    :func:`codes_to_items`.
  """
  batch, levels, max_codes = prompt.shape[0], code_token_ids.shape[0], code_token_ids.shape[1]
  if mode == "trie" and trie is None:
    raise ValueError("mode='trie' needs the item trie")
  if mode == "position" and allowed_codes is None:
    raise ValueError("mode='position' needs allowed_codes")
  if cache_layout not in ("split", "full"):
    raise ValueError(f"cache_layout must be 'split' or 'full', got {cache_layout!r}")
  if banned is not None:
    if mode != "trie":
      raise ValueError("banned items need mode='trie' (the position mask has no items)")
    if banned.shape != (batch, trie.num_items):
      raise ValueError(f"banned must be [batch, num_items] = {(batch, trie.num_items)}, "
                       f"got {banned.shape}")
    live = trie.live_nodes(banned)                                      # [B, L, N]
  valid_token = code_token_ids >= 0
  safe_ids = jnp.maximum(code_token_ids, 0)

  def level_mask(level, nodes):
    """``([batch, beams, K] allowed, [batch, beams, K] child node or item)``."""
    if mode == "trie":
      allowed, children = trie.allowed(level, nodes)
      if banned is not None:  # only children with an unbanned item below them
        flat = jnp.maximum(children, 0).reshape(batch, -1)
        alive = jnp.take_along_axis(live[:, level], flat, axis=1).reshape(children.shape)
        allowed = allowed & alive
        children = jnp.where(allowed, children, -1)
    else:
      allowed = jnp.broadcast_to(allowed_codes[level], nodes.shape + (max_codes,))
      allowed = allowed & (nodes >= 0)[..., None]
      children = jnp.where(allowed, 0, -1)
    return allowed & valid_token[level], children

  def select(level, scores, nodes, cand):
    """One beam step: ``cand [batch, beams, K]`` code log-probs -> new beams of the level."""
    allowed, children = level_mask(level, nodes)
    total = jnp.where(allowed, scores[..., None] + cand, NEG_INF)
    flat_total = total.reshape(batch, -1)
    if flat_total.shape[1] < num_beams:  # fewer candidates than beams: pad with dead ones
      pad = jnp.full((batch, num_beams - flat_total.shape[1]), NEG_INF, flat_total.dtype)
      flat_total = jnp.concatenate([flat_total, pad], axis=1)
    top, flat = jax.lax.top_k(flat_total, num_beams)
    flat = jnp.minimum(flat, total.shape[1] * max_codes - 1)
    parent, code = flat // max_codes, flat % max_codes
    child = jnp.take_along_axis(children.reshape(batch, -1), flat, axis=1)
    child = jnp.where(jnp.isfinite(top), child, -1)
    return top, parent, code, child

  split = cache_layout == "split"
  prompt_len = prompt.shape[1]
  logp0, cache = _prefill(model, params, prompt, prompt_mask,
                          prompt_len if split else prompt_len + levels - 1, lora)
  root = jnp.zeros((batch, 1), jnp.int32)
  cand0 = jnp.take(logp0, safe_ids[0], axis=-1)[:, None, :]           # [B, 1, K]
  scores, _, code, nodes = select(0, jnp.zeros((batch, 1)), root, cand0)
  codes = jnp.zeros((batch, num_beams, levels), jnp.int32).at[:, :, 0].set(code)
  if split:
    cache = split_beam_cache(cache, num_beams, max(levels - 1, 1))
  else:
    cache = reorder_cache(cache, jnp.repeat(jnp.arange(batch), num_beams))
  row_base = (jnp.arange(batch) * num_beams)[:, None]                 # [B, 1]

  def body(level, carry):
    scores, nodes, codes, cache = carry
    prev = jnp.take_along_axis(codes, jnp.full((batch, num_beams, 1), level - 1), axis=2)[..., 0]
    tok = safe_ids[level - 1][prev].reshape(batch * num_beams, 1)
    logits, cache = model.apply({"params": params}, tok, cache=cache, lora=lora)
    logits = logits[:, 0].astype(jnp.float32)                          # [B * W, V]
    # Full-vocabulary log-probabilities of the level's K code tokens only: the
    # normaliser needs every logit, the [B * W, V] log-softmax itself is not needed.
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    cand = (jnp.take(logits, safe_ids[level], axis=-1) - lse).reshape(batch, num_beams, -1)
    scores, parent, code, nodes = select(level, scores, nodes, cand)
    codes = jnp.take_along_axis(codes, parent[..., None], axis=1).at[:, :, level].set(code)
    rows = (parent + row_base).reshape(-1)
    if split:
      cache = reorder_beam_kv(cache, rows)
    else:
      cache = reorder_beam_cache(cache, rows, prompt_len)
    return scores, nodes, codes, cache

  scores, nodes, codes, _ = jax.lax.fori_loop(1, levels, body, (scores, nodes, codes, cache))
  items = nodes if mode == "trie" else jnp.full_like(nodes, -1)
  items = jnp.where(jnp.isfinite(scores), items, -1)
  return BeamResult(items, scores, codes)


def codes_to_items(codes: np.ndarray, scores: np.ndarray, lookup: dict[tuple[int, ...], int]
                   ) -> np.ndarray:
  """Map ``[batch, beams, levels]`` codes to item numbers (``-1`` = no such item)."""
  codes, scores = np.asarray(codes), np.asarray(scores)
  out = np.full(codes.shape[:2], -1, np.int64)
  for b in range(codes.shape[0]):
    for w in range(codes.shape[1]):
      if np.isfinite(scores[b, w]):
        out[b, w] = lookup.get(tuple(int(c) for c in codes[b, w]), -1)
  return out
