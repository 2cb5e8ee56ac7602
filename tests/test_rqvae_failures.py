"""RQ-VAE trainer failure safety: a NaN/inf update is never applied or checkpointed; a
corrupt newest checkpoint is set aside and the older one used (same tiny recipe as
`test_index_stage`)."""

import logging
import os
import shutil

import numpy as np
import pytest

from lcrec_jax.errors import ConfigError, UserError
from lcrec_jax.index import trainer
from lcrec_jax.runtime import finite
from tests.test_index_stage import N, _config, _embeddings, _leaves


def test_nonfinite_update_is_not_applied_or_saved(tmp_path):
  """One step per epoch at lr=inf: the loss is finite (computed before the update), the
  update is not. The old trainer saved and returned NaN parameters."""
  c = _config()
  c.rqvae.update(lr=1e39, batch_size=N, epochs=1, warmup_epochs=0, schedule="constant")
  with pytest.raises(finite.NonFiniteError, match=r"rqvae: 1 of 1 steps of epoch 1 had a "
                                                  r"NaN/inf loss or update \(not applied\)") as e:
    trainer.train_rqvae(c.rqvae, _embeddings(), str(tmp_path / "index"), seed=7)
  assert isinstance(e.value, UserError) and "no checkpoint was written yet" in str(e.value)
  assert "rqvae.lr" in e.value.hint
  assert os.listdir(tmp_path / "index" / "checkpoints" / "latest") == []


def _truncate_arrays(step_dir):
  for root, _, files in os.walk(step_dir / "state"):
    if os.path.basename(root) == "d":
      for f in files:
        p = os.path.join(root, f)
        with open(p, "r+b") as fh:
          fh.truncate(os.path.getsize(p) // 2)


def _delete_meta(step_dir):
  shutil.rmtree(step_dir / "meta")


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_truncate_arrays, _delete_meta])
def test_corrupt_latest_checkpoint_falls_back(tmp_path, corrupt, caplog):
  """Epoch-6 checkpoint broken: the re-run resumes from epoch 3 (6 moved to 6.corrupt-1,
  named in a warning) and ends with the uninterrupted run's parameters."""
  c = _config()
  x = _embeddings()
  _, full_vars, _ = trainer.train_rqvae(c.rqvae, x, str(tmp_path / "a" / "index"), seed=7)
  wd = tmp_path / "b"
  trainer.train_rqvae(c.rqvae, x, str(wd / "index"), seed=7)
  latest = wd / "index" / "checkpoints" / "latest"
  corrupt(latest / "6")
  caplog.set_level(logging.WARNING)
  _, res_vars, res_hist = trainer.train_rqvae(c.rqvae, x, str(wd / "index"), seed=7)
  assert [r["epoch"] for r in res_hist] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(_leaves(full_vars), _leaves(res_vars), strict=True):
    np.testing.assert_array_equal(a, b)
  assert sorted(os.listdir(latest)) == ["3", "6", "6.corrupt-1"]
  assert any("6.corrupt-1" in r.getMessage() and "does not load" in r.getMessage()
             for r in caplog.records)
  # A config change is still refused (not mistaken for a broken checkpoint).
  c.rqvae.codebook_size = 16
  with pytest.raises(ConfigError, match="rqvae.codebook_size"):
    trainer.train_rqvae(c.rqvae, x, str(wd / "index"), seed=7)
  assert sorted(os.listdir(latest)) == ["3", "6", "6.corrupt-1"]


def test_broken_best_checkpoint_is_one_workdir_error(tmp_path):
  """`best_loss` keeps one checkpoint: broken, it is a one-line WorkdirError, not moved."""
  from lcrec_jax.errors import WorkdirError
  c = _config()
  c.rqvae.epochs = 2
  model, variables, hist = trainer.train_rqvae(c.rqvae, _embeddings(), str(tmp_path / "index"), seed=7)
  best = tmp_path / "index" / "checkpoints" / "best_loss"
  (step,) = os.listdir(best)
  _truncate_arrays(best / step)
  with pytest.raises(WorkdirError, match=rf"rqvae best_loss: no checkpoint under .*best_loss "
                                         rf"loads \(step {step}: ") as e:
    trainer.load_checkpoint_variables(str(tmp_path / "index"), "best_loss", model, variables, c.rqvae)
  assert "\n" not in str(e.value) and os.listdir(best) == [step]
