"""How often one epoch labels each next-item training target: sampled prefixes vs windows.

MovieLens-100K, the quick recipe's task settings (configs/ml100k_quick.py: seed 42,
max_history 20, 12,000 of the 97,171 seqrec prefixes and 2,000 fusionseqrec ones, history
loss on both). A training target is position t >= 1 of a user's training sequence; an
example labels it when the target is its response, or (history loss) when the item is in
its history as codes. For each way of building seqrec examples this prints the share of
targets labelled 0, 1, 2, 3+ times per epoch, the mean, and the mean number of items of
context (earlier items in the same example) a label sees:

  today     seqrec = 12,000 sampled prefixes (+ fusionseqrec's code histories)
  windows   seqrec = consecutive windows of 21 items, stride 21 (tasks.seqrec_windows)

  python benchmarks/seqrec_coverage.py
"""

from __future__ import annotations

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from lcrec_jax.data.loaders import load_dataset  # noqa: E402

from lcrec_jax.pipeline import spec  # noqa: E402
from lcrec_jax.index.item_index import ItemIndex  # noqa: E402
from lcrec_jax.tasks import builders, prompts  # noqa: E402

SEED, MAX_HISTORY = 42, 20


def _index(dataset) -> ItemIndex:
  """Random distinct codes (coverage does not depend on them)."""
  rng = np.random.default_rng(0)
  flat = rng.choice(256 ** 2, size=dataset.num_items, replace=False)
  codes = np.stack([flat // 256, flat % 256], 1).astype(np.int32)
  return ItemIndex(tuple(it.item_id for it in dataset.items), codes, (256, 256))


def _labels(examples, split):
  """Counter (user, t) -> times labelled, and the context sizes of every label."""
  counts, context = collections.Counter(), []
  for e in examples:
    tmpl = prompts.templates(e.task)[e.meta["template_id"]]
    u = e.meta["user"]
    pos = {int(i): t for t, i in enumerate(split.train[u])}
    items = list(e.meta["history"]) if "{history}" in tmpl.instruction else []
    if "{item}" in tmpl.response:  # the target's code is the response
      items.append(e.meta["target"])
    for k, i in enumerate(items):
      counts[(u, pos[int(i)])] += 1
      context.append(k)
  return counts, context


def _report(name, examples, split):
  counts, context = _labels(examples, split)
  per = np.asarray([counts[(u, t)] for u, tr in enumerate(split.train)
                    for t in range(1, len(tr))])
  print(f"{name:<34}{len(examples):>9}{per.mean():>7.2f}{(per == 0).mean():>8.1%}"
        f"{(per == 1).mean():>8.1%}{(per == 2).mean():>8.1%}{(per >= 3).mean():>8.1%}"
        f"{np.mean(context):>9.1f}")


def main() -> None:
  ds = load_dataset(spec.section_settings("data", {"format": "movielens", "path": "", "name": "ml-100k"}))
  index, split = _index(ds), ds.split()
  targets = sum(max(len(t) - 1, 0) for t in split.train)
  print(f"ML-100K: {targets} training targets (t >= 1), {ds.num_users} users")
  print(f"{'seqrec examples':<34}{'examples':>9}{'mean':>7}{'0x':>8}{'1x':>8}{'2x':>8}"
        f"{'3x+':>8}{'context':>9}")
  kw = dict(seed=SEED, max_history=MAX_HISTORY, split=split)
  today = builders.build_task("seqrec", ds, index, sample_num=12000, **kw)
  fusion = builders.build_task("fusionseqrec", ds, index, sample_num=2000, **kw)
  windows = builders.build_task("seqrec", ds, index, seqrec_windows=True, **kw)
  _report("today: 12,000 sampled prefixes", today, split)
  _report("today + fusionseqrec 2,000", today + fusion, split)
  _report("windows of 21 (all)", windows, split)
  _report("windows + fusionseqrec 2,000", windows + fusion, split)


if __name__ == "__main__":
  main()
