"""Popularity baseline: rank items by their count in the training sequences.

Every user gets the same list, so nothing of size users x items is built: the catalogue is
sorted once, and under the ``"masked"`` protocol (each user's seen items removed) a user's
top ``k`` are the first ``k`` unseen items of that one order, found among its first
``k + len(history)`` entries. Memory O(items + users x k).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lcrec_jax.data.dataset import Dataset, Split
from lcrec_jax.eval.metrics import topk_metrics


def popularity_scores(num_items: int, split: Split) -> np.ndarray:
  """``[num_items]`` training-set interaction counts."""
  return np.bincount(np.concatenate(split.train), minlength=num_items).astype(np.float64)


def rank_topk(scores: np.ndarray, k: int, num_users: int,
              exclude: Sequence[np.ndarray] | None = None) -> np.ndarray:
  """``[num_users, k]`` top item numbers of one shared ``scores [items]``, best first.

  Ties break towards the lower item number (a stable sort). ``exclude[u]`` items (user
  ``u``'s history) are removed from that user's ranking when given; ``-1`` fills a list
  when fewer than ``k`` items remain.
  """
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  k = min(k, len(order))
  if exclude is None:
    return np.broadcast_to(order[:k], (num_users, k)).copy()
  if len(exclude) != num_users:
    raise ValueError(f"exclude has {len(exclude)} rows for {num_users} users")
  out = np.full((num_users, k), -1, np.int64)
  for u, seen in enumerate(exclude):
    head = order[:k + len(seen)]
    keep = head[~np.isin(head, seen)][:k]
    out[u, :len(keep)] = keep
  return out


def evaluate_popularity(dataset: Dataset, exclude_seen: bool, k: int = 10) -> dict[str, dict]:
  """HR/NDCG of popularity on valid and test, optionally excluding seen items."""
  split = dataset.split()
  pop = popularity_scores(dataset.num_items, split)
  out = {}
  for name, examples in (("valid", split.valid), ("test", split.test)):
    exclude = [e.history for e in examples] if exclude_seen else None
    ranked = rank_topk(pop, k, len(examples), exclude)
    if ranked.shape[1] < k:  # a catalogue smaller than k
      ranked = np.concatenate([ranked, np.full((len(ranked), k - ranked.shape[1]), -1)], 1)
    out[name] = topk_metrics(ranked, np.array([e.target for e in examples]))
  return out
