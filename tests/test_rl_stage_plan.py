"""The rl stage in the run spec and the stage plan: validated keys, its place between
train and eval, and eval's optional dependency on it (hand-made workdirs, milliseconds)."""

from __future__ import annotations

import os

import pytest

from configs.ml100k_quick import get_config
from lcrec_jax.pipeline import spec
from lcrec_jax.pipeline import workdir as wl
from lcrec_jax.errors import ConfigError, WorkdirError


def _flat(**changes):
  c = spec.resolve(get_config())
  for k, v in changes.items():
    section, leaf = k.split("__")
    c[section][leaf] = v
  return spec.flatten(c)


def _finish(wd, stage, flat):
  done = wl.done_path(wd, stage)
  os.makedirs(os.path.dirname(done), exist_ok=True)
  with open(done, "w") as f:
    f.write("{}" if done.endswith(".json") else "")
  wl.write_manifest(wd, stage, flat, finished=True)


def _decisions(steps):
  return {s.stage: ("scratch" if s.fresh else "run") if s.run else "reuse" for s in steps}


ALL = ("index", "train", "rl", "eval")


def test_rl_runs_between_train_and_eval_and_makes_eval_rerun(tmp_path):
  wd, flat = str(tmp_path), _flat()
  for s in ("index", "train", "eval"):
    _finish(wd, s, flat)
  steps = wl.plan(wd, flat, ALL, [])
  assert [s.stage for s in steps] == list(ALL)
  assert _decisions(steps) == {"index": "reuse", "train": "reuse", "rl": "run",
                               "eval": "scratch"}
  assert "upstream rl runs" in steps[3].reason


def test_eval_without_rl_does_not_need_it_but_a_finished_rl_must_be_current(tmp_path):
  wd, flat = str(tmp_path), _flat()
  for s in ("index", "train"):
    _finish(wd, s, flat)
  assert _decisions(wl.plan(wd, flat, ("eval",), [])) == {"eval": "run"}   # SFT evaluated
  assert not wl.rl_finished(wd)
  _finish(wd, "rl", flat)
  assert wl.rl_finished(wd)
  assert _decisions(wl.plan(wd, flat, ("eval",), [])) == {"eval": "run"}
  with pytest.raises(WorkdirError, match="rl was built from other inputs"):
    wl.plan(wd, _flat(rl__lr=1e-3), ("eval",), [])
  # An rl policy trained on the SFT model that runs again would be stale.
  with pytest.raises(WorkdirError, match="runs again"):
    wl.plan(wd, flat, ("train", "eval"), ["train"])
  # A finished eval records the rl manifest; a rebuilt rl stage makes it stale.
  _finish(wd, "eval", flat)
  assert _decisions(wl.plan(wd, flat, ALL, [])) == dict.fromkeys(ALL, "reuse")
  _finish(wd, "rl", _flat(rl__num_steps=7))
  steps = wl.plan(wd, _flat(rl__num_steps=7), ("eval",), [])
  assert _decisions(steps) == {"eval": "scratch"} and "upstream rl" in steps[0].reason


def test_rl_reads_its_section_and_not_monitoring_keys(tmp_path):
  flat = _flat()
  reads = wl.reads("rl", flat)
  assert "rl.beta" in reads and "model.preset" in reads and "train.lr" not in reads
  assert "rl.checkpoint_every" not in reads and "rl.eval_every" not in reads
  assert wl.Layout(str(tmp_path)).rl_dir == f"{tmp_path}/rl"


def test_rl_keys_are_validated_before_any_work():
  c = get_config()
  c.rl = spec.section("rl")
  c.rl.zero_adv = "drop"
  with pytest.raises(ConfigError, match="rl.zero_adv"):
    spec.validate(c, num_devices=8, stages=("rl",))
  c.rl.zero_adv = "skip"
  c.rl.num_generations = 1
  with pytest.raises(ConfigError, match="rl.num_generations"):
    spec.validate(c, num_devices=8, stages=("rl",))
  c.rl.num_generations, c.rl.prompts_per_step = 5, 12   # 12 prompts over 8 devices
  with pytest.raises(ConfigError, match="rl.prompts_per_step"):
    spec.validate(c, num_devices=8, stages=("rl",))
  spec.validate(c, num_devices=8, stages=("eval",))   # the rule is the rl stage's only
