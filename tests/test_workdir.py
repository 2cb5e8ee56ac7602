"""The workdir layout and the stage plan (lcrec_jax/pipeline/workdir.py), on hand-made workdirs.

Finished stages are simulated by their DONE files plus the manifests `main` writes, so
each decision rule is checked in milliseconds; tests/test_provenance.py runs `main`.
"""

from __future__ import annotations

import json
import os

import pytest

from configs.ml100k_quick import get_config
from lcrec_jax.pipeline import spec
from lcrec_jax.pipeline import workdir as wl
from lcrec_jax.errors import WorkdirError


def _flat(**changes):
  c = spec.resolve(get_config())
  for k, v in changes.items():
    section, leaf = k.split("__")
    c[section][leaf] = v
  return spec.flatten(c)


def _finish(wd, stage, flat, manifest=True):
  """What a finished run of `stage` leaves: its DONE file (+ its manifest)."""
  done = wl.done_path(wd, stage)
  os.makedirs(os.path.dirname(done), exist_ok=True)
  with open(done, "w") as f:
    f.write("{}" if done.endswith(".json") else "")
  if manifest:
    wl.write_manifest(wd, stage, flat, finished=True)


def _decisions(steps):
  return {s.stage: ("scratch" if s.fresh else "run") if s.run else "reuse" for s in steps}


STAGES = ("index", "train", "eval")


def test_layout_is_one_place(tmp_path):
  wd = str(tmp_path)
  from lcrec_jax.pipeline.stages.index import index_paths
  lay = wl.Layout(wd)
  assert index_paths(wd)["done"] == wl.done_path(wd, "index") == f"{wd}/index/DONE"
  assert lay.model_dir == f"{wd}/model" and lay.model_done == wl.done_path(wd, "train")
  assert lay.results == wl.done_path(wd, "eval") == f"{wd}/eval/results.json"
  assert lay.rl_done == wl.done_path(wd, "rl") and lay.baseline_done == wl.done_path(
      wd, "baseline")
  assert wl.manifest_path(wd, "train") == f"{wd}/model/MANIFEST.json"
  assert lay.state_dirs("train") == [f"{wd}/train", f"{wd}/model"]
  from lcrec_jax.pipeline.stages import REGISTRY
  os.makedirs(f"{wd}/index")
  open(f"{wd}/index/index.json", "w").close()
  assert REGISTRY["index"].outputs(lay) == {"index/index.json": f"{wd}/index/index.json"}


def test_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert wl.absolute("runs/ml100k") == str(tmp_path / "runs" / "ml100k")
  assert wl.absolute("gs://bucket/runs/x") == "gs://bucket/runs/x"
  assert os.path.isabs(wl.absolute("~/x"))


def test_fresh_workdir_runs_everything(tmp_path):
  steps = wl.plan(str(tmp_path), _flat(), STAGES, [])
  assert _decisions(steps) == {"index": "run", "train": "scratch", "eval": "scratch"}
  assert "upstream index runs" in steps[1].reason


def test_unchanged_inputs_reuse_and_each_change_reruns_its_dependents(tmp_path):
  wd, flat = str(tmp_path), _flat()
  for s in STAGES:
    _finish(wd, s, flat)
  assert _decisions(wl.plan(wd, flat, STAGES, [])) == dict.fromkeys(STAGES, "reuse")
  # eval field: eval only
  steps = wl.plan(wd, _flat(eval__seed=3), STAGES, [])
  assert _decisions(steps) == {"index": "reuse", "train": "reuse", "eval": "scratch"}
  assert "eval.seed 0 -> 3" in steps[2].reason
  # train field: train and eval
  steps = wl.plan(wd, _flat(train__lr=1e-4), STAGES, [])
  assert _decisions(steps) == {"index": "reuse", "train": "scratch", "eval": "scratch"}
  # index field: everything
  steps = wl.plan(wd, _flat(rqvae__epochs=7), STAGES, [])
  assert _decisions(steps) == {"index": "scratch", "train": "scratch", "eval": "scratch"}
  # fields no stage's outputs depend on: reused
  steps = wl.plan(wd, _flat(train__progress_log_s=5.0, eval__shard=False), STAGES, [])
  assert _decisions(steps) == dict.fromkeys(STAGES, "reuse")


def test_force_reruns_the_stage_and_everything_downstream(tmp_path):
  wd, flat = str(tmp_path), _flat()
  for s in STAGES:
    _finish(wd, s, flat)
  # --force is the start-over: the stage's outputs and checkpoints are removed first
  assert _decisions(wl.plan(wd, flat, STAGES, ["index"])) == {
      "index": "scratch", "train": "scratch", "eval": "scratch"}
  assert _decisions(wl.plan(wd, flat, STAGES, ["train"])) == {
      "index": "reuse", "train": "scratch", "eval": "scratch"}


def test_rebuilt_upstream_makes_downstream_stale(tmp_path):
  """`--stages=index --force=index` then `--stages=train,eval`: train sees a new index."""
  wd, flat = str(tmp_path), _flat()
  for s in STAGES:
    _finish(wd, s, flat)
  old = json.load(open(wl.manifest_path(wd, "index")))
  with open(wl.done_path(wd, "index").replace("DONE", "index.json"), "w") as f:
    f.write('{"1": ["<a_1>"]}')  # the re-run wrote other codes
  wl.write_manifest(wd, "index", flat, finished=True)
  assert json.load(open(wl.manifest_path(wd, "index")))["outputs"] != old.get("outputs")
  steps = wl.plan(wd, flat, ("train", "eval"), [])
  assert _decisions(steps) == {"train": "scratch", "eval": "scratch"}
  assert "upstream index was rebuilt" in steps[0].reason


def test_upstream_outside_stages_must_be_current(tmp_path):
  wd, flat = str(tmp_path), _flat()
  with pytest.raises(WorkdirError, match="index is not finished"):
    wl.plan(wd, flat, ("train",), [])
  for s in STAGES:
    _finish(wd, s, flat)
  with pytest.raises(WorkdirError, match=r"train\.lr 0\.002 -> 0\.0001"):
    wl.plan(wd, _flat(train__lr=1e-4), ("eval",), [])


def test_unfinished_stage_with_same_inputs_resumes(tmp_path):
  wd, flat = str(tmp_path), _flat()
  _finish(wd, "index", flat)
  wl.write_manifest(wd, "train", flat, finished=False)  # interrupted training
  steps = wl.plan(wd, flat, STAGES, [])
  assert _decisions(steps) == {"index": "reuse", "train": "run", "eval": "scratch"}
  assert "resumes" in steps[1].reason


def test_lower_lr_after_a_divergence_resumes_an_unfinished_train_stage(tmp_path):
  """The advice of a divergence ("re-run with a lower train.lr") must not wipe the finite
  checkpoints: an unfinished train stage whose only changes are RESUMABLE resumes."""
  wd, flat = str(tmp_path), _flat()
  _finish(wd, "index", flat)
  wl.write_manifest(wd, "train", flat, finished=False)  # stopped by a NaN step
  steps = wl.plan(wd, _flat(train__lr=1e-4), STAGES, [])
  assert _decisions(steps) == {"index": "reuse", "train": "run", "eval": "scratch"}
  assert "resumes" in steps[1].reason and "train.lr" in steps[1].reason
  # any other change, or a finished stage, still starts over
  steps = wl.plan(wd, _flat(train__lr=1e-4, train__weight_decay=0.1), STAGES, [])
  assert _decisions(steps)["train"] == "scratch"
  _finish(wd, "train", flat)
  assert _decisions(wl.plan(wd, _flat(train__lr=1e-4), STAGES, []))["train"] == "scratch"


def test_workdir_without_manifests_is_reused_with_a_warning(tmp_path):
  wd, flat = str(tmp_path), _flat()
  for s in STAGES:
    _finish(wd, s, flat, manifest=False)
  steps = wl.plan(wd, flat, STAGES, [])
  assert _decisions(steps) == dict.fromkeys(STAGES, "reuse")
  assert all("no MANIFEST.json" in s.reason and s.unchecked for s in steps)
  # forcing one rebuilds it and what follows
  assert _decisions(wl.plan(wd, flat, STAGES, ["train"]))["eval"] == "scratch"


def test_unreadable_manifest_counts_as_not_finished_so_a_rerun_or_force_repairs_it(tmp_path):
  """A broken manifest must not block its own repair (issue 24, case 3): a plain re-run
  runs the stage (with a warning naming the file), --force rebuilds it; a stage outside
  --stages that needs it is one error naming the file."""
  wd, flat = str(tmp_path), _flat()
  for s in STAGES:
    _finish(wd, s, flat)
  with open(wl.manifest_path(wd, "train"), "w") as f:
    f.write("{not json")
  steps = wl.plan(wd, flat, STAGES, [])
  assert _decisions(steps) == {"index": "reuse", "train": "run", "eval": "scratch"}
  assert "MANIFEST.json: unreadable" in steps[1].warning
  assert "counted as not finished" in steps[1].reason
  assert _decisions(wl.plan(wd, flat, STAGES, ["train"]))["train"] == "scratch"
  with pytest.raises(WorkdirError, match=r"eval needs train, but .*MANIFEST.json: unreadable"):
    wl.plan(wd, flat, ("eval",), [])


def test_clear_stage_removes_its_directories_only(tmp_path):
  wd = str(tmp_path)
  for d in ("index", "train/checkpoints/3", "model", "cache"):
    os.makedirs(tmp_path / d)
  wl.clear_stage(wd, "train")
  assert sorted(os.listdir(tmp_path)) == ["cache", "index"]


def test_edited_data_file_reruns_every_stage_that_reads_it(tmp_path):
  """A data file changed in place (same config) makes its readers stale; an old manifest
  without input hashes is not checked."""
  import shutil
  from lcrec_jax.data.movielens import ml100k_dir
  data = tmp_path / "data"
  shutil.copytree(ml100k_dir(), data)
  wd = str(tmp_path / "run")
  flat = _flat(data__path=str(data))
  for s in STAGES:
    _finish(wd, s, flat)
  assert _decisions(wl.plan(wd, flat, STAGES, [])) == dict.fromkeys(STAGES, "reuse")
  manifest = wl.read_manifest(wd, "index")
  assert str(data / "ml-100k.inter") in manifest["inputs"]
  assert str(data / "ml-100k.item") in manifest["inputs"]
  with open(data / "ml-100k.inter", "a") as f:
    f.write("1\t1\t5\t881250950\n")
  steps = wl.plan(wd, flat, STAGES, [])
  assert _decisions(steps) == {"index": "scratch", "train": "scratch", "eval": "scratch"}
  assert f"data file {data / 'ml-100k.inter'} changed" in steps[0].reason
  # a manifest from before input hashes: the data is not checked (reused as before)
  m = wl.read_manifest(wd, "index")
  del m["inputs"]
  with open(wl.manifest_path(wd, "index"), "w") as f:
    json.dump(m, f)
  assert _decisions(wl.plan(wd, flat, ("index",), [])) == {"index": "reuse"}


def test_added_default_off_fields_do_not_rerun_older_stages():
  """A manifest written before a default-off option existed reads as that default."""
  new = {"tasks.pack_length": 0, "rqvae.cf_weight": 0.0, "train.lr": 0.002}
  assert wl._diff({"train.lr": 0.002}, new) == []
  changed = wl._diff({"train.lr": 0.002}, {**new, "tasks.pack_length": 512})
  assert changed == ["tasks.pack_length 0 -> 512"]
