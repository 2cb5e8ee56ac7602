"""Shared last step of every loader: counted skips, short users, the :class:`Dataset`.

Skips are never silent: each kind is counted in ``Dataset.stats`` under a fixed name and
logged once (absl, WARNING) with its count and the first few places it happened.
"""

from __future__ import annotations

import collections
from typing import Mapping, Sequence

from absl import logging
import numpy as np

from lcrec_jax.data.dataset import MIN_INTERACTIONS, Dataset, Item
from lcrec_jax.data.errors import DataError

_MAX_EXAMPLES = 5


class SkipLog:
  """Counts skipped input by kind and remembers where the first few came from."""

  def __init__(self):
    self.counts: dict[str, int] = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)

  def skip(self, kind: str, where: str, n: int = 1) -> None:
    """Record ``n`` skipped units of ``kind`` found at ``where`` (e.g. ``"file:12"``)."""
    self.counts[kind] += n
    if len(self.examples[kind]) < _MAX_EXAMPLES:
      self.examples[kind].append(where)

  def log(self, dataset_name: str) -> None:
    for kind, n in sorted(self.counts.items()):
      if n:
        logging.warning("dataset %s: skipped %d (%s), first at: %s", dataset_name, n, kind,
                        "; ".join(self.examples[kind]))


def user_order(user_ids: Sequence[str]) -> list[str]:
  """Sort external user ids: numerically when all are integers, else as strings."""
  ids = list(user_ids)
  if all(u.lstrip("-").isdigit() for u in ids):
    return sorted(ids, key=int)
  return sorted(ids)


def assemble(name: str, items: Sequence[Item], sequences: Mapping[str, np.ndarray],
             skips: SkipLog, stats: Mapping[str, int] | None = None,
             user_text: Mapping[str, Mapping[str, object]] | None = None,
             source: str | None = None) -> Dataset:
  """Drop users with too few interactions (counted), then build the :class:`Dataset`.

  Args:
    name: dataset name.
    items: the catalogue in internal item order.
    sequences: external user id -> ``[len]`` int32 internal item numbers in time order,
      in the final user order.
    skips: skips recorded so far; ``users_too_short`` and
      ``interactions_of_short_users`` are added here. All kinds go into ``stats``.
    stats: further counts to report (not skips), e.g. ``repeat_interactions``.
    user_text: optional per-user text keyed by external user id.
    source: the interaction file, named by the error for an empty dataset.

  Returns:
    The dataset, with ``stats`` holding every skip count (zeros included for the kinds
    every loader reports), the extra counts, and ``items_without_interactions``
    (catalogue items no kept user interacted with; they stay in the catalogue).
    ``user_text`` of dropped users is dropped with them.

  Raises:
    DataError: no user is left (an empty or header-only interaction file, or every
      user below ``MIN_INTERACTIONS``): there is nothing to split, train or evaluate.
  """
  kept_ids, kept_seqs = [], []
  for uid, seq in sequences.items():
    if len(seq) < MIN_INTERACTIONS:
      skips.skip("users_too_short", f"user {uid!r} ({len(seq)} interactions)")
      skips.skip("interactions_of_short_users", f"user {uid!r}", n=len(seq))
      continue
    kept_ids.append(uid)
    kept_seqs.append(np.asarray(seq, np.int32))
  skips.log(name)
  if not kept_ids:
    read = int(sum(len(s) for s in sequences.values()))
    raise DataError(source or name, f"no usable user: {len(sequences)} users and {read} "
                    f"interactions read, and a user needs at least {MIN_INTERACTIONS} "
                    "interactions with known items (leave-one-out split)")
  all_stats = {"users_too_short": 0, "interactions_of_short_users": 0,
               "interactions_unknown_item": 0}
  all_stats.update(skips.counts)
  all_stats.update(stats or {})
  used = np.zeros(len(items), bool)
  for seq in kept_seqs:
    used[seq] = True
  all_stats["items_without_interactions"] = int(len(items) - used.sum())
  logging.info("dataset %s: %d items, %d users, %d interactions", name, len(items),
               len(kept_ids), int(sum(len(s) for s in kept_seqs)))
  kept = set(kept_ids)
  text = {u: t for u, t in (user_text or {}).items() if u in kept}
  return Dataset(name=name, items=tuple(items), user_ids=tuple(kept_ids),
                 sequences=tuple(kept_seqs), user_text=text,
                 stats={k: int(v) for k, v in all_stats.items()})
