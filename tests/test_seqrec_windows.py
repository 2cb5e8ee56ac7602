"""Seqrec as consecutive windows (tasks.seqrec_windows): every training target once per epoch.

Brute force on a random dataset: per (user, position) how often an example labels it
(history codes with the history loss, or the response); the leave-one-out valid/test items
never appear; the batch labels are exactly the window's codes.
"""

from __future__ import annotations

import collections

import ml_collections
import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.data.dataset import Dataset, Item
from lcrec_jax.errors import ConfigError
from lcrec_jax.tasks import batching, builders
from tests.test_grain_batches import CODE_IDS, WordTokenizer
from tests.test_tasks import random_index


def _dataset(num_users=40, num_items=150, seed=0) -> Dataset:
  rng = np.random.default_rng(seed)
  items = tuple(Item(f"i{k}", f"Title {k}", {"genres": "Drama"}) for k in range(num_items))
  lengths = rng.integers(3, 60, num_users)
  lengths[:4] = (3, 4, 5, 6)  # one training item (no target), then 2, 3, 4
  seqs = tuple(rng.permutation(num_items)[:n].astype(np.int32) for n in lengths)
  return Dataset("windows", items, tuple(f"u{k}" for k in range(num_users)), seqs)


@pytest.mark.parametrize("max_history", [1, 5, 20])
def test_every_training_target_labelled_exactly_once(max_history):
  ds = _dataset()
  index = random_index([it.item_id for it in ds.items], levels=3, size=8)
  ex = builders.build_task("seqrec", ds, index, max_history=max_history, seqrec_windows=True)
  split = ds.split()
  counts = collections.Counter()
  for e in ex:
    u = e.meta["user"]
    train = [int(i) for i in split.train[u]]
    pos = [train.index(i) for i in e.meta["history"] + (e.meta["target"],)]
    assert pos == list(range(pos[0], pos[0] + len(pos)))  # consecutive, in time order
    assert 1 <= len(e.meta["history"]) <= max_history
    counts.update((u, t) for t in pos)
    held_out = {int(i) for i in ds.sequences[u][len(train):]}  # valid and test targets
    assert not held_out & set(e.meta["items"])
    codes = {index.item_code_str(i) for i in held_out}
    assert not any(c in e.instruction or c in e.response for c in codes)
  for u, train in enumerate(split.train):
    for t in range(1, len(train)):
      assert counts[(u, t)] == 1, (u, t)
    assert counts[(u, 0)] <= 1
  assert set(counts.values()) == {1}


def test_windows_batch_labels_every_window_code():
  """With the history loss, a window's batch row labels all its items' codes + EOS."""
  ds = _dataset(num_users=10)
  index = random_index([it.item_id for it in ds.items], levels=3, size=8)
  ex = builders.build_task("seqrec", ds, index, max_history=4, seqrec_windows=True)
  tok = WordTokenizer()
  data = batching.tokenize_examples(ex, tok, (256,))
  batch = batching.collate(data.prompts, data.responses, [True] * len(data), [True] * len(data),
                           256, tok.pad_id, CODE_IDS)
  labelled = (batch["labels"] != batching.IGNORE).sum(1)
  want = [3 * len(e.meta["items"]) + 1 for e in ex]  # 3 levels per item, and the EOS
  np.testing.assert_array_equal(labelled, want)


def test_prefixes_unchanged_by_default():
  ds = _dataset(num_users=10)
  index = random_index([it.item_id for it in ds.items], levels=3, size=8)
  a = builders.build_task("seqrec", ds, index, max_history=5)
  split = ds.split()
  assert len(a) == sum(max(len(t) - 1, 0) for t in split.train)


def test_spec_windows_need_history_loss_on_seqrec():
  c = spec.resolve(ml_collections.ConfigDict())
  c.tasks.seqrec_windows = True
  c.tasks.history_loss_tasks = ("fusionseqrec",)
  with pytest.raises(ConfigError, match="tasks.seqrec_windows"):
    spec.validate(c)
  c.tasks.history_loss_tasks = ("seqrec",)
  spec.validate(c)
