"""Full-ranking top-K metrics: HR@K and NDCG@K with one relevant item per user.

With a single target, NDCG@K = 1 / log2(rank + 2) if the target is at 0-based ``rank``
< K, else 0 (the ideal DCG is 1). Invalid or missing beams are ``-1`` and never match.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
DEFAULT_NDCG_KS = (5, 10)


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based rank of each target in its user's list; ``-1`` when absent.

  Args:
    ranked: ``[users, beams]`` item numbers, best first (``-1`` = invalid beam).
    targets: ``[users]`` item numbers.
  """
  ranked, targets = np.asarray(ranked), np.asarray(targets)
  if ranked.ndim != 2 or targets.shape != (ranked.shape[0],):
    raise ValueError(f"ranked must be [users, beams] and targets [users]; got "
                     f"{ranked.shape} and {targets.shape}")
  hit = (ranked == targets[:, None]) & (ranked >= 0)
  return np.where(hit.any(1), hit.argmax(1), -1)


def topk_metrics(ranked: np.ndarray, targets: np.ndarray, hr_ks: Sequence[int] = DEFAULT_KS,
                 ndcg_ks: Sequence[int] = DEFAULT_NDCG_KS) -> dict[str, float]:
  """Mean ``HR@K`` and ``NDCG@K`` over users (see module docstring)."""
  ranked = np.asarray(ranked)
  need = max(list(hr_ks) + list(ndcg_ks))
  if ranked.shape[1] < need:
    raise ValueError(f"{ranked.shape[1]} ranked items per user, fewer than the largest K={need}")
  ranks = target_ranks(ranked, targets)
  found = ranks >= 0
  out = {}
  for k in hr_ks:
    out[f"HR@{k}"] = float(np.mean(found & (ranks < k)))
  for k in ndcg_ks:
    gain = np.where(found & (ranks < k), 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
    out[f"NDCG@{k}"] = float(np.mean(gain))
  return out


def summarize_templates(per_template: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
  """LC-Rec reports mean/min/max over prompt templates: ``{"mean": {...}, "min": ..., "max": ...}``."""
  keys = per_template[0].keys()
  return {agg: {k: float(fn([m[k] for m in per_template])) for k in keys}
          for agg, fn in (("mean", np.mean), ("min", np.min), ("max", np.max))}
