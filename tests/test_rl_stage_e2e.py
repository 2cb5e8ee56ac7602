"""`main --stages=index,train,rl,eval` end to end on a tiny model: the rl stage writes its
checkpoints, summary and DONE; eval evaluates its policy and records it upstream; a later
run without rl in --stages reuses everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_provenance import ROOT, SMALL

RL = ["--config.rl.num_steps=2", "--config.rl.prompts_per_step=8",
      "--config.rl.num_generations=4", "--config.rl.prefixes_per_user=1",
      "--config.rl.checkpoint_every=1", "--config.rl.lr=1e-3"]


def _run(workdir, emb, *extra):
  proc = subprocess.run(
      [sys.executable, "-m", "lcrec_jax.main", "--config=configs/ml100k_rl.py",
       f"--workdir={workdir}", f"--config.embed.npy_path={emb}", *SMALL, *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


@pytest.mark.slow
def test_rl_stage_end_to_end(tmp_path):
  emb = tmp_path / "emb.npy"
  np.save(emb, np.random.default_rng(0).normal(size=(1682, 8)).astype(np.float32))
  wd = tmp_path / "run"
  log = _run(wd, emb, "--stages=index,train,rl,eval", *RL)
  assert "== stage rl (run)" in log
  summary = json.loads((wd / "rl" / "summary.json").read_text())
  assert summary["step"] == 2 and 0 <= summary["zero_adv_share"] <= 1
  assert summary["num_prompts"] == 943 and summary["evals"]   # one prompt per user
  assert sorted(p.name for p in (wd / "rl" / "checkpoints").iterdir() if p.name.isdigit()) \
      == ["1", "2"]
  results = json.loads((wd / "eval" / "results.json").read_text())
  assert results["settings"]["policy"] == "rl"
  manifest = json.loads((wd / "eval" / "MANIFEST.json").read_text())
  assert manifest["upstream"]["rl"].startswith("sha256:")
  rows = [json.loads(x) for x in (wd / "rl" / "metrics.jsonl").read_text().splitlines()]
  assert {"rl/reward", "rl/kl", "rl/zero_adv_share"} <= set(rows[0])
  log = _run(wd, emb, *RL)   # default stages: the finished rl stage is current
  assert "== stage eval (reuse)" in log and "== stage rl" not in log
