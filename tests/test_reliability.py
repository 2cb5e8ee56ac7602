"""Issue 24: a workdir nobody can corrupt. One test per failure case the issue lists.

Fast tests call main's and the workdir module's functions in-process on hand-made
workdirs (DONE files + the manifests `main` writes); the subprocess ones are `slow`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from configs.ml100k_quick import get_config
from lcrec_jax import cli, interrupt
from lcrec_jax.pipeline import spec
from lcrec_jax import lock as lock_lib
from lcrec_jax.pipeline import workdir as wl
from lcrec_jax.errors import ConfigError, Interrupted, WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "configs/ml100k_quick.py"
STAGES = ("index", "train", "eval")


def _config(**changes):
  c = spec.resolve(get_config())
  for k, v in changes.items():
    section, leaf = k.split("__")
    c[section][leaf] = v
  return c


def _write(path, data: bytes | str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)


def _finished_run(wd, flat):
  """A finished index/train/eval with the files downstream stages read."""
  _write(f"{wd}/index/index.json", json.dumps({"1": ["<a_1>", "<b_2>"]}))
  _write(f"{wd}/index/report.json", json.dumps({"level_sizes": [4, 4]}))
  _write(f"{wd}/index/DONE", "")
  _write(f"{wd}/train/tokenizer/tokenizer.json", '{"model": "bpe"}')
  _write(f"{wd}/train/checkpoints/8/state/d/0", b"\1" * 300)
  _write(f"{wd}/train/checkpoints/8/data/metadata", '{"epoch": 0, "step_in_epoch": 8}')
  _write(f"{wd}/model/model.safetensors", b"\0" * 5000)
  _write(f"{wd}/model/config.json", "{}")
  _write(f"{wd}/model/DONE", "step 8\n")
  _write(f"{wd}/eval/results.json", "{}")
  for s in STAGES:
    wl.write_manifest(wd, s, flat, finished=True)


def _decisions(steps):
  return {s.stage: ("scratch" if s.fresh else "run") if s.run else "reuse" for s in steps}


# --- 1. one run at a time --------------------------------------------------------------


def test_second_lock_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
  wd = str(tmp_path)
  held = lock_lib.WorkdirLock(wd).acquire()
  try:
    with pytest.raises(WorkdirError) as e:
      lock_lib.WorkdirLock(wd).acquire()  # another open file: flock conflicts as across processes
    assert f"is in use by another run (pid {os.getpid()} on " in str(e.value)
  finally:
    held.release()
  lock_lib.WorkdirLock(wd).acquire().release()  # released: free again
  # a lock file left by a killed process (its flock died with it)
  _write(f"{wd}/.lock", json.dumps({"pid": 99999999, "host": "h", "started": "then"}))
  with caplog.at_level(logging.WARNING):
    lk = lock_lib.WorkdirLock(wd).acquire()
  assert "taking over the lock of pid 99999999" in caplog.text
  assert json.load(open(f"{wd}/.lock"))["pid"] == os.getpid()
  lk.release()


def test_gs_workdir_lock_is_local(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  import tempfile
  monkeypatch.setattr(tempfile, "tempdir", None)
  p = lock_lib.lock_path("gs://bucket/runs/x")
  assert p.startswith(str(tmp_path)) and p.endswith(".lock")


_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from lcrec_jax.lock import WorkdirLock
WorkdirLock({wd!r}).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_two_processes_at_once_the_second_gets_one_line_and_exit_2(tmp_path):
  """One process holds the workdir; `main` on it is refused in one line naming the pid;
  once the holder is killed (-9), the lock is free again."""
  wd = str(tmp_path / "w")
  os.makedirs(wd)
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER.format(repo=REPO, wd=wd)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-m", "lcrec_jax.main", f"--config={QUICK}",
                          f"--workdir={wd}"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith(f"main: error: {wd} is in use by another run "
                               f"(pid {holder.pid} on "), out.stderr
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    assert not os.path.exists(f"{wd}/config.json")  # nothing touched
  finally:
    holder.kill()
    holder.wait()
  lock_lib.WorkdirLock(wd).acquire().release()  # the dead holder's lock is free


# --- 2. reuse verifies the outputs ------------------------------------------------------


def test_damaged_outputs_rerun_the_stage_and_its_dependents(tmp_path):
  wd, flat = str(tmp_path), spec.flatten(_config())
  _finished_run(wd, flat)
  assert _decisions(wl.plan(wd, flat, STAGES, [])) == dict.fromkeys(STAGES, "reuse")
  # a truncated export: train runs again (resuming: its checkpoints are fine), eval too
  os.truncate(f"{wd}/model/model.safetensors", 100)
  steps = wl.plan(wd, flat, STAGES, [])
  assert _decisions(steps) == {"index": "reuse", "train": "run", "eval": "scratch"}
  assert f"{wd}/model/model.safetensors is 100 bytes, 5,000 bytes when train finished" in (
      steps[1].warning)
  _finished_run(wd, flat)
  # the trained tokenizer deleted (eval reads it)
  os.remove(f"{wd}/train/tokenizer/tokenizer.json")
  steps = wl.plan(wd, flat, STAGES, [])
  assert _decisions(steps)["train"] == "run"
  assert "train/tokenizer/tokenizer.json is missing" in steps[1].warning
  _finished_run(wd, flat)
  # same size, other bytes: the content hash
  with open(f"{wd}/index/index.json", "r+") as f:
    f.write("[")
  steps = wl.plan(wd, flat, STAGES, [])
  assert _decisions(steps) == {"index": "run", "train": "scratch", "eval": "scratch"}
  assert "index/index.json changed since index finished" in steps[0].warning
  # outside --stages: one error naming the file, the stage to add
  with pytest.raises(WorkdirError, match=r"eval needs index, but .*index\.json changed") as e:
    wl.plan(wd, flat, ("eval",), [])
  assert "add index to --stages" in e.value.hint


def test_truncated_index_json_is_caught_by_size(tmp_path):
  wd, flat = str(tmp_path), spec.flatten(_config())
  _finished_run(wd, flat)
  os.truncate(f"{wd}/index/index.json", 5)
  steps = wl.plan(wd, flat, STAGES, [])
  assert _decisions(steps)["index"] == "run" and "index.json is 5 bytes" in steps[0].reason


def test_manifest_of_an_older_lcrec_jax_is_still_verified(tmp_path):
  """Older manifests recorded `{name in the stage dir: "sha256:..."}`."""
  wd, flat = str(tmp_path), spec.flatten(_config())
  _finished_run(wd, flat)
  m = wl.read_manifest(wd, "train")
  m["outputs"] = {"model.safetensors": wl._sha(b"\0" * 5000), "DONE": "size:7"}
  _write(wl.manifest_path(wd, "train"), json.dumps(m))
  assert _decisions(wl.plan(wd, flat, ("train",), []))["train"] == "reuse"
  _write(f"{wd}/model/model.safetensors", b"\1" * 5000)
  assert _decisions(wl.plan(wd, flat, ("train",), []))["train"] == "run"


def test_a_started_but_unfinished_manifest_next_to_an_old_done_is_not_finished(tmp_path):
  wd, flat = str(tmp_path), spec.flatten(_config())
  _finished_run(wd, flat)
  wl.write_manifest(wd, "eval", flat, finished=False)  # a re-run killed before its end
  steps = wl.plan(wd, flat, STAGES, [])
  assert _decisions(steps)["eval"] == "run"
  # eval has no checkpoints: the plan does not say it resumes from them
  assert steps[2].reason == "not finished"
  wl.start_stage(wd, "eval")
  assert not os.path.exists(f"{wd}/eval/results.json")


# --- 3./4. config.json --------------------------------------------------------------------


def test_a_refused_run_leaves_config_json_as_it_was(tmp_path):
  from lcrec_jax.pipeline import runner as main_lib
  wd, config = str(tmp_path), _config()
  _finished_run(wd, spec.flatten(config))
  _write(f"{wd}/config.json", config.to_json_best_effort(indent=2))
  before = open(f"{wd}/config.json").read()
  with pytest.raises(WorkdirError, match="built from other inputs"):
    main_lib.plan_run(_config(tasks__max_history=2), wd, ["eval"], [])
  assert open(f"{wd}/config.json").read() == before
  main_lib.plan_run(_config(eval__num_beams=30), wd, ["eval"], [])  # accepted: written
  assert json.load(open(f"{wd}/config.json"))["eval"]["num_beams"] == 30
  assert not [n for n in os.listdir(wd) if n.startswith(".tmp-")]  # atomic


def test_recommend_uses_the_config_the_model_was_built_with(tmp_path):
  """recommend/serve read `workdir.resolved_config` (recommend.run_config; not imported
  here: its flags clash with main's in one process)."""
  wd, config = str(tmp_path), _config()
  _finished_run(wd, spec.flatten(config))
  edited = json.loads(config.to_json_best_effort())
  edited["tasks"]["max_history"] = 2  # a hand edit (or a later run of another stage)
  _write(f"{wd}/config.json", json.dumps(edited))
  got, diffs = wl.resolved_config(wd, ("index", "train"))
  assert got.tasks.max_history == config.tasks.max_history == 20
  assert diffs == ["tasks.max_history 2 in config.json, 20 in model/MANIFEST.json"]
  assert got.eval.num_beams == config.eval.num_beams  # fields no manifest records: as written
  _write(f"{wd}/config.json", "{not json")
  with pytest.raises(WorkdirError, match=r"config.json: not a valid run config"):
    wl.resolved_config(wd)
  src = open(os.path.join(REPO, "lcrec_jax", "recommend.py")).read()
  assert "config = run_config(workdir)" in src and "resolved_config(" in src


# --- 5. one line for every expected failure -------------------------------------------------


@pytest.fixture()
def config_flag():
  """A FlagValues with main's --config flag (the global FLAGS are left alone)."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  saved, cli.flags.FLAGS = cli.flags.FLAGS, fv
  yield
  cli.flags.FLAGS = saved


def test_config_file_missing_broken_or_without_get_config_is_one_config_error(tmp_path,
                                                                              config_flag):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  none = tmp_path / "none.py"
  none.write_text("x = 1\n")
  ok = os.path.join(REPO, QUICK)
  e = cli.config_file_error(["prog", f"--config={tmp_path}/missing.py"])
  assert isinstance(e, ConfigError) and str(e).endswith("missing.py: no such file")
  assert str(cli.config_file_error(["prog", f"--config={bad}"])) == (
      f"--config={bad}: line 1: syntax error: invalid syntax")
  assert "defines no get_config()" in str(cli.config_file_error(["prog", "--config", str(none)]))
  assert cli.config_file_error(["prog", f"--config={ok}", "--config.train.lr=1"]) is None


@pytest.mark.slow
def test_config_file_errors_end_to_end(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  for path in (tmp_path / "missing.py", bad):
    out = subprocess.run([sys.executable, "-m", "lcrec_jax.main", f"--config={path}",
                          f"--workdir={tmp_path}/w"], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith(f"main: error: --config={path}: ")


def _pipeline(wd, fn, monkeypatch, stage="train"):
  from lcrec_jax.pipeline import runner as main_lib
  _patch_stage(monkeypatch, stage, fn)
  return main_lib, main_lib.Context(_config(), wd), [wl.Step(stage, False, False, "test")]


def _patch_stage(monkeypatch, stage, fn):
  """Replaces the registered stage's implementation by ``fn(ctx, force)``."""
  import dataclasses
  from lcrec_jax.pipeline import stages
  monkeypatch.setitem(stages.REGISTRY, stage,
                      dataclasses.replace(stages.REGISTRY[stage], impl=fn))


def test_enospc_anywhere_is_one_line_naming_the_workdir(tmp_path, monkeypatch):
  def full(pipeline, run):
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:  # as orbax/TensorStore re-raise it
      raise ValueError("tensorstore write failed") from e

  main_lib, pipe, steps = _pipeline(str(tmp_path), full, monkeypatch)
  with pytest.raises(WorkdirError) as e:
    main_lib._run_stages(pipe, steps, {})
  assert str(e.value).startswith(f"no space left on the device holding {tmp_path} (needs ~")
  assert "MB for stage train" in str(e.value)
  assert isinstance(e.value.__cause__, ValueError)  # the log file gets the whole traceback


def test_ctrl_c_is_one_line_naming_the_resume_step(tmp_path, monkeypatch):
  wd = str(tmp_path)
  _write(f"{wd}/train/checkpoints/8/data/metadata", "{}")
  _write(f"{wd}/train/checkpoints/4/data/metadata", "{}")

  def ctrl_c(pipeline, run):
    raise KeyboardInterrupt

  main_lib, pipe, steps = _pipeline(wd, ctrl_c, monkeypatch)
  with pytest.raises(Interrupted) as e:
    main_lib._run_stages(pipe, steps, {})
  assert str(e.value) == "interrupted during stage train; the next run resumes from step 8"
  assert e.value.exit_code == 130


def test_a_ctrl_c_that_something_swallowed_still_stops_the_run(tmp_path, monkeypatch):
  """orbax's wait_until_finished catches BaseException around its thread join: a
  KeyboardInterrupt raised there was logged and dropped, and training went on."""
  ran = []

  def swallowing(pipeline, run):
    try:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
    except BaseException:  # what orbax does
      pass
    ran.append(1)

  main_lib, pipe, steps = _pipeline(str(tmp_path), swallowing, monkeypatch, "eval")
  steps.append(wl.Step("baseline", False, False, "test"))
  _patch_stage(monkeypatch, "baseline", lambda p, r: ran.append(2))
  interrupt.install()
  try:
    with pytest.raises(Interrupted, match="interrupted during stage eval; the next run runs "
                                          "stage eval again"):
      main_lib._run_stages(pipe, steps, {})
  finally:
    interrupt.uninstall()
    interrupt.clear()
  assert ran == [1]  # the next stage did not start


def test_inside_graceful_the_first_ctrl_c_is_a_request_the_second_raises():
  interrupt.install()
  try:
    with interrupt.graceful():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)
      assert interrupt.requested()
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    with pytest.raises(KeyboardInterrupt):
      interrupt.raise_if_requested()
  finally:
    interrupt.uninstall()
    interrupt.clear()


def test_cli_prints_interrupted_with_exit_130(capsys):
  def main(argv):
    raise Interrupted("interrupted during stage train; the next run resumes from step 8")

  with pytest.raises(SystemExit) as e:
    cli.guarded(main, "main")(["main"])
  assert e.value.code == 130
  assert capsys.readouterr().err == (
      "main: interrupted during stage train; the next run resumes from step 8\n")


def test_backend_probe_line_is_silenced_in_every_entry_point(caplog):
  """cli.run (main, recommend, generate) and plan.py silence JAX's INFO probe line."""

  def main(argv):
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu': x")
    logging.getLogger("jax._src.xla_bridge").warning("visible")

  logger = logging.getLogger("jax._src.xla_bridge")
  level = logger.level
  logger.setLevel(logging.NOTSET)
  try:
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit):
      cli.run(main, "recommend", argv=["recommend"])
  finally:
    logger.setLevel(level)
  assert "visible" in caplog.text and "Unable to initialize backend" not in caplog.text
  src = open(os.path.join(REPO, "lcrec_jax", "plan.py")).read()
  assert "cli.quiet_backend_probe()" in src.split('if __name__ == "__main__":')[1]


# --- 7. leftovers, quiet logs --------------------------------------------------------------


def test_leftovers_of_killed_runs_are_removed(tmp_path):
  wd = str(tmp_path)
  _write(f"{wd}/model/.tmp-DONE-123-abcd1234", "x")
  _write(f"{wd}/train/examples/lcrec/incomplete.abc1.0.0/x.array_record", "x")
  _write(f"{wd}/train/examples/lcrec/1.0.0/x.array_record", "kept")
  _write(f"{wd}/model/DONE", "kept")
  removed = wl.remove_leftovers(wd)
  assert len(removed) == 2
  assert not os.path.exists(f"{wd}/model/.tmp-DONE-123-abcd1234")
  assert not os.path.exists(f"{wd}/train/examples/lcrec/incomplete.abc1.0.0")
  assert os.path.exists(f"{wd}/train/examples/lcrec/1.0.0/x.array_record")
  assert os.path.exists(f"{wd}/model/DONE")


def test_tfds_prepares_without_its_banner(tmp_path, capfd):
  import numpy as np
  from lcrec_jax.tasks import batching, example_records
  ids = tuple(np.arange(3, dtype=np.int32) + i for i in range(4))
  examples = batching.TokenizedExamples(
      ids, ids, np.full(4, 6, np.int32), np.full(4, 8, np.int32), ("seqrec",) * 4, (8,), 0,
      0, 0)
  example_records.write_examples({"train": examples}, str(tmp_path))
  out = capfd.readouterr()
  assert "Downloading and preparing" not in out.out + out.err
  assert "downloaded and prepared" not in out.out + out.err
  assert "Generating" not in out.err  # no tqdm bar (stderr is not a terminal here)
