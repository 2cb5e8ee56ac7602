"""benchmarks/scale_pipeline.py: each stage runs as a measured subprocess and lands in the
json and markdown tables (the data and embedding stages here; the others are main's)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lcrec_jax.recipes import sibling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_generate_and_embed_are_measured(tmp_path):
  r = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "scale_pipeline.py"),
       f"--out={tmp_path}", "--users=40", "--items=30", "--interactions=300",
       "--text_chars=200", "--embed=bow", "--stages=generate,embed",
       "--override=c.train.batch_size = 8"], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.load(open(tmp_path / "scale.json"))
  rows = {row["stage"]: row for row in out["stages"]}
  assert list(rows) == ["generate", "embed"]
  for row in rows.values():
    assert row["rc"] == 0 and row["wall_s"] > 0 and row["cpu_s"] > 0
    assert 20 < row["peak_rss_mib"] < 4096  # a python process's own RSS, in MiB
  assert (out["meta"]["users"], out["meta"]["items"], out["meta"]["interactions"]) == (
      40, 30, 300)
  emb = np.load(tmp_path / "item_emb_bow.npy")
  assert emb.shape == (30, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
  c = sibling(str(tmp_path / "recipe.py"), "recipe.py").get_config()
  assert (c.data.format, c.data.path, c.embed.encoder) == (
      "lcrec", str(tmp_path / "data"), "npy")
  assert c.train.batch_size == 8 and c.eval.max_users == 0
  assert "| **total** |" in open(tmp_path / "scale.md").read()
