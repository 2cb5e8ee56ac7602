"""The entry boundary (`lcrec_jax.cli`): expected errors are one line on stderr and exit
status 2, the traceback goes to the run's log file only; unknown config fields name the
closest valid ones; a workdir that is a file or cannot be created is a WorkdirError."""

import glob
import os
import subprocess
import sys

import pytest

from lcrec_jax import cli
from lcrec_jax.errors import WorkdirError
from tests import entry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "configs/ml100k_quick.py"


def _main(*args, timeout=300):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "lcrec_jax.main", f"--config={QUICK}", *args],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith(("main: error:", "hint:"))]


@pytest.mark.slow
def test_unknown_config_field_names_the_closest_fields(tmp_path):
  """The real `python -m lcrec_jax.main` process (the one for this command)."""
  out = _main(f"--workdir={tmp_path}", "--config.train.lrr=1")
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  err = _error_lines(out.stderr)
  assert err[0] == ("main: error: --config.train.lrr: config.train has no field 'lrr' "
                    "(closest: config.train.lr)")
  assert err[1].startswith("hint: fields of config.train: ") and "warmup_steps" in err[1]
  assert len(out.stderr.strip().splitlines()) == 2


def test_unknown_config_field_in_process():
  """The lookup walks the recipe: a section typo, a value used as a section."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  saved, cli.flags.FLAGS = cli.flags.FLAGS, fv
  try:
    argv = [f"--config={os.path.join(REPO, QUICK)}"]
    e = cli.unknown_config_field(argv + ["--config.trian.lr=1"])
    assert str(e) == "--config.trian.lr: config has no field 'trian' (closest: config.train)"
    e = cli.unknown_config_field(argv + ["--config.train.lr.x=1"])
    assert str(e) == "--config.train.lr.x: config.train.lr is a value, not a section with fields"
    assert cli.unknown_config_field(argv + ["--config.train.lr=1"]) is None
  finally:
    cli.flags.FLAGS = saved


def test_workdir_that_is_a_file_or_cannot_be_made(tmp_path):
  f = tmp_path / "a_file"
  f.write_text("x")
  with pytest.raises(WorkdirError, match=r"--workdir=.*a_file is a file, not a directory"):
    cli.check_workdir(str(f))
  with pytest.raises(WorkdirError, match=r"a_file/sub: cannot create the directory \(Not a "
                                         r"directory"):
    cli.check_workdir(str(f / "sub"))
  cli.check_workdir(str(tmp_path / "new" / "dir"))
  assert (tmp_path / "new" / "dir").is_dir()
  cli.check_workdir("gs://bucket/run")  # left to lcrec_jax.fs
  out = entry.run("main", f"--config={QUICK}", f"--workdir={f}", cwd=REPO)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert _error_lines(out.stderr)[0] == f"main: error: --workdir={f} is a file, not a directory"


@pytest.mark.slow
def test_data_error_is_one_line_and_the_traceback_is_in_the_log_file(tmp_path):
  """A header-only interaction file: a DataError at load, one line on stderr (after the
  run's own log lines), exit 2; the traceback is in <workdir>/main.*.INFO only."""
  data = tmp_path / "data"
  data.mkdir()
  (data / "toy.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n")
  (data / "toy.item").write_text("item_id:token\ttitle:token_seq\ni1\tRed\n")
  wd = tmp_path / "run"
  out = _main(f"--workdir={wd}", "--stages=index", "--config.data.format=recbole",
              f"--config.data.path={data}", "--config.data.name=toy")
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  err = _error_lines(out.stderr)
  assert err == [f"main: error: {data}/toy.inter: no usable user: 0 users and 0 interactions "
                 "read, and a user needs at least 3 interactions with known items "
                 "(leave-one-out split)"]
  (log,) = [p for p in glob.glob(str(wd / "main.*INFO*")) if not os.path.islink(p)]
  text = open(log).read()
  assert "Traceback" in text and "DataError" in text
