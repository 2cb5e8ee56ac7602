"""Stage manifests and the plan, end to end: `lcrec_jax.main` run four times in one workdir.

MovieLens-100K with random 8-d item embeddings (no MiniLM), a 2-level RQ-VAE trained for
2 epochs, 2 training steps of a 1-layer model and 4 evaluation users keep each run short.
Run 1 builds everything; then an eval field re-runs only eval, a train field re-runs
train and eval from scratch (old checkpoints gone) and reuses the index, and
`--force=index` re-runs index, train and eval. The logged plan must say so each time.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = [
    "--config.embed.encoder=npy",
    "--config.rqvae.encoder_layers=(16,)", "--config.rqvae.e_dim=8",
    "--config.rqvae.num_levels=2", "--config.rqvae.codebook_size=48",
    "--config.rqvae.sk_epsilons=(0.0,0.0)", "--config.rqvae.epochs=2",
    "--config.rqvae.eval_every=1", "--config.rqvae.checkpoint_every=2",
    "--config.rqvae.kmeans_init=False", "--config.index.repair_rounds=2",
    "--config.tasks.sample_nums=(100,50,50,50,50,50)", "--config.tasks.buckets=(256,)",
    "--config.model.overrides.hidden=32", "--config.model.overrides.layers=1",
    "--config.model.overrides.intermediate=64", "--config.model.tokenizer_vocab=300",
    "--config.train.batch_size=8", "--config.train.num_steps=2",
    "--config.train.warmup_steps=1", "--config.train.checkpoint_every=2",
    "--config.train.valid_users=8", "--config.train.tensorboard=False",
    "--config.eval.quick_users=4", "--config.eval.max_users=4",
    "--config.eval.template_ids=(0,)", "--config.eval.batch_size=4",
    "--config.eval.splits=('test',)",
]


def _run(workdir, emb, *extra):
  proc = subprocess.run(
      [sys.executable, "-m", "lcrec_jax.main", "--config=configs/ml100k_quick.py",
       f"--workdir={workdir}", f"--config.embed.npy_path={emb}", *SMALL, *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


def _plan(log: str) -> dict[str, str]:
  """{stage: "reuse" | "run" | "run from scratch"} from the logged plan."""
  lines = log.split("plan for ", 1)[1].splitlines()[1:]
  out = {}
  for line in lines:
    parts = line.split()
    if not parts or parts[0] not in ("index", "train", "eval", "baseline"):
      break
    out[parts[0]] = " ".join(parts[1:4]) if parts[1:3] == ["run", "from"] else parts[1]
  return out


def _manifest(workdir, d):
  return json.loads((workdir / d / "MANIFEST.json").read_text())


@pytest.mark.slow
def test_changed_inputs_and_force_rerun_exactly_the_dependent_stages(tmp_path):
  emb = tmp_path / "emb.npy"
  np.save(emb, np.random.default_rng(0).normal(size=(1682, 8)).astype(np.float32))
  wd = tmp_path / "run"

  log = _run(wd, emb)
  assert _plan(log) == {"index": "run", "train": "run from scratch", "eval": "run from scratch"}
  first = {d: _manifest(wd, d) for d in ("index", "model", "eval")}
  assert first["model"]["reads"]["train.lr"] == 2e-3
  assert "eval.num_beams" not in first["model"]["reads"]  # train does not read eval fields
  assert first["eval"]["upstream"]["train"].startswith("sha256:")
  assert first["index"]["outputs"]["index/index.json"]["sha256"].startswith("sha256:")
  assert first["model"]["outputs"]["model/model.safetensors"]["size"] > 0

  # An eval field: only eval runs.
  log = _run(wd, emb, "--config.eval.seed=1")
  assert _plan(log) == {"index": "reuse", "train": "reuse", "eval": "run from scratch"}
  assert "eval.seed 0 -> 1" in log
  assert _manifest(wd, "model") == first["model"]

  # A train field: train and eval run, train from scratch; the index is reused.
  (wd / "train" / "checkpoints" / "2" / "OLD").write_text("from the lr=2e-3 run")
  log = _run(wd, emb, "--config.eval.seed=1", "--config.train.lr=1e-3")
  assert _plan(log) == {"index": "reuse", "train": "run from scratch",
                        "eval": "run from scratch"}
  assert "train.lr 0.002 -> 0.001" in log and "upstream train runs" in log
  assert not (wd / "train" / "checkpoints" / "2" / "OLD").exists()  # old state removed
  assert _manifest(wd, "index") == first["index"]
  second = _manifest(wd, "model")
  assert second["reads"]["train.lr"] == 1e-3

  # Nothing changed: everything reused.
  log = _run(wd, emb, "--config.eval.seed=1", "--config.train.lr=1e-3")
  assert _plan(log) == {"index": "reuse", "train": "reuse", "eval": "reuse"}

  # --force=index: index, train and eval all run.
  log = _run(wd, emb, "--config.eval.seed=1", "--config.train.lr=1e-3", "--force=index")
  assert _plan(log) == {"index": "run from scratch", "train": "run from scratch",
                        "eval": "run from scratch"}
  assert "upstream index runs" in log
  assert _manifest(wd, "model")["upstream"]["index"] != second["upstream"]["index"]

  # A stage outside --stages whose inputs changed is refused, not silently used.
  proc = subprocess.run(
      [sys.executable, "-m", "lcrec_jax.main", "--config=configs/ml100k_quick.py",
       f"--workdir={wd}", f"--config.embed.npy_path={emb}", *SMALL, "--stages=eval",
       "--config.eval.seed=1", "--config.train.lr=5e-4"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "train.lr 0.001 -> 0.0005" in proc.stderr, proc.stderr[-3000:]
