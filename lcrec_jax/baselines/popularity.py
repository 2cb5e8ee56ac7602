"""Popularity baseline: rank items by their count in the training sequences."""

from __future__ import annotations

import numpy as np

from lcrec_jax.data.dataset import Dataset, Split
from lcrec_jax.eval.metrics import topk_metrics


def popularity_scores(num_items: int, split: Split) -> np.ndarray:
  """``[num_items]`` training-set interaction counts."""
  return np.bincount(np.concatenate(split.train), minlength=num_items).astype(np.float64)


def rank_topk(scores: np.ndarray, k: int, exclude: list[np.ndarray] | None = None) -> np.ndarray:
  """Top-``k`` item numbers per row of ``scores [users, items]``, best first.

  Ties break towards the lower item number (stable). ``exclude[u]`` items (a user's
  history) are removed from user ``u``'s ranking when given.
  """
  scores = np.array(scores, np.float64, copy=True)
  if exclude is not None:
    for u, seen in enumerate(exclude):
      scores[u, seen] = -np.inf
  order = np.argsort(-scores, axis=1, kind="stable")
  return order[:, :k]


def evaluate_popularity(dataset: Dataset, exclude_seen: bool, k: int = 10) -> dict[str, dict]:
  """HR/NDCG of popularity on valid and test, optionally excluding seen items."""
  split = dataset.split()
  pop = popularity_scores(dataset.num_items, split)
  out = {}
  for name, examples in (("valid", split.valid), ("test", split.test)):
    scores = np.broadcast_to(pop, (len(examples), dataset.num_items))
    exclude = [e.history for e in examples] if exclude_seen else None
    ranked = rank_topk(scores, k, exclude)
    out[name] = topk_metrics(ranked, np.array([e.target for e in examples]))
  return out
