"""RQ-VAE trainer (checkpoints, exact resume), report and the whole index stage."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import ml100k_quick
from lcrec_jax.data.dataset import Dataset, Item
from lcrec_jax.index import report as report_lib
from lcrec_jax.pipeline.stages import index as stage
from lcrec_jax.index import trainer
from lcrec_jax.index.item_index import ItemIndex

N, D = 120, 16


def _config():
  """Tiny recipe: dropout and batch norm on, so RNG and batch stats must resume too."""
  c = ml100k_quick.get_config()
  r = c.rqvae
  r.encoder_layers = (24,)
  r.e_dim = 8
  r.num_levels = 2
  r.codebook_size = 8
  r.dropout = 0.1
  r.batch_norm = True
  r.sk_epsilons = (0.0, 0.003)
  r.kmeans_iters = 10
  r.warmup_epochs = 1
  r.batch_size = 32   # 4 steps per epoch, the last one with 24 items
  r.epochs = 6
  r.eval_every = 2
  r.checkpoint_every = 3
  r.keep_checkpoints = 2
  c.index.repair_rounds = 5
  return c


def _embeddings(seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(5, D))
  x = centers[rng.integers(0, 5, N)] + 0.1 * rng.normal(size=(N, D))
  x[-3:] = x[0]  # identical items: only the uniqueness step separates them
  return x.astype(np.float32)


def _dataset():
  items = tuple(Item(f"m{i}", f"movie {i}") for i in range(N))
  seqs = tuple(np.arange(u * 5, u * 5 + 5, dtype=np.int32) for u in range(4))
  return Dataset("toy", items, tuple(f"u{u}" for u in range(4)), seqs)


def _leaves(variables):
  return [np.asarray(l) for l in jax.tree.leaves(variables)]


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
  c = _config()
  x = _embeddings()
  _, full_vars, full_hist = trainer.train_rqvae(c.rqvae, x, str(tmp_path / "a" / "index"), seed=7)
  assert [r["epoch"] for r in full_hist] == [1, 2, 3, 4, 5, 6]
  assert [r["collision_rate"] is not None for r in full_hist] == [False, True] * 3
  assert full_hist[-1]["lr"] == pytest.approx(1e-3 / 20, rel=1e-5)  # linear decay

  # Same run, then "interrupted" after epoch 5: the epoch-6 checkpoint never got written
  # (metrics rows and best checkpoints past epoch 3 exist, as after a real crash).
  wd = tmp_path / "b"
  trainer.train_rqvae(c.rqvae, x, str(wd / "index"), seed=7)
  ckpts = wd / "index" / "checkpoints"
  assert sorted(os.listdir(ckpts / "latest")) == ["3", "6"]
  shutil.rmtree(ckpts / "latest" / "6")
  _, res_vars, res_hist = trainer.train_rqvae(c.rqvae, x, str(wd / "index"), seed=7)

  for a, b in zip(_leaves(full_vars), _leaves(res_vars), strict=True):
    np.testing.assert_array_equal(a, b)
  assert "batch_stats" in res_vars
  drop = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]
  assert drop(res_hist) == drop(full_hist)
  with open(wd / "index" / "metrics.jsonl") as f:
    assert [json.loads(l)["epoch"] for l in f] == [1, 2, 3, 4, 5, 6]

  # A different seed is a different run: refuse to resume it.
  with pytest.raises(ValueError, match="seed"):
    trainer.train_rqvae(c.rqvae, x, str(wd / "index"), seed=8)
  c.rqvae.codebook_size = 16  # other shapes: named in the error, not an orbax failure
  with pytest.raises(ValueError, match="rqvae.codebook_size"):
    trainer.train_rqvae(c.rqvae, x, str(wd / "index"), seed=7)


def test_level_usage_matches_definitions():
  codes = np.array([[0, 1], [0, 2], [1, 2], [3, 2]])
  u = report_lib.level_usage(codes, [4, 4])
  assert u["utilization"] == [0.75, 0.5]
  p0 = np.array([2, 1, 1]) / 4
  assert u["perplexity"][0] == pytest.approx(np.exp(-(p0 * np.log(p0)).sum()))
  assert u["max_items_per_level_code"] == [2, 3]
  assert u["codes_used"] == [3, 2] and u["distinct_prefixes"] == [3, 4]
  u = report_lib.level_usage(np.arange(8)[:, None], [8])
  assert u["perplexity"] == [pytest.approx(8.0)] and u["utilization"] == [1.0]


def test_stage_writes_index_report_plot_and_skips_when_done(tmp_path, monkeypatch):
  c = _config()
  x = _embeddings()
  ds = _dataset()
  wd = str(tmp_path)
  index = stage.run_index_stage(c, wd, ds, x)
  paths = stage.index_paths(wd)

  assert index.is_conflict_free() and index.num_items == N
  assert index.item_ids == tuple(it.item_id for it in ds.items)
  with open(paths["index"]) as f:
    raw = json.load(f)
  assert list(raw) == [f"m{i}" for i in range(N)] and raw["m0"][0].startswith("<a_")
  loaded = ItemIndex.load(paths["index"], level_sizes=index.level_sizes)
  np.testing.assert_array_equal(loaded.codes, index.codes)

  with open(paths["report"]) as f:
    rep = json.load(f)
  assert rep["num_items"] == N and rep["num_levels"] == index.num_levels
  assert rep["level_sizes"] == list(index.level_sizes)
  assert rep["collision_rate_after"] == 0.0
  assert rep["collision_rate_before"] >= rep["collision_rate_after_repair"] >= 0.0
  assert rep["collision_rate_before"] > 0  # 3 exact copies of item 0 at least
  assert len(rep["utilization"]) == index.num_levels
  assert all(0 < u <= 1 for u in rep["utilization"])
  assert all(1 <= p <= k for p, k in zip(rep["perplexity"], rep["level_sizes"]))
  assert rep["max_items_per_code"] >= 1 and rep["max_items_per_code_argmax"] >= 4
  assert rep["utilization"] == report_lib.level_usage(index.codes, index.level_sizes)[
      "utilization"]
  assert np.isfinite(rep["reconstruction_mse"]) and rep["reconstruction_mse"] > 0
  assert rep["checkpoint"] == "best_collision" and rep["checkpoint_epoch"] in (2, 4, 6)
  assert rep["repair"]["collision_rate_after"] == 0.0
  with open(paths["plot"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.exists(paths["done"])
  assert not [p for p in os.listdir(paths["dir"]) if ".tmp-" in p]

  # DONE present: no training, no assignment; the saved index comes back.
  def _fail(*a, **k):
    raise AssertionError("trained although DONE exists")

  monkeypatch.setattr(trainer, "train_rqvae", _fail)
  again = stage.run_index_stage(c, wd, ds, x)
  np.testing.assert_array_equal(again.codes, index.codes)
  assert again.level_sizes == index.level_sizes and again.item_ids == index.item_ids
  monkeypatch.undo()

  # force: runs again; the finished training is reused (resumed at its last epoch) and
  # assignment is deterministic, so the codes are the same.
  forced = stage.run_index_stage(c, wd, ds, x, force=True)
  np.testing.assert_array_equal(forced.codes, index.codes)


def test_rqkmeans_source_writes_a_conflict_free_index(tmp_path, monkeypatch):
  c = _config()
  c.index.source = "rqkmeans"
  c.rqvae.sk_epsilons = (0.003, 0.003)

  def _fail(*a, **k):
    raise AssertionError("RQ-VAE trained for index.source='rqkmeans'")

  monkeypatch.setattr(trainer, "train_rqvae", _fail)
  ds = _dataset()
  index = stage.run_index_stage(c, str(tmp_path), ds, _embeddings())
  assert index.is_conflict_free() and index.num_items == N
  assert index.item_ids == tuple(it.item_id for it in ds.items)
  with open(stage.index_paths(str(tmp_path))["report"]) as f:
    rep = json.load(f)
  assert rep["source"] == "rqkmeans" and rep["collision_rate_after"] == 0.0
  assert rep["codes_used"][0] == 8  # balanced first level: every code (120 items, 8 codes)
  assert rep["distinct_prefixes"][-1] == N and "checkpoint" not in rep
  assert not os.path.exists(os.path.join(str(tmp_path), "index", "checkpoints"))
  again = stage.run_index_stage(c, str(tmp_path), ds, _embeddings(), force=True)
  np.testing.assert_array_equal(again.codes, index.codes)  # deterministic
