"""Jitted beam search over item codes, constrained by the item trie.

One call decodes a batch of users: the prompt is prefilled once per user, and each of
the ``L`` code levels is one step of a ``lax.fori_loop`` over ``[batch * beams]`` rows, all
with static shapes.

The search itself, :func:`search_codes`, is model-agnostic (as flax's
``examples/wmt/decode.py``): it takes the logits after the prompt, a decode cache pytree
with the row axis of each leaf (``beam_axes``; ``None`` for leaves shared by a user's
beams) and a callback ``tokens_to_logits(tokens [rows, 1], cache) -> (logits [rows, V],
cache)``; it expands the cache to the beams and reorders it with tree maps
(:func:`expand_beams`, :func:`gather_beams`). :func:`constrained_beam_search` is the
jitted search for :class:`~lcrec_jax.llm.model.Llama`, built on the adapter in
:mod:`lcrec_jax.llm.decoding`: with ``cache_layout="split"`` (the default) the prompt's
keys and values stay once per user and only the ``L - 1`` fed-back code tokens get
per-beam cache slots, the only part gathered when beams are reordered;
``cache_layout="full"`` copies the prompt cache into every beam's row (the former layout;
same results, ~20x the cache traffic per step).

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
from lcrec_jax.llm import decoding
from lcrec_jax.llm.model import Llama

NEG_INF = -jnp.inf
Mode = Literal["trie", "position"]
CacheLayout = decoding.Layout


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


def _tree_map_axes(fn, tree: Any, beam_axes: Any) -> Any:
  """``fn(leaf, axis)`` over the leaves of ``tree`` whose axis in ``beam_axes`` is set."""
  return jax.tree.map(lambda ax, x: x if ax is None else fn(x, ax), beam_axes, tree,
                      is_leaf=lambda ax: ax is None)


def expand_beams(tree: Any, beam_axes: Any, num_beams: int) -> Any:
  """Each row of ``tree`` repeated ``num_beams`` times along its axis (user-major rows).

  Args:
    tree: a pytree with ``batch`` rows along each leaf's axis in ``beam_axes``.
    beam_axes: same structure, int axes or ``None`` (leaf left as is: shared by beams).
    num_beams: W.

  Returns:
    ``tree`` with ``batch * W`` rows; row ``u * W + w`` is beam ``w`` of user ``u``.
  """
  return _tree_map_axes(lambda x, ax: jnp.repeat(x, num_beams, axis=ax), tree, beam_axes)


def gather_beams(tree: Any, beam_axes: Any, rows: jax.Array) -> Any:
  """Rows ``rows`` of every leaf along its axis in ``beam_axes`` (beam parents).

  Args:
    tree: a pytree of ``batch * W`` beam rows (leaves with axis ``None`` are kept).
    beam_axes: same structure, int axes or ``None``.
    rows: ``[batch * W]`` int source row of each row, within the same user's beams when
      ``tree`` has shared (``None``) leaves.
  """
  idx = jnp.asarray(rows, jnp.int32)
  return _tree_map_axes(lambda x, ax: jnp.take(x, idx, axis=ax), tree, beam_axes)


def _check(batch: int, mode: str, trie: Trie | None, allowed_codes: jax.Array | None,
           banned: jax.Array | None) -> None:
  if mode == "trie" and trie is None:
    raise ValueError("mode='trie' needs the item trie")
  if mode == "position" and allowed_codes is None:
    raise ValueError("mode='position' needs allowed_codes")
  if banned is not None:
    if mode != "trie":
      raise ValueError("banned items need mode='trie' (the position mask has no items)")
    if banned.shape != (batch, trie.num_items):
      raise ValueError(f"banned must be [batch, num_items] = {(batch, trie.num_items)}, "
                       f"got {banned.shape}")


def _level_masks(code_token_ids: jax.Array, trie: Trie | None,
                 allowed_codes: jax.Array | None, mode: str, banned: jax.Array | None):
  """``level_mask(level, nodes [B, W]) -> ([B, W, K] allowed, [B, W, K] child or item)``."""
  batch = None if banned is None else banned.shape[0]
  max_codes = code_token_ids.shape[1]
  valid_token = code_token_ids >= 0
  live = None if banned is None else trie.live_nodes(banned)             # [B, L, N]

  def level_mask(level, nodes):
    if mode == "trie":
      allowed, children = trie.allowed(level, nodes)
      if live is not None:  # only children with an unbanned item below them
        flat = jnp.maximum(children, 0).reshape(batch, -1)
        alive = jnp.take_along_axis(live[:, level], flat, axis=1).reshape(children.shape)
        allowed = allowed & alive
        children = jnp.where(allowed, children, -1)
    else:
      allowed = jnp.broadcast_to(allowed_codes[level], nodes.shape + (max_codes,))
      allowed = allowed & (nodes >= 0)[..., None]
      children = jnp.where(allowed, 0, -1)
    return allowed & valid_token[level], children
  return level_mask


def search_codes(tokens_to_logits: decoding.TokensToLogits, logits: jax.Array, cache: Any,
                 beam_axes: Any, code_token_ids: jax.Array, trie: Trie | None = None,
                 allowed_codes: jax.Array | None = None, *, num_beams: int,
                 mode: Mode = "trie", banned: jax.Array | None = None) -> BeamResult:
  """Top ``num_beams`` item codes per user, for any model (call it under ``jax.jit``).

  Args:
    tokens_to_logits: ``(tokens [batch * beams, 1] int32, cache) -> (logits
      [batch * beams, vocab], new cache)``, one decoding step of every beam row.
    logits: ``[batch, vocab]`` next-token logits after each user's prompt.
    cache: the decode cache pytree after the prompts, one row per user.
    beam_axes: ``cache``'s row axis per leaf (``None``: shared by a user's beams, kept).
    code_token_ids: ``[levels, max_codes]`` vocabulary id of each level's code ids
      (``-1`` for padding beyond a level's size).
    trie: the item trie (mode ``"trie"``).
    allowed_codes: ``[levels, max_codes]`` bool, codes seen per level (mode ``"position"``).
    num_beams: beams per user (static).
    mode: ``"trie"`` or ``"position"`` (static).
    banned: optional ``[batch, num_items]`` bool, items each user must not get (mode
      ``"trie"`` only; see the module docstring).

  Returns:
    A :class:`BeamResult` (see :func:`constrained_beam_search`).
  """
  batch, levels, max_codes = logits.shape[0], code_token_ids.shape[0], code_token_ids.shape[1]
  _check(batch, mode, trie, allowed_codes, banned)
  level_mask = _level_masks(code_token_ids, trie, allowed_codes, mode, banned)
  safe_ids = jnp.maximum(code_token_ids, 0)

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

  logp0 = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  root = jnp.zeros((batch, 1), jnp.int32)
  cand0 = jnp.take(logp0, safe_ids[0], axis=-1)[:, None, :]           # [B, 1, K]
  scores, _, code, nodes = select(0, jnp.zeros((batch, 1)), root, cand0)
  codes = jnp.zeros((batch, num_beams, levels), jnp.int32).at[:, :, 0].set(code)
  cache = expand_beams(cache, beam_axes, num_beams)
  row_base = (jnp.arange(batch) * num_beams)[:, None]                 # [B, 1]

  def body(level, carry):
    scores, nodes, codes, cache = carry
    prev = jnp.take_along_axis(codes, jnp.full((batch, num_beams, 1), level - 1), axis=2)[..., 0]
    tok = safe_ids[level - 1][prev].reshape(batch * num_beams, 1)
    logits, cache = tokens_to_logits(tok, cache)
    logits = logits.astype(jnp.float32)                                # [B * W, V]
    # Full-vocabulary log-probabilities of the level's K code tokens only: the
    # normaliser needs every logit, the [B * W, V] log-softmax itself is not needed.
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    cand = (jnp.take(logits, safe_ids[level], axis=-1) - lse).reshape(batch, num_beams, -1)
    scores, parent, code, nodes = select(level, scores, nodes, cand)
    codes = jnp.take_along_axis(codes, parent[..., None], axis=1).at[:, :, level].set(code)
    cache = gather_beams(cache, beam_axes, (parent + row_base).reshape(-1))
    return scores, nodes, codes, cache

  scores, nodes, codes, _ = jax.lax.fori_loop(1, levels, body, (scores, nodes, codes, cache))
  items = nodes if mode == "trie" else jnp.full_like(nodes, -1)
  items = jnp.where(jnp.isfinite(scores), items, -1)
  return BeamResult(items, scores, codes)


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "mode", "cache_layout"))
def constrained_beam_search(model: Llama, params: Any, prompt: jax.Array, prompt_mask: jax.Array,
                            code_token_ids: jax.Array, trie: Trie | None = None,
                            allowed_codes: jax.Array | None = None, *, num_beams: int,
                            mode: Mode = "trie", lora: Any = None,
                            cache_layout: CacheLayout = "split",
                            banned: jax.Array | None = None) -> BeamResult:
  """Top ``num_beams`` item codes per user: :func:`search_codes` on the LLaMA.

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
  _check(prompt.shape[0], mode, trie, allowed_codes, banned)
  levels = code_token_ids.shape[0]
  pre = decoding.prefill(model, params, prompt, prompt_mask, steps=levels - 1,
                         layout=cache_layout, lora=lora)
  return search_codes(decoding.logits_fn(model, params, lora), pre.logits, pre.cache,
                      pre.beam_axes, code_token_ids, trie, allowed_codes, num_beams=num_beams,
                      mode=mode, banned=banned)


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
