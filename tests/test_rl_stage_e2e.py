"""`main --stages=index,train,rl,eval` end to end on a tiny model: the rl stage writes its
checkpoints, summary and DONE; eval evaluates its policy and records it upstream; a later
run without rl in --stages reuses everything."""

from __future__ import annotations

import json
import os
import re
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
  from lcrec_jax import recommend as rec   # recommend / the server serve the rl policy
  served = rec.load_finished_run(str(wd))
  assert served.source == "rl" and served.step == 2
  assert served.params_path.endswith(os.path.join("rl", "checkpoints"))
  log = _run(wd, emb, *RL)   # default stages: the finished rl stage is current
  assert "== stage eval (reuse)" in log and "== stage rl" not in log
  # The collaborative reward from a saved SASRec (random, tiny): the stage runs again from
  # scratch with it, and it is in the rewards at its weight. Per beam, the ranking reward
  # averages |penalty of the target's rank| / G <= 0.098 (G = 4) over a group, the collab
  # reward (a softmax over the group) 1 / G, x 0.5 = 0.125.
  assert summary["reward"] < 0.098
  import jax
  from lcrec_jax.baselines import sasrec
  model = sasrec.SASRec(1682, 50, dim=8, num_blocks=1, num_heads=1)
  params = model.init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32), train=False)["params"]
  sas = tmp_path / "sasrec.npz"
  sasrec.save(str(sas), model, params)
  log = _run(wd, emb, "--stages=rl", *RL, "--config.rl.reward_collab=0.5",
             f"--config.rl.collab_sasrec={sas}")
  assert re.search(r"\brl\s+run from scratch", log), log[-3000:]
  summary = json.loads((wd / "rl" / "summary.json").read_text())
  assert summary["step"] == 2 and summary["reward"] >= 0.125 - 1e-6
  manifest = json.loads((wd / "rl" / "MANIFEST.json").read_text())
  assert str(sas) in manifest["inputs"]
