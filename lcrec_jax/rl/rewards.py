"""Rewards of a rollout group, matched to the beams by their position in the group.

A rollout is ``P`` prompts x ``G`` beams of the constrained beam search, best first
(:mod:`lcrec_jax.rl.rollout`). Every reward here is an array ``[P, G]`` whose entry
``[p, g]`` belongs to beam ``g`` of prompt ``p``: rewards are computed from the beams'
item numbers and codes, never looked up by prompt text (reproductions of MiniOneRec
credited rewards to the wrong samples that way when two prompts had the same text).

* :func:`ranking_reward`: MiniOneRec's "ranking" reward (arXiv 2510.24431; its ``rl.py``
  sums a rule reward and an NDCG-style penalty): 1 for the beam that is the target;
  in a group that contains the target, each wrong beam at rank ``g`` (0-based) gets
  ``-(1 / log2(g + 2)) / sum_j 1 / log2(j + 2)`` (the penalties of a whole group sum to
  -1); a group without the target gets 0 everywhere.
* :func:`partial_credit_reward`: the share of code levels the beam's code matches the
  target's, counted from the first level as long as they agree (a trie prefix), in
  ``[0, 1]``; 1 only for the target itself.
* further rewards are callables ``(prompt_rows [P], items [P, G]) -> [P, G]`` that
  :func:`combine` weights in by name, e.g. the collaborative reward ``"collab"`` (the
  in-project SASRec's score of each beam's item, ``rl.reward_collab``:
  :mod:`lcrec_jax.rl.collab`).

Beams that are no item (``-1``: fewer allowed items than beams) get 0 from every reward
and are masked out of the loss by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

RewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (prompt rows [P], items [P, G])


def rank_penalties(num_generations: int) -> np.ndarray:
  """``[G]`` float64: ``-(1 / log2(g + 2)) / sum_j 1 / log2(j + 2)``; sums to -1."""
  w = 1.0 / np.log2(np.arange(num_generations, dtype=np.float64) + 2.0)
  return -w / w.sum()


def ranking_reward(items: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """MiniOneRec's ranking reward (see the module docstring).

  Args:
    items: ``[P, G]`` item numbers of the beams, best first (``-1`` = no item).
    targets: ``[P]`` each prompt's target item.

  Returns:
    ``[P, G]`` float64.
  """
  items = np.asarray(items, np.int64)
  hit = items == np.asarray(targets, np.int64)[:, None]                 # [P, G]
  has_hit = hit.any(axis=1, keepdims=True)                              # [P, 1]
  pen = np.broadcast_to(rank_penalties(items.shape[1]), items.shape)
  out = np.where(hit, 1.0, np.where(has_hit, pen, 0.0))
  return np.where(items >= 0, out, 0.0)


def prefix_match_levels(codes: np.ndarray, target_codes: np.ndarray) -> np.ndarray:
  """``[P, G]`` int: leading code levels each beam shares with its prompt's target.

  Args:
    codes: ``[P, G, L]`` the beams' codes.
    target_codes: ``[P, L]`` the targets' codes.
  """
  same = np.asarray(codes) == np.asarray(target_codes)[:, None, :]      # [P, G, L]
  return np.cumprod(same, axis=2).sum(axis=2)


def partial_credit_reward(items: np.ndarray, codes: np.ndarray,
                          target_codes: np.ndarray) -> np.ndarray:
  """``[P, G]`` float64 in [0, 1]: matching leading levels / L (0 for a ``-1`` beam)."""
  levels = np.asarray(codes).shape[2]
  out = prefix_match_levels(codes, target_codes) / float(levels)
  return np.where(np.asarray(items) >= 0, out, 0.0)


def combine(items: np.ndarray, codes: np.ndarray, targets: np.ndarray,
            target_codes: np.ndarray, weights: Mapping[str, float],
            extra: Mapping[str, RewardFn] | None = None,
            prompt_rows: np.ndarray | None = None) -> np.ndarray:
  """Weighted sum of the rewards named in ``weights`` (zero weights are not computed).

  Args:
    items: ``[P, G]`` beam items; codes ``[P, G, L]`` their codes.
    targets: ``[P]`` target items; target_codes ``[P, L]`` theirs.
    weights: ``{"ranking": w, "partial": w, <name in extra>: w}``.
    extra: further rewards by name, each ``(prompt_rows [P], items [P, G]) -> [P, G]``
      (e.g. a collaborative model's score of each beam's item).
    prompt_rows: ``[P]`` the prompts' rows in the prompt set, passed to ``extra``.

  Returns:
    ``[P, G]`` float64.
  """
  extra = dict(extra or {})
  total = np.zeros(np.shape(items), np.float64)
  for name, w in weights.items():
    if not w:
      continue
    if name == "ranking":
      r = ranking_reward(items, targets)
    elif name == "partial":
      r = partial_credit_reward(items, codes, target_codes)
    elif name in extra:
      r = np.where(np.asarray(items) >= 0,
                   np.asarray(extra[name](prompt_rows, items), np.float64), 0.0)
    else:
      raise ValueError(f"unknown reward {name!r}; known: ranking, partial, {sorted(extra)}")
    if r.shape != total.shape:
      raise ValueError(f"reward {name!r} has shape {r.shape}, the group is {total.shape}")
    total += float(w) * r
  return total
