"""Baselines: popularity without a dense matrix, device top-k ranking, length-bucketed
SASRec/GRU4Rec, learning a deterministic pattern, and the stage's incremental results."""

import functools
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from lcrec_jax.baselines import gru4rec, popularity, sasrec, sequential
from lcrec_jax.pipeline.stages import baseline as stage_lib
from lcrec_jax.data.dataset import Dataset, Item
from lcrec_jax.errors import ConfigError


def _dense_reference(scores, k, exclude):
  """The former implementation: a users x items matrix, seen items -inf, stable argsort."""
  s = np.array(scores, np.float64, copy=True)
  if exclude is not None:
    for u, seen in enumerate(exclude):
      s[u, seen] = -np.inf
  return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_popularity_equals_dense_reference_with_ties_and_exclusions():
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 5, size=40).astype(np.float64)   # many ties
  hist = [rng.choice(40, size=n, replace=False) for n in (0, 3, 12, 30)]
  dense = np.broadcast_to(counts, (len(hist), 40))
  for exclude in (None, hist):
    got = popularity.rank_topk(counts, 10, len(hist), exclude)
    np.testing.assert_array_equal(got, _dense_reference(dense, 10, exclude))
  # only 3 unseen items left: the rest of the list is -1, never a seen item
  got = popularity.rank_topk(counts, 10, 1, [np.arange(37)])
  assert sorted(got[0][:3].tolist()) == [37, 38, 39] and (got[0][3:] == -1).all()
  np.testing.assert_array_equal(got[0][:3], _dense_reference(counts[None], 3, [np.arange(37)])[0])


def test_device_topk_equals_numpy_argsort_both_protocols():
  """Batches of 4 users, histories in three length buckets, integer scores with ties."""
  rng = np.random.default_rng(1)
  n = 50
  table = rng.integers(0, 6, size=(n + 1, n)).astype(np.float32)  # score rows by last item
  hist = [rng.choice(n, size=m, replace=False) for m in (1, 3, 9, 12, 20, 40, 45, 7, 2)]
  max_len = 16

  def last_scores(x):  # [B, T] left-padded, shifted ids -> [B, n]
    return jax.numpy.asarray(table)[x[:, -1]]

  got = sequential.rank_topk(last_scores, hist, n, max_len, k=20, batch_size=4)
  scores = np.stack([table[h[-1] + 1] for h in hist])
  np.testing.assert_array_equal(got["unmasked"], _dense_reference(scores, 20, None))
  want = _dense_reference(scores, 20, hist)
  masked = got["masked"]
  for u, h in enumerate(hist):
    left = n - len(h)
    np.testing.assert_array_equal(masked[u, :left], want[u, :min(left, 20)][:left])
    assert (masked[u, left:] == -1).all() and not set(masked[u].tolist()) & set(h.tolist())


def _models(num_items=30, max_len=32):
  return [sasrec.SASRec(num_items, max_len, dim=16, num_blocks=2, num_heads=2, dropout=0.2),
          gru4rec.GRU4Rec(num_items, max_len, dim=16, hidden=24, num_layers=2, dropout=0.3)]


@pytest.mark.parametrize("index", [0, 1], ids=["sasrec", "gru4rec"])
def test_bucketed_batches_equal_max_len_padding(index):
  """Loss and last-position scores of the same sequences at bucket length 8 and at max_len."""
  model = _models()[index]
  rng = np.random.default_rng(2)
  seqs = [rng.integers(0, 30, size=m) for m in (2, 5, 9)]  # 1, 4, 8 inputs: bucket 8
  inputs, targets = sequential.training_pairs(seqs, model.max_len)
  idx = np.array([0, 1, 2, -1])  # with an empty row, as the last batch of a bucket has
  x8, y8 = sequential.make_batch(inputs, targets, idx, 8)
  x32, y32 = sequential.make_batch(inputs, targets, idx, 32)
  params = model.init(jax.random.PRNGKey(0), x8, train=False)["params"]
  loss = jax.jit(functools.partial(sequential.loss_fn, model, train=False))
  apply = jax.jit(functools.partial(model.apply, train=False))
  l8, l32 = loss(params, x8, y8), loss(params, x32, y32)
  assert np.isfinite(float(l8)) and float(l8) > 0
  np.testing.assert_allclose(float(l8), float(l32), rtol=1e-5)
  h8 = apply({"params": params}, x8)[:3, -1]
  h32 = apply({"params": params}, x32)[:3, -1]
  np.testing.assert_allclose(np.asarray(h8), np.asarray(h32), atol=1e-5)


def _unique_sequences(lengths, max_item=10_000):
  """Sequences whose items are all distinct, so a label names its (sequence, index)."""
  out, start = [], 0
  for n in lengths:
    out.append(np.arange(start, start + n) % max_item)
    start += n
  return out


def test_training_pairs_every_target_once_with_its_previous_max_len_items():
  """Brute force: target s[i] must be labelled once, after exactly s[i - L:i] (or all of
  s[:i]), the row's items before it being a contiguous run of s ending at s[i - 1]."""
  L = 4
  seqs = _unique_sequences([0, 1, 2, 3, 4, 5, 8, 9, 12, 17])
  inputs, labels = sequential.training_pairs(seqs, L)
  where = {int(it): (u, i) for u, s in enumerate(seqs) for i, it in enumerate(s)}
  seen = []
  for x, y in zip(inputs, labels):
    assert len(x) == len(y) <= sequential.window_len(L) and (y >= 0).any()
    assert (y[:-L] == -1).all()                       # labels only on the last L positions
    for p in np.flatnonzero(y >= 0):
      u, i = where[int(y[p])]
      s = seqs[u]
      before = x[:p + 1]
      np.testing.assert_array_equal(before, s[i - len(before):i])  # contiguous, ends at s[i-1]
      np.testing.assert_array_equal(before[-L:], s[max(0, i - L):i])
      seen.append((u, i))
  want = [(u, i) for u, s in enumerate(seqs) for i in range(1, len(s))]
  assert sorted(seen) == want                          # every target, exactly once


def test_one_epoch_of_batches_labels_every_target_once():
  """Through epoch_batches + make_batch (buckets, padding rows): the labels of one epoch
  are the targets, once each, and the loss ignores the context positions."""
  L = 8
  seqs = _unique_sequences([2, 5, 9, 16, 17, 30, 41], max_item=200)
  inputs, labels = sequential.training_pairs(seqs, L)
  buckets = sequential.length_buckets(sequential.window_len(L))
  lengths = np.asarray([len(x) for x in inputs])
  got = []
  for b, idx in sequential.epoch_batches(lengths, 3, buckets, np.random.default_rng(0)):
    x, y = sequential.make_batch(inputs, labels, idx, b)
    assert x.shape == y.shape == (3, b) and (y[:, :-L] == -1).all()
    got += y[y >= 0].tolist()
  assert sorted(got) == sorted(int(t) for s in seqs for t in s[1:])


def test_sasrec_attention_band_and_label_span_loss():
  """One block, no dropout: the state at position p ignores items more than max_len - 1
  before it; the loss over the last max_len positions equals the loss over all of them
  when labels lie only there."""
  L = 4
  model = sasrec.SASRec(30, L, dim=16, num_blocks=1, num_heads=2, dropout=0.0, inner=32,
                        act="gelu")
  rng = np.random.default_rng(3)
  x = rng.integers(1, 31, size=(2, 2 * L - 1)).astype(np.int32)
  params = model.init(jax.random.PRNGKey(0), x, train=False)["params"]
  h = np.asarray(model.apply({"params": params}, x, train=False))
  x2 = x.copy()
  x2[:, 0] = x[:, 0] % 30 + 1            # another item at position 0: in the band of 0..L-1
  h2 = np.asarray(model.apply({"params": params}, x2, train=False))
  np.testing.assert_allclose(h2[:, L:], h[:, L:], atol=1e-5)
  assert np.abs(h2[:, :L] - h[:, :L]).max(axis=(0, 2)).min() > 1e-4
  y = np.full(x.shape, -1, np.int32)
  y[:, -L:] = rng.integers(0, 30, size=(2, L))
  full = sequential.loss_fn(model, params, x, y, train=False)
  span = sequential.loss_fn(model, params, x, y, train=False, label_span=L)
  np.testing.assert_allclose(float(span), float(full), rtol=1e-6)


def test_epoch_batches_cover_every_row_once_in_its_bucket():
  lengths = np.array([1, 3, 8, 9, 16, 17, 50, 49, 2, 33])
  buckets = sequential.length_buckets(50)
  assert buckets == (8, 16, 32, 50)
  batches = sequential.epoch_batches(lengths, 3, buckets, np.random.default_rng(0))
  rows = np.concatenate([idx[idx >= 0] for _, idx in batches])
  assert sorted(rows.tolist()) == list(range(len(lengths)))
  for b, idx in batches:
    assert len(idx) == 3 and (lengths[idx[idx >= 0]] <= b).all()
    assert all(sequential.bucket_of(int(lengths[i]), buckets) == b for i in idx[idx >= 0])


def _cycle_dataset(num_items=20, num_users=120, seed=0):
  """Every user walks i -> i + 1 (mod N) from a random start: the next item is certain."""
  rng = np.random.default_rng(seed)
  seqs = tuple(((rng.integers(num_items) + np.arange(rng.integers(5, 16))) % num_items
                ).astype(np.int32) for _ in range(num_users))
  items = tuple(Item(str(i), f"item {i}") for i in range(num_items))
  return Dataset("cycle", items, tuple(str(u) for u in range(num_users)), seqs)


@pytest.mark.parametrize("name", ["gru4rec", "sasrec"])
def test_sequential_baselines_learn_a_deterministic_pattern(name):
  ds = _cycle_dataset()
  if name == "gru4rec":
    cfg = gru4rec.GRU4RecConfig(max_len=8, dim=32, hidden=32, dropout=0.0, lr=1e-2,
                                batch_size=32, epochs=30, eval_every=10, patience=3)
    res = gru4rec.train_and_evaluate(ds, cfg)
  else:
    cfg = sasrec.SASRecConfig(max_len=8, dim=32, num_blocks=1, num_heads=1, dropout=0.0,
                              lr=1e-2, batch_size=32, epochs=30, eval_every=10, patience=3)
    res = sasrec.train_and_evaluate(ds, cfg)
  for protocol in ("unmasked", "masked"):
    assert res[protocol]["test"]["HR@1"] >= 0.95, (protocol, res[protocol])
    assert res[protocol]["best_epoch"] in (10, 20, 30)
  assert [h["epoch"] for h in res["history"]] == [10, 20, 30][:len(res["history"])]
  assert res["config"]["max_len"] == 8


def _config(models, epochs=2):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.baseline = ml_collections.ConfigDict()
  c.baseline.models = models
  small = dict(max_len=8, dim=16, lr=1e-3, batch_size=64, epochs=epochs, eval_every=1,
               patience=2)  # one length bucket: one compile
  c.baseline.sasrec = ml_collections.ConfigDict(dict(small, num_blocks=1))
  c.baseline.gru4rec = ml_collections.ConfigDict(dict(small, hidden=16))
  return c


def test_stage_writes_each_model_when_it_finishes_and_resumes(tmp_path, monkeypatch):
  ds = _cycle_dataset(num_users=40)
  workdir = str(tmp_path)
  path = os.path.join(workdir, "baselines", "results.json")

  def boom(dataset, config):
    raise KeyboardInterrupt  # the stage is stopped while SASRec trains

  monkeypatch.setitem(stage_lib.RUNNERS, "sasrec", boom)
  with pytest.raises(KeyboardInterrupt):
    stage_lib.run_baseline_stage(_config(("popularity", "sasrec", "gru4rec")), workdir, ds)
  # (the real SASRec and GRU4Rec share their training loop: GRU4Rec stands for both below)
  with open(path) as f:
    saved = json.load(f)
  assert set(saved) == {"popularity"}  # written before SASRec started
  monkeypatch.undo()

  def no_rerun(dataset, config):
    raise AssertionError("popularity was already in results.json")

  monkeypatch.setitem(stage_lib.RUNNERS, "popularity", no_rerun)
  out = stage_lib.run_baseline_stage(_config(("popularity", "gru4rec")), workdir, ds)
  with open(path) as f:
    assert json.load(f).keys() == out.keys() == {"popularity", "gru4rec"}
  assert out["gru4rec"]["epochs_run"] == 2 and out["gru4rec"]["seconds"] > 0
  assert out["gru4rec"]["seed"] == 0 and out["gru4rec"]["data"] == {
      "name": "cycle", "items": 20, "valid_users": 40, "test_users": 40}
  for protocol in ("unmasked", "masked"):
    assert set(out["gru4rec"][protocol]) == {"valid", "test", "best_epoch"}
  lines = stage_lib.summary_lines(out)
  assert len(lines) == 4 and sum("seen items excluded" in ln for ln in lines) == 2
  assert any(ln.startswith("baseline GRU4Rec") for ln in lines)
  assert not [n for n in os.listdir(os.path.dirname(path)) if ".tmp" in n]


def test_stage_config_errors(tmp_path):
  ds = _cycle_dataset(num_users=10)
  with pytest.raises(ConfigError, match="baseline.models"):
    stage_lib.run_baseline_stage(_config(("popularity", "bert4rec")), str(tmp_path), ds)
  cfg = _config(("gru4rec",))
  cfg.baseline.gru4rec.hiden = 8
  with pytest.raises(ConfigError, match="baseline.gru4rec"):
    stage_lib.run_baseline_stage(cfg, str(tmp_path), ds)
