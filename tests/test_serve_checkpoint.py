"""`recommend` and the server restore the params the eval stage evaluates: the newest train
checkpoint on the recipe's mesh (8 simulated CPU devices here), not the HF export.

One tiny real run (`main --stages=index,train`, in process) gives a workdir with both; the
restored params must be sharded on the recipe's ``('data', 'fsdp', 'tensor')`` mesh, give
the same answers as the export of the same step (the export is written from the final
state), and the server's batched engine on that mesh must equal `recommend` row by row.
With the checkpoints gone the error names them and ``--params=export``.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest

from lcrec_jax import recommend as rec
from tests import entry
from tests.test_provenance import SMALL

HISTORIES = [["Toy Story", "Heat", "50"], ["50"], [str(i) for i in range(100, 112)]]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ckpt_run")
  emb = tmp / "emb.npy"
  np.save(emb, np.random.default_rng(0).normal(size=(1682, 8)).astype(np.float32))
  wd = str(tmp / "run")
  out = entry.run("main", "--config=configs/ml100k_quick.py", f"--workdir={wd}",
                  f"--config.embed.npy_path={emb}", *SMALL, "--stages=index,train",
                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-3000:]
  return wd


@pytest.mark.slow
def test_checkpoint_on_the_recipe_mesh_answers_as_the_export(workdir):
  run = rec.load_finished_run(workdir)           # the default: --params=checkpoint
  assert run.source == "train" and run.step == 2
  assert run.params_path.endswith(os.path.join("train", "checkpoints"))
  assert tuple(run.mesh.axis_names) == ("data", "fsdp", "tensor")
  assert run.mesh.size == jax.device_count() == 8
  for leaf in jax.tree.leaves(run.params):       # restored where they live, not gathered
    assert leaf.sharding.mesh.shape == run.mesh.shape
  assert "train checkpoint step 2" in rec.describe_params(run)
  export = rec.load_finished_run(workdir, "export")
  assert export.source == "export" and export.mesh is None
  for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(export.params), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=0, atol=1e-6)
  matcher = rec.ItemMatcher(run.dataset)
  for h in HISTORIES:
    hist = [matcher.resolve(x) for x in h]
    got = rec.recommend(run, hist, 5)
    want = rec.recommend(export, hist, 5)
    assert [r["item_id"] for r in got] == [r["item_id"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-4)


@pytest.mark.slow
def test_engine_on_the_checkpoint_mesh_equals_recommend(workdir):
  from lcrec_jax.serve.engine import Engine
  run = rec.load_finished_run(workdir)
  engine = Engine(run, (1, 8))
  assert engine.decoder.mesh is run.mesh
  queries = [engine.query(engine.resolve(h), 4, True, None) for h in HISTORIES]
  for q, answer in zip(queries, engine.run_batch(queries)):
    want = rec.recommend(run, list(q.history), 4)
    assert [r["item_id"] for r in answer] == [r["item_id"] for r in want]
    assert [r["score"] for r in answer] == pytest.approx([r["score"] for r in want], abs=1e-5)


@pytest.mark.slow
def test_no_checkpoint_names_it_and_the_export_flag(workdir, tmp_path):
  wd = str(tmp_path / "copy")
  shutil.copytree(workdir, wd)
  shutil.rmtree(os.path.join(wd, "train", "checkpoints"))
  with pytest.raises(rec.RecommendError, match=r"train[/\\]checkpoints: no finished "
                                               r"checkpoint.*--params=export"):
    rec.load_finished_run(wd)
  out = entry.run("recommend", f"--workdir={wd}", "--history=Toy Story")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "--params=export" in out.stderr
  ok = entry.run("recommend", f"--workdir={wd}", "--history=Toy Story", "--k=3",
                 "--params=export", "--json")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert '"source": "export"' in ok.stdout


@pytest.mark.slow
def test_relative_workdir_as_the_readme_gives_it(workdir):
  """`--workdir=runs/ml100k` from the repository root: orbax needs absolute paths."""
  parent, name = os.path.split(workdir)
  out = entry.run("recommend", f"--workdir={name}", "--history=Toy Story; 50", "--k=3",
                  "--json", cwd=parent)
  assert out.returncode == 0, out.stderr[-2000:]
  assert '"source": "train"' in out.stdout and '"step": 2' in out.stdout
