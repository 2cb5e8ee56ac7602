"""Issue 24 case 6, the divergence way out: checkpoints carry their loss; after a
non-finite stop the next run resumes from the newest checkpoint whose loss is no spike
(<= 3x the best loss seen), moving the spiked ones aside, and the plan says which. Also
case 5's Ctrl-C in training: the first one saves at the next step and stops.

The tiny LLaMA and batches of `test_train_resume` (8 simulated devices).
"""

import json
import os

import pytest

from configs.ml100k_quick import get_config
from lcrec_jax import interrupt
from lcrec_jax.pipeline import spec
from lcrec_jax.pipeline import workdir as wl
from lcrec_jax.runtime import checkpoint as ckpt_lib
from lcrec_jax.train import divergence
from lcrec_jax.train import trainer as trainer_lib
from tests.test_train_resume import (STEPS_PER_EPOCH, batches, make_config,
                                     tiny_model_and_params)


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def _ckpt(train_dir, step, loss):
  _write(f"{train_dir}/checkpoints/{step}/data/metadata",
         json.dumps({"epoch": 0, "step_in_epoch": step, "loss": loss}))


def test_choice_is_the_newest_checkpoint_within_3x_the_best_loss(tmp_path):
  td = str(tmp_path / "train")
  _ckpt(td, 4, 2.0)
  _ckpt(td, 8, 7.0)    # 3.5x the best (2.0): a spike
  _ckpt(td, 12, 950.0)
  os.makedirs(f"{td}/checkpoints/12.orbax-checkpoint-tmp-1")  # an unfinished save: ignored
  assert divergence.choose(td) is None  # no non-finite stop: the ordinary resume
  divergence.write_marker(td, 13, float("nan"), 12)
  c = divergence.choose(td)
  assert (c.stopped_at, c.step, c.loss, c.best) == (13, 4, 2.0, 2.0)
  assert c.spikes == ((12, 950.0), (8, 7.0))
  assert c.describe() == ("after the non-finite stop at step 13 it resumes from checkpoint 4 "
                          "(loss 2); checkpoint 12 (loss 950), 8 (loss 7) > 3x the best loss "
                          "2: a spike, set aside")
  # a lower logged loss is the reference too: then checkpoint 4 (2.0 > 3 x 0.5) is one
  _write(f"{td}/metrics.jsonl", json.dumps({"step": 2, "train/loss": 0.5}) + "\n")
  c = divergence.choose(td)
  assert c.step is None and "training starts over" in c.describe()


def test_plan_says_where_training_resumes_after_a_divergence(tmp_path):
  wd = str(tmp_path)
  flat = spec.flatten(spec.resolve(get_config()))
  _write(f"{wd}/index/DONE", "")
  wl.write_manifest(wd, "index", flat, finished=True)
  wl.write_manifest(wd, "train", flat, finished=False)
  _ckpt(f"{wd}/train", 4, 2.0)
  _ckpt(f"{wd}/train", 8, 90.0)
  divergence.write_marker(f"{wd}/train", 9, float("nan"), 8)
  flat2 = dict(flat, **{"train.lr": flat["train.lr"] / 10})
  step = wl.plan(wd, flat2, ("index", "train"), [])[1]
  assert step.run and not step.fresh
  assert step.reason.startswith("not finished; after the non-finite stop at step 9 it resumes "
                                "from checkpoint 4 (loss 2); checkpoint 8 (loss 90)")
  assert "with train.lr" in step.reason


@pytest.fixture(scope="module")
def model_and_params():
  return tiny_model_and_params()


def _train(wd, model, params, **kw):
  hook = kw.pop("step_hook", None)
  cfg = make_config(**{"num_steps": 4, "checkpoint_every": 2, "eval_every": 0, **kw})
  return trainer_lib.train(cfg, os.path.join(str(wd), "train"), model, params, batches, STEPS_PER_EPOCH, step_hook=hook)


@pytest.mark.slow
def test_checkpoints_carry_their_loss_and_a_spiked_one_is_set_aside(model_and_params,
                                                                   tmp_path):
  model, params = model_and_params
  res = _train(tmp_path, model, params)
  td = f"{tmp_path}/train"
  losses = divergence.checkpoint_losses(f"{td}/checkpoints")
  assert sorted(losses) == [2, 4]
  for step, loss in losses.items():  # the step's own logged training loss
    assert loss == pytest.approx(res.history[step - 1]["loss"])
  # as if step 4 were ruined and step 5 had then stopped on a NaN
  meta = f"{td}/checkpoints/4/data/metadata"
  m = json.load(open(meta))
  m["loss"] = 1e6
  _write(meta, json.dumps(m))
  divergence.write_marker(td, 5, float("nan"), 4)
  res = _train(tmp_path, model, params)
  assert res.resumed_from == 2 and res.step == 4
  assert os.path.isdir(f"{td}/checkpoints/4.spike-1")
  assert not os.path.exists(divergence.marker_path(td))  # the choice is made once


@pytest.mark.slow
def test_a_nonfinite_stop_leaves_the_marker(model_and_params, tmp_path):
  model, params = model_and_params
  with pytest.raises(trainer_lib.NonFiniteLossError) as e:
    _train(tmp_path, model, params, lr=1e39, warmup_steps=0, schedule="constant",
           checkpoint_every=1)
  marker = json.load(open(divergence.marker_path(f"{tmp_path}/train")))
  assert (marker["step"], marker["checkpoint"], marker["loss"]) == (
      1, None, float(str(e.value).split("loss ")[1].split(",")[0]))


@pytest.mark.slow
def test_first_ctrl_c_in_training_saves_at_the_next_step_and_raises(model_and_params,
                                                                    tmp_path):
  model, params = model_and_params

  def press(step, _):
    if step == 1:
      interrupt.request()

  try:
    with interrupt.graceful(), pytest.raises(KeyboardInterrupt):
      _train(tmp_path, model, params, step_hook=press, checkpoint_every=100)
  finally:
    interrupt.clear()
  ckpts = ckpt_lib.Checkpointer(f"{tmp_path}/train/checkpoints")
  try:  # step 1's hook runs while step 2 is in flight: the stop saves step 2
    assert ckpts.all_steps() == [2]
  finally:
    ckpts.close()
