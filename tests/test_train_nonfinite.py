"""Failure safety of the trainer: a non-finite update is never committed, checkpointed or
returned; a corrupt newest checkpoint is set aside and the older one used.

The tiny LLaMA and deterministic batches of `test_train_resume` (8 simulated devices).
Divergence is real: `train.lr=1e39` is inf in float32, so the first update it drives is
inf/NaN while that step's loss is still finite (the case the loss check missed).
"""

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lcrec_jax.errors import WorkdirError
from lcrec_jax.runtime import checkpoint as ckpt_lib
from lcrec_jax.runtime import finite
from lcrec_jax.train import trainer as trainer_lib
from tests.test_train_resume import (STEPS_PER_EPOCH, Crash, _assert_same_params, batches,
                                     make_config, tiny_model_and_params)

FULL_STEPS = 4


@pytest.fixture(scope="module")
def model_and_params():
  return tiny_model_and_params()


def _train(wd, model, params, **kw):
  hook = kw.pop("step_hook", None)
  cfg = make_config(**{"num_steps": FULL_STEPS, "checkpoint_every": 2, "eval_every": 0, **kw})
  return trainer_lib.train(cfg, os.path.join(str(wd), "train"), model, params, batches, STEPS_PER_EPOCH, step_hook=hook)


def _ckpt_dir(wd):
  return os.path.join(wd, "train", "checkpoints")


def _restore_state(wd, step, model, params):
  """The checkpointed trainable params and optimizer state at `step`, as numpy.

  Copied to the host before the checkpointer closes: the target-less restore's arrays
  (whatever shardings the files name) used in later eager ops aborted the process
  (SIGABRT inside XLA) in about half the runs of this module, in one process or under
  xdist. The library restores against a target and is not affected."""
  ckpts = ckpt_lib.Checkpointer(_ckpt_dir(wd))
  try:
    out = ckpts._manager.restore(step, args=ocp.args.Composite(  # whatever is on disk
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    state = jax.tree.map(np.asarray, jax.device_get(
        (out["state"]["trainable"], out["state"]["opt_state"])))
  finally:
    ckpts.close()
  return state


@pytest.fixture(scope="module")
def full(model_and_params, tmp_path_factory):
  """An uninterrupted 4-step run at lr 1e-2 (checkpoints at 2 and 4)."""
  model, params = model_and_params
  wd = tmp_path_factory.mktemp("full")
  return wd, _train(wd, model, params)


@pytest.fixture()
def at_step_2(model_and_params, tmp_path):
  """A run killed after its step-2 checkpoint (crash at step 3)."""
  model, params = model_and_params

  def crash(step, _):
    if step == 3:
      raise Crash()

  with pytest.raises(Crash):
    _train(tmp_path, model, params, step_hook=crash)
  return tmp_path


def test_nonfinite_update_is_not_committed_and_rerun_with_lower_lr_completes(
    model_and_params, full, at_step_2):
  """Resumed with lr=inf, step 3's update is inf/NaN although its loss is finite: the run
  stops, nothing is checkpointed after step 2, the error names step 2; re-running at
  the original lr resumes from step 2 and ends exactly where the uninterrupted run does."""
  model, params = model_and_params
  wd = at_step_2
  with pytest.raises(trainer_lib.NonFiniteLossError) as e:
    _train(wd, model, params, lr=1e39, checkpoint_every=1, warmup_steps=0,
           schedule="constant")
  msg = str(e.value)
  assert "at step 3 " in msg and "checkpoint (finite) is step 2 " in msg
  assert np.isfinite(float(msg.split("loss ")[1].split(",")[0]))  # the loss check missed it
  assert "train.lr" in e.value.hint
  ckpts = ckpt_lib.Checkpointer(_ckpt_dir(wd))
  assert ckpts.all_steps() == [2]
  ckpts.close()
  trainable, opt_state = _restore_state(wd, 2, model, params)
  assert bool(finite.all_finite(trainable, opt_state))

  res = _train(wd, model, params)  # the original (lower) lr
  assert res.resumed_from == 2 and res.step == FULL_STEPS
  _assert_same_params(res.state.params, full[1].state.params)


def test_divergence_at_the_last_step_stops_without_a_nonfinite_state(model_and_params,
                                                                     at_step_2):
  """The last step (3 of 3) diverges: `train` raises instead of returning (and so the
  stage exporting) a NaN model, and no checkpoint holds the NaN update."""
  model, params = model_and_params
  with pytest.raises(trainer_lib.NonFiniteLossError, match="at step 3 "):
    _train(at_step_2, model, params, num_steps=3, lr=1e39, warmup_steps=0,
           schedule="constant")
  ckpts = ckpt_lib.Checkpointer(_ckpt_dir(at_step_2))
  assert ckpts.all_steps() == [2]
  ckpts.close()


def test_skip_policy_keeps_the_last_finite_params(model_and_params, at_step_2, caplog):
  """`on_nonfinite=skip`: the diverging last step is skipped (logged, counted in the
  metrics), the run ends with step 2's params and saves them as the final checkpoint."""
  model, params = model_and_params
  trainable2, _ = _restore_state(at_step_2, 2, model, params)
  caplog.set_level(logging.WARNING)
  res = _train(at_step_2, model, params, num_steps=3, lr=1e39, warmup_steps=0,
               schedule="constant", on_nonfinite="skip")
  assert res.step == 3 and [h["is_finite"] for h in res.history] == [0.0]
  assert any("step 3 skipped" in r.getMessage() for r in caplog.records)
  _assert_same_params(res.state.trainable, trainable2)
  trainable3, opt3 = _restore_state(at_step_2, 3, model, params)
  _assert_same_params(trainable3, trainable2)
  assert bool(finite.all_finite(trainable3, opt3))


def test_skip_policy_stops_after_max_skips_in_a_row(model_and_params, tmp_path):
  model, params = model_and_params
  with pytest.raises(trainer_lib.NonFiniteLossError,
                     match=r"3 steps in a row, more than train.max_nonfinite_skips=2\)") as e:
    _train(tmp_path, model, params, lr=1e39, warmup_steps=0, schedule="constant",
           on_nonfinite="skip", max_nonfinite_skips=2)
  # Steps 1-2 were skipped: the step-2 checkpoint holds the initial params.
  assert "at step 3 " in str(e.value) and "checkpoint (finite) is step 2 " in str(e.value)
  trainable2, _ = _restore_state(tmp_path, 2, model, params)
  _assert_same_params(trainable2, params)


def test_bad_policy_is_a_config_error(model_and_params, tmp_path):
  model, params = model_and_params
  with pytest.raises(trainer_lib.ConfigError, match="train.on_nonfinite: 'ignore'"):
    _train(tmp_path, model, params, on_nonfinite="ignore")


# --- corrupt newest checkpoint -------------------------------------------------------------


def _array_files(step_dir):
  out = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    out += [os.path.join(root, f) for f in files if os.sep + "d" + os.sep in root + os.sep]
  return sorted(out, key=os.path.getsize)


def _truncate(step_dir):
  for f in _array_files(step_dir):  # the merged data file and per-process ones alike
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _zero(step_dir):
  for f in _array_files(step_dir):
    with open(f, "r+b") as fh:
      fh.write(b"\0" * os.path.getsize(f))


def _delete_state_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _delete_data_position(step_dir):
  import shutil
  shutil.rmtree(os.path.join(step_dir, "data"))


CORRUPTIONS = {"truncated_array": _truncate, "zeroed_arrays": _zero,
               "deleted_state_metadata": _delete_state_metadata,
               "deleted_data_position": _delete_data_position}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_set_aside_and_the_older_one_used(
    model_and_params, full, tmp_path, corrupt, caplog):
  """Checkpoints 2 and 4 of a finished run; step 4 is broken; re-running it
  resumes from step 2 (4 moved to `4.corrupt-1`, a warning names it) and ends equal to
  a run that never broke."""
  import shutil
  model, params = model_and_params
  shutil.copytree(full[0], tmp_path, dirs_exist_ok=True)
  step4 = os.path.join(_ckpt_dir(tmp_path), "4")
  CORRUPTIONS[corrupt](step4)
  caplog.set_level(logging.WARNING)
  res = _train(tmp_path, model, params)
  assert res.resumed_from == 2 and res.step == FULL_STEPS
  _assert_same_params(res.state.params, full[1].state.params)
  assert os.path.isdir(step4 + ".corrupt-1")
  warn = [r.getMessage() for r in caplog.records if "does not load" in r.getMessage()]
  assert len(warn) == 1 and step4 in warn[0] and "4.corrupt-1" in warn[0]


def test_no_loadable_checkpoint_is_one_workdir_error(model_and_params, full, tmp_path):
  import shutil
  model, params = model_and_params
  shutil.copytree(full[0], tmp_path, dirs_exist_ok=True)
  for s in ("2", "4"):
    _delete_data_position(os.path.join(_ckpt_dir(tmp_path), s))
  with pytest.raises(WorkdirError, match=r"train: no checkpoint under .* loads \(step 4: .*"
                                         r"step 2: ") as e:
    _train(tmp_path, model, params)
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(_ckpt_dir(tmp_path))) == ["2", "4"]  # nothing moved


def test_nonfinite_checkpoint_written_by_old_code_is_set_aside(model_and_params, full,
                                                              tmp_path):
  """A checkpoint holding NaN (as the old trainer could save) counts as broken."""
  import shutil
  model, params = model_and_params
  shutil.copytree(full[0], tmp_path, dirs_exist_ok=True)
  ckpts = ckpt_lib.Checkpointer(_ckpt_dir(tmp_path), async_save=False)
  out = ckpts._manager.restore(4, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  state, data = out["state"], out["data"]
  state = jax.tree.map(lambda x: np.full_like(x, np.nan)
                       if np.issubdtype(np.asarray(x).dtype, np.floating) else x, state)
  ckpts._manager.delete(4)
  ckpts.save(4, state, dict(data), force=True)
  ckpts.close()
  res = _train(tmp_path, model, params)
  assert res.resumed_from == 2
  _assert_same_params(res.state.params, full[1].state.params)
  assert os.path.isdir(os.path.join(_ckpt_dir(tmp_path), "4.corrupt-1"))
