"""Trainer: kill-and-resume equals the uninterrupted run exactly; preemption; NaN stop;
metrics files.

Tiny LLaMA on 8 simulated CPU devices, mesh (2, 2, 2), 6 steps over epochs of 4 steps
(the resume crosses an epoch boundary), checkpoints every 2 steps, float32.
"""

import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.llm.config import tiny
from lcrec_jax.llm.model import Llama
from lcrec_jax.runtime import checkpoint as ckpt_lib
from lcrec_jax.runtime import summaries
from lcrec_jax.train import trainer as trainer_lib
from tests import tb_events

VOCAB, B, T, STEPS_PER_EPOCH, NUM_STEPS = 256, 8, 16, 4, 6

# Every `train` call jits its step anew; identical programs then come from the test run's
# persistent compilation cache (tests/conftest.py).


def batches(epoch: int, start_step: int):
  """Deterministic from (epoch, step): a resumed run sees the same batches."""
  for s in range(start_step, STEPS_PER_EPOCH):
    rs = np.random.RandomState(1000 * epoch + s)
    toks = rs.randint(3, 19, (B, T)).astype(np.int32)  # 16 of 256 ids: quickly learnable
    labels = np.full((B, T), -100, np.int32)
    labels[:, T // 2:] = toks[:, T // 2:]
    yield dict(tokens=toks, labels=labels, attention_mask=np.ones((B, T), np.int32),
               positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))


def make_config(**train_kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = spec.section("train")
  c.train.update(dict(batch_size=B, num_steps=NUM_STEPS, lr=1e-2, warmup_steps=2,
                      checkpoint_every=2, keep_checkpoints=3, eval_every=4, seed=5))
  c.train.update(train_kw)
  c.mesh = spec.section("mesh")
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return c


def tiny_model_and_params():
  """A 2-layer tiny LLaMA and its host params (shared with test_train_nonfinite)."""
  model = Llama(tiny(vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64))
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, jax.device_get(params)


@pytest.fixture(scope="module")
def model_and_params():
  return tiny_model_and_params()


def run(workdir, model, params, config=None, **kw):
  return trainer_lib.train(config or make_config(), os.path.join(str(workdir), "train"), model, params, batches,
                           STEPS_PER_EPOCH, eval_batches=lambda: batches(99, 2), **kw)


@pytest.fixture(scope="module")
def uninterrupted(model_and_params, tmp_path_factory):
  model, params = model_and_params
  wd = tmp_path_factory.mktemp("full")
  res = run(wd, model, params)
  return wd, res


class Crash(Exception):
  pass


def _assert_same_params(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(a)),
                          jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_uninterrupted_run_learns_and_logs(uninterrupted):
  wd, res = uninterrupted
  losses = [h["loss"] for h in res.history]
  assert res.step == NUM_STEPS and len(losses) == NUM_STEPS and not res.stopped_early
  assert losses[-1] < losses[0]
  records = summaries.read_jsonl(os.path.join(wd, "train", "metrics.jsonl"))
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == list(range(1, NUM_STEPS + 1))
  assert [r["step"] for r in records if "valid/loss" in r] == [4, 6]
  assert all(np.isfinite(r["valid/loss"]) for r in records if "valid/loss" in r)
  ckpts = ckpt_lib.Checkpointer(os.path.join(wd, "train", "checkpoints"))
  assert ckpts.all_steps() == [2, 4, 6]
  ckpts.close()
  # One TensorBoard event file (CRC-checked) with the same points as metrics.jsonl.
  tb_dir = os.path.join(wd, "train", "tb")
  (event_file,) = os.listdir(tb_dir)
  assert tb_events.read_events(os.path.join(tb_dir, event_file))[0].file_version == "brain.Event:2"
  tb = tb_events.scalars(tb_dir)
  for tag in ("train/loss", "valid/loss"):
    assert tb[tag] == [(r["step"], pytest.approx(r[tag])) for r in records if tag in r]


def test_crash_and_resume_matches_exactly(model_and_params, uninterrupted, tmp_path):
  """Crash at step 3 (checkpoint at 2), resume: steps 3..6 and final params identical."""
  model, params = model_and_params
  _, full = uninterrupted

  def crash(step, _):
    if step == 3:
      raise Crash()

  with pytest.raises(Crash):
    run(tmp_path, model, params, step_hook=crash)
  res = run(tmp_path, model, params)
  assert res.resumed_from == 2
  assert [h["step"] for h in res.history] == [3, 4, 5, 6]
  assert [h["loss"] for h in res.history] == [h["loss"] for h in full.history[2:]]
  _assert_same_params(res.state.params, full.state.params)
  _assert_same_params(res.state.opt_state, full.state.opt_state)
  # metrics.jsonl: the crashed run's step 3 line was dropped on resume, none duplicated.
  records = summaries.read_jsonl(os.path.join(tmp_path, "train", "metrics.jsonl"))
  assert [r["step"] for r in records if "train/loss" in r] == list(range(1, NUM_STEPS + 1))
  # TensorBoard: the resumed run's file purges step 3 of the crashed run's file, so each
  # step shows once, with the losses of the uninterrupted run.
  tb_dir = os.path.join(tmp_path, "train", "tb")
  assert len(os.listdir(tb_dir)) == 2
  assert tb_events.scalars(tb_dir)["train/loss"] == [
      (h["step"], pytest.approx(h["loss"])) for h in full.history]


def test_sigterm_saves_and_resume_matches(model_and_params, uninterrupted, tmp_path):
  """A SIGTERM sent from the step-4 hook saves step 5 off-schedule and stops (the loop
  asks about preemption after each step; step 4 had been asked already); the resume
  finishes the same."""
  model, params = model_and_params
  _, full = uninterrupted

  def preempt(step, _):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  res1 = run(tmp_path, model, params, step_hook=preempt)
  assert res1.stopped_early and res1.step == 5
  assert signal.getsignal(signal.SIGTERM) is not None  # handler restored
  res2 = run(tmp_path, model, params)
  assert res2.resumed_from == 5
  assert [h["loss"] for h in res1.history + res2.history] == [h["loss"] for h in full.history]
  _assert_same_params(res2.state.params, full.state.params)


@pytest.mark.slow
def test_resume_with_trainable_mask_and_accumulation(model_and_params, tmp_path):
  """Frozen params are not checkpointed but come back from `params`; accumulation on."""
  model, params = model_and_params
  mask = jax.tree_util.tree_map_with_path(
      lambda p, _: "embed_tokens" not in jax.tree_util.keystr(p), params)
  cfg = make_config(grad_accum_steps=2, num_steps=4)
  full = run(tmp_path / "a", model, params, cfg, trainable_mask=mask)

  def crash(step, _):
    if step == 3:
      raise Crash()

  with pytest.raises(Crash):
    run(tmp_path / "b", model, params, cfg, trainable_mask=mask, step_hook=crash)
  res = run(tmp_path / "b", model, params, cfg, trainable_mask=mask)
  assert [h["loss"] for h in res.history] == [h["loss"] for h in full.history[2:]]
  _assert_same_params(res.state.params, full.state.params)
  np.testing.assert_array_equal(np.asarray(res.state.params["embed_tokens"]["embedding"]),
                                params["embed_tokens"]["embedding"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(model_and_params, tmp_path):
  """lr 1e30 blows the weights up: the first non-finite loss stops the run, and the
  newest checkpoint is the step before it."""
  model, params = model_and_params
  cfg = make_config(checkpoint_every=1, num_steps=6, eval_every=0, lr=1e30, warmup_steps=0,
                    schedule="constant", max_grad_norm=0.0)
  with pytest.raises(trainer_lib.NonFiniteLossError, match="last checkpoint \\(finite\\) is step") as e:
    trainer_lib.train(cfg, tmp_path / "train", model, params, batches, STEPS_PER_EPOCH)
  records = summaries.read_jsonl(os.path.join(tmp_path, "train", "metrics.jsonl"))
  last_good = records[-1]["step"]
  assert all(np.isfinite(r["train/loss"]) for r in records)
  assert f"at step {last_good + 1} " in str(e.value)
  assert f"checkpoint (finite) is step {last_good} " in str(e.value)
  ckpts = ckpt_lib.Checkpointer(os.path.join(tmp_path, "train", "checkpoints"))
  assert max(ckpts.all_steps()) == last_good
  ckpts.close()
