"""README.md's Quickstart command, as written, from a fresh working directory.

The test reads the first command of the Quickstart block, takes its
`python -m lcrec_jax.main ...` part verbatim (relative `--workdir` included), and runs it
from a new temporary directory holding a copy of the repository's `configs/` and
`lcrec_jax/` (what a fresh clone has), with `--config.*` overrides appended only to make
it small. Then every path the README's "What a run produces" table promises for the
default stages must exist under that relative workdir, and the README's `recommend`
command must answer from it.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Only to make the run small: a few RQ-VAE epochs, training steps and evaluation users.
SMALL = [
    "--config.rqvae.epochs=4", "--config.rqvae.eval_every=2",
    "--config.rqvae.checkpoint_every=2", "--config.rqvae.kmeans_iters=10",
    "--config.index.repair_rounds=4",
    "--config.tasks.sample_nums=(300,100,100,100,100,100)", "--config.tasks.buckets=(256,)",
    "--config.model.tokenizer_vocab=512",
    "--config.train.batch_size=8", "--config.train.num_steps=3",
    "--config.train.warmup_steps=1", "--config.train.checkpoint_every=3",
    "--config.train.valid_users=8", "--config.eval.quick_users=8",
    "--config.eval.max_users=8", "--config.eval.template_ids=(0,)",
    "--config.eval.batch_size=8",
]


def _section(title: str) -> str:
  m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
  assert m, f"README.md has no '## {title}' section"
  return m.group(1)


def quickstart_main_command() -> list[str]:
  """argv of the first Quickstart command's `python -m lcrec_jax.main ...` part."""
  block = re.search(r"```bash\n(.*?)```", _section("Quickstart"), re.S).group(1)
  first = next(line for line in block.splitlines() if line.strip()
               and not line.lstrip().startswith("#"))
  part = next(p.strip() for p in first.split("&&") if "lcrec_jax.main" in p)
  return shlex.split(part)


def promised_paths() -> list[str]:
  """DIR/... paths of the outputs table for the default stages (index, train, eval)."""
  paths = []
  for row in _section("What a run produces").splitlines():
    if not row.startswith("| `DIR/"):
      continue
    first_cell = row.split("|")[1]
    paths += re.findall(r"`DIR/([^`]+)`", first_cell)
  assert len(paths) >= 10, paths
  # baselines/ and rl/ come from stages outside the default --stages; logs/ from gs:// only
  return [p for p in paths if not p.startswith(("baselines/", "rl/", "logs/"))]


def test_readme_parsing():
  argv = quickstart_main_command()
  assert argv[:3] == ["python", "-m", "lcrec_jax.main"]
  workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
  assert not os.path.isabs(workdir)  # the case that crashed orbax
  assert "index/index.json" in promised_paths()


@pytest.mark.slow
def test_readme_quickstart_verbatim(tmp_path):
  argv = quickstart_main_command()
  workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
  cwd = tmp_path / "clone"
  for d in ("configs", "lcrec_jax"):
    shutil.copytree(ROOT / d, cwd / d, ignore=shutil.ignore_patterns("__pycache__"))
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable] + argv[1:] + SMALL, cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  run = cwd / workdir
  for rel in promised_paths():
    pattern = re.sub(r"<[^>]+>", "*", rel)
    assert glob.glob(str(run / pattern)), f"README promises {workdir}/{rel}; not there"
  for d in ("index", "model", "eval"):
    assert json.loads((run / d / "MANIFEST.json").read_text())["finished"]
  results = json.loads((run / "eval" / "results.json").read_text())
  assert 0.0 <= results["test"]["mean"]["NDCG@10"] <= 1.0

  rec = re.search(r"```\n(python -m lcrec_jax\.recommend [^\n]*)\n```", _section("Recommend"))
  rec_argv = shlex.split(rec.group(1).replace("--workdir=DIR", f"--workdir={workdir}")
                         .replace(" [--json]", " --json"))
  out = subprocess.run([sys.executable] + rec_argv[1:], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  answer = json.loads(out.stdout)
  assert len(answer["recommendations"]) == 10
  assert {h["title"] for h in answer["history"]} >= {"Toy Story (1995)", "Heat (1995)"}
