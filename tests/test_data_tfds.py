"""TFDS builder (array_record, no TensorFlow) and grain batching of the splits."""

import pathlib
import sys

import numpy as np
import pytest

from lcrec_jax.data.dataset import Dataset, Item
from lcrec_jax.data.movielens import load_movielens_100k
from lcrec_jax.data.tfds_builder import (config_name, fingerprint, grain_batches, open_splits,
                                         split_from_tfds, write_tfds)


def _toy(seed: int = 0, num_users: int = 7, num_items: int = 9) -> Dataset:
  rng = np.random.default_rng(seed)
  items = tuple(Item(f"it{i}", f"title {i}") for i in range(num_items))
  seqs = tuple(rng.integers(0, num_items, rng.integers(3, 12)).astype(np.int32)
               for _ in range(num_users))
  return Dataset("toy set", items, tuple(f"u{u}" for u in range(num_users)), seqs)


def _assert_same_split(a, b):
  assert len(a.train) == len(b.train)
  for x, y in zip(a.train, b.train):
    np.testing.assert_array_equal(x, y)
  for xs, ys in ((a.valid, b.valid), (a.test, b.test)):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
      assert (x.user, x.target) == (y.user, y.target)
      np.testing.assert_array_equal(x.history, y.history)
      assert x.history.dtype == np.int32


def test_round_trip_toy(tmp_path):
  d = _toy()
  builder = write_tfds(d, str(tmp_path))
  assert builder.data_dir.startswith(str(tmp_path))
  assert builder.info.metadata["fingerprint"] == fingerprint(d)
  assert sorted(builder.info.splits.keys()) == ["test", "train", "validation"]
  files = [p.name for p in pathlib.Path(builder.data_dir).iterdir()]
  assert any(".array_record-" in f for f in files), files
  # Re-open from the directory alone (no Dataset), as a later process would.
  reopened = open_splits(builder.data_dir)
  _assert_same_split(split_from_tfds(reopened), d.split())
  # Record u is user u (shuffling disabled); train = history + [target].
  src = reopened.as_data_source("train")
  for u, seq in enumerate(d.split().train):
    assert src[u]["user"] == u
    np.testing.assert_array_equal(np.append(src[u]["history"], src[u]["target"]), seq)
  assert "tensorflow" not in sys.modules  # the TF-less path really is TF-less


def test_round_trip_ml100k(tmp_path):
  d = load_movielens_100k()
  builder = write_tfds(d, str(tmp_path))
  _assert_same_split(split_from_tfds(builder), d.split())
  assert len(builder.as_data_source("test")) == 943


def test_fingerprint_separates_datasets(tmp_path):
  a, b = _toy(0), _toy(1)
  assert config_name(a) != config_name(b)
  assert config_name(a).startswith("toy_set-")
  ba, bb = write_tfds(a, str(tmp_path)), write_tfds(b, str(tmp_path))
  assert ba.data_dir != bb.data_dir
  _assert_same_split(split_from_tfds(open_splits(ba.data_dir)), a.split())
  _assert_same_split(split_from_tfds(open_splits(bb.data_dir)), b.split())
  # Writing again reuses the prepared files.
  assert write_tfds(a, str(tmp_path)).data_dir == ba.data_dir
  with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset"):
    open_splits(str(tmp_path / "nothing"))


@pytest.mark.parametrize("batch_size,max_len", [(3, 4), (7, 20), (2, 1)])
def test_grain_batches_match_brute_force(tmp_path, batch_size, max_len):
  d = _toy(2)
  builder = write_tfds(d, str(tmp_path))
  batches = list(grain_batches(builder.as_data_source("test"), batch_size, max_len))
  assert len(batches) == -(-d.num_users // batch_size)
  flat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  for b in batches:  # fixed shapes, also for the last batch
    assert b["history"].shape == (batch_size, max_len) and b["history"].dtype == np.int32
    assert b["valid"].shape == (batch_size,)
  for ex in d.split().test:
    hist = ex.history[-max_len:]
    expected = np.concatenate([np.full(max_len - len(hist), -1), hist])
    np.testing.assert_array_equal(flat["history"][ex.user], expected)
    assert flat["length"][ex.user] == len(hist)
    assert flat["target"][ex.user] == ex.target and flat["user"][ex.user] == ex.user
  n = d.num_users
  assert flat["valid"][:n].all() and not flat["valid"][n:].any()
  assert (flat["user"][n:] == -1).all() and (flat["history"][n:] == -1).all()


def test_grain_drop_remainder_and_shuffle(tmp_path):
  d = _toy(3, num_users=10)
  builder = write_tfds(d, str(tmp_path))
  src = builder.as_data_source("validation")
  batches = list(grain_batches(src, 4, 6, drop_remainder=True))
  assert len(batches) == 2 and all(b["valid"].all() for b in batches)
  shuffled = list(grain_batches(src, 5, 6, shuffle_seed=0))
  users = np.concatenate([b["user"] for b in shuffled])
  assert sorted(users.tolist()) == list(range(10)) and users.tolist() != list(range(10))
  again = np.concatenate([b["user"] for b in grain_batches(src, 5, 6, shuffle_seed=0)])
  np.testing.assert_array_equal(users, again)
  targets = {ex.user: ex.target for ex in d.split().valid}
  for b in shuffled:
    for u, t in zip(b["user"], b["target"]):
      assert targets[int(u)] == t
