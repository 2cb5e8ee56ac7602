"""Popularity at Amazon-Instruments scale: wall time and peak RSS of both protocols.

  python benchmarks/popularity_scale.py                 # 24,772 users x 9,922 items
  python benchmarks/popularity_scale.py --users=943 --items=1682

A synthetic dataset of that size (Zipf-like item popularity, geometric history lengths with
median ~6, as LC-Rec's Instruments set); ranks valid and test under both protocols with
:func:`lcrec_jax.baselines.popularity.evaluate_popularity` (one shared order, no users x
items matrix). Prints seconds and the process's peak RSS.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from lcrec_jax.baselines import popularity  # noqa: E402
from lcrec_jax.data.dataset import Dataset, Item  # noqa: E402

_USERS = flags.DEFINE_integer("users", 24772, "users")
_ITEMS = flags.DEFINE_integer("items", 9922, "items")


def synthetic(num_users: int, num_items: int, seed: int = 0) -> Dataset:
  rng = np.random.default_rng(seed)
  lens = np.maximum(3, rng.geometric(1 / 8.3, num_users))
  p = 1.0 / np.arange(1, num_items + 1) ** 0.8
  p /= p.sum()
  seqs = tuple(rng.choice(num_items, size=min(int(n), 200, num_items), replace=False, p=p
                          ).astype(np.int32) for n in lens)
  return Dataset("synthetic", tuple(Item(str(i), f"item {i}") for i in range(num_items)),
                 tuple(str(u) for u in range(num_users)), seqs)


def main(argv):
  del argv
  ds = synthetic(_USERS.value, _ITEMS.value)
  print(f"{ds.num_users} users, {ds.num_items} items, {ds.num_interactions} interactions")
  t0 = time.perf_counter()
  for exclude in (False, True):
    m = popularity.evaluate_popularity(ds, exclude_seen=exclude)["test"]
    print(f"  {'masked' if exclude else 'unmasked':<8} test HR@10 {m['HR@10']:.4f} "
          f"NDCG@10 {m['NDCG@10']:.4f}")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"popularity, both protocols: {time.perf_counter() - t0:.1f} s, peak RSS {peak:.0f} MB")


if __name__ == "__main__":
  app.run(main)
