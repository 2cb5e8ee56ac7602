"""Train -> eval through the training checkpoint, on MovieLens-100K, from a provided index.

One tiny run (LC-Rec-format index file with duplicate codes -> index stage -> 24 train
steps of a 2-layer model -> eval; ~40 s quiet, ~90 s on a busy 2-core machine, so the
tests that use it are slow) is shared by the tests:

* the eval stage restores the checkpoint's params onto the training mesh and gives the
  same metrics and the same params as the HF export (``model/``) evaluated the old way;
* on an (data=2, fsdp=2, tensor=2) mesh the restored params are really sharded and the
  metrics do not change; ``train.compute_dtype=bfloat16`` restores bfloat16 params;
* a LoRA run (adapters trained on the fly, validated during training) exports the merged
  model, and the eval stage's restore (checkpoint + rebuilt base, merged on device) gives
  the same params;
* the provided index is checked (missing / extra items, ragged, malformed and
  out-of-range codes name the file and the item) and its duplicates are made unique with
  the moved items reported.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ml100k_quick
from lcrec_jax.data.errors import DataError
from lcrec_jax.data.loaders import load_dataset
from lcrec_jax.eval import evaluate as evaluate_lib
from lcrec_jax.pipeline.stages import eval as eval_stage
from lcrec_jax.index import provided
from lcrec_jax.pipeline.stages import index as index_stage
from lcrec_jax.index.item_index import code_token
from lcrec_jax.llm import safetensors_io
from lcrec_jax.llm.model import Llama
from lcrec_jax.llm.tokenizer import LCRecTokenizer
from lcrec_jax.pipeline.stages import train as train_stage

LEVELS, K = 3, 16  # 4096 codes for 1682 items: every prefix has free last-level codes
DUPLICATES = 6      # items given the code of another item in the file


def _config(index_path: str):
  c = ml100k_quick.get_config()
  c.index.source = "file"
  c.index.path = index_path
  c.index.level_size = K
  c.tasks.names = ("seqrec", "item2index")
  c.tasks.sample_nums = (200, 100)
  c.tasks.prompt_sample_nums = (1, 1)
  c.tasks.history_loss_tasks = ("seqrec",)
  c.tasks.buckets = (256,)  # one compiled shape
  c.model.tokenizer_vocab = 512
  c.model.overrides.hidden = 32
  c.model.overrides.intermediate = 64
  c.train.batch_size = 8
  c.train.num_steps = 24
  c.train.checkpoint_every = 100  # saved once, at the end
  c.train.valid_users = 8
  c.train.tensorboard = False
  c.train.async_checkpoint = False
  c.eval.max_users = 24
  c.eval.batch_size = 8
  c.eval.num_beams = 10
  c.eval.template_ids = (0,)
  c.eval.splits = ("test",)
  c.eval.quick_users = 8
  return c


def _index_file(path: str, dataset, duplicates: int = 0) -> dict:
  """An LC-Rec ``X.index.json`` for every MovieLens item (random distinct codes, then
  ``duplicates`` items copy the code of the item before them)."""
  rng = np.random.default_rng(0)
  grid = np.array(np.meshgrid(*[np.arange(K)] * LEVELS)).reshape(LEVELS, -1).T
  codes = rng.permutation(grid)[:dataset.num_items]
  for i in range(duplicates):
    codes[10 * i + 1] = codes[10 * i]
  data = {it.item_id: [code_token(l, c) for l, c in enumerate(row)]
          for it, row in zip(dataset.items, codes)}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)
  return data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The finished tiny run: ``(config, workdir, dataset, index, results)``."""
  workdir = str(tmp_path_factory.mktemp("handoff"))
  c = _config(os.path.join(workdir, "ml-100k.index.json"))
  dataset = load_dataset(c.data)
  _index_file(c.index.path, dataset, DUPLICATES)
  index = index_stage.run_index_stage(c, workdir, dataset, None)
  train_stage.run_train_stage(c, workdir, dataset, index)
  results = eval_stage.run_eval_stage(c, workdir, dataset, index)
  return c, workdir, dataset, index, results


def _test_examples(dataset, index, n=8):
  from lcrec_jax.tasks.builders import seqrec_eval_examples  # pylint: disable=g-import-not-at-top
  return seqrec_eval_examples(dataset, index, "test", 0, 20)[:n]


def _export(workdir):
  model_dir = os.path.join(workdir, "model")
  params, cfg = safetensors_io.load_hf_dir(model_dir)
  return Llama(cfg), params, LCRecTokenizer.from_dir(model_dir)


@pytest.mark.slow
def test_provided_index_with_duplicates_goes_through_train_and_eval(run):
  c, workdir, dataset, index, results = run
  assert index.is_conflict_free() and index.num_items == dataset.num_items
  with open(os.path.join(workdir, "index", "report.json")) as f:
    rep = json.load(f)
  assert rep["source"] == "file" and rep["level_sizes"] == [K] * LEVELS
  assert rep["repair"]["items_moved"] == DUPLICATES
  assert rep["colliding_items_before"] == 2 * DUPLICATES
  assert rep["collision_rate_before"] == pytest.approx(DUPLICATES / dataset.num_items)
  assert rep["collision_rate_after"] == 0.0
  with open(os.path.join(workdir, "index", "codes.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Items whose code was not duplicated keep it; the moved ones keep their prefix.
  with open(c.index.path) as f:
    given = json.load(f)
  with open(os.path.join(workdir, "index", "index.json")) as f:
    written = json.load(f)
  changed = [i for i in given if given[i] != written[i]]
  assert len(changed) == DUPLICATES
  assert all(given[i][:-1] == written[i][:-1] for i in changed)
  assert results["test"]["num_users"] == 24
  assert 0.0 <= results["test"]["mean"]["HR@10"] <= 1.0


@pytest.mark.slow
def test_eval_from_checkpoint_matches_the_export(run):
  c, workdir, dataset, index, results = run
  model, params, tokenizer = eval_stage.load_trained(c, workdir, index)
  e_model, e_params, e_tok = _export(workdir)
  assert e_model.config.vocab_size == model.config.vocab_size
  assert tokenizer.vocab_size == e_tok.vocab_size
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(e_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  old = evaluate_lib.evaluate(e_model, e_params, e_tok, dataset, index, c.eval, c.tasks,
                              progress=False)
  for key in ((("mean",), ("seen_excluded", "mean"))):
    want, got = old["test"], results["test"]
    for k in key:
      want, got = want[k], got[k]
    assert got == pytest.approx(want, abs=1e-6), key
  # The ranked lists themselves (24 steps teach little: metrics alone may be all zero).
  prompts = [evaluate_lib.eval_prompt_ids(tokenizer, ex.instruction, c.tasks, index.num_levels)
             for ex in _test_examples(dataset, index)]
  new_rank = evaluate_lib.Decoder(model, tokenizer, index, c.tasks.buckets,
                                  mesh=eval_stage.params_mesh(params))
  old_rank = evaluate_lib.Decoder(e_model, e_tok, index, c.tasks.buckets)
  kw = dict(num_beams=10, mode="trie", batch_size=8)
  items, scores = new_rank.rank(params, prompts, **kw)
  e_items, e_scores = old_rank.rank(e_params, prompts, **kw)
  np.testing.assert_array_equal(items, e_items)
  np.testing.assert_allclose(scores, e_scores, rtol=1e-5)
  assert (items >= 0).all() and np.isfinite(scores).all()


@pytest.mark.slow
def test_sharded_params_and_same_metrics_on_fsdp_tensor_mesh(run):
  c, workdir, dataset, index, results = run
  c = copy.deepcopy(c)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  model, params, tokenizer = eval_stage.load_trained(c, workdir, index)
  mesh = eval_stage.params_mesh(params)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  gate = params["layers_0"]["mlp"]["gate_proj"]["kernel"]  # [embed 32, mlp 64]
  assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert gate.addressable_shards[0].data.shape == (16, 32)
  decoder = evaluate_lib.Decoder(model, tokenizer, index, c.tasks.buckets, mesh=mesh)
  sharded = evaluate_lib.evaluate(model, params, tokenizer, dataset, index, c.eval, c.tasks,
                                  progress=False, decoder=decoder)
  for m, v in results["test"]["mean"].items():
    assert sharded["test"]["mean"][m] == pytest.approx(v, abs=1e-6), m


@pytest.mark.slow
def test_compute_dtype_bfloat16_restores_bfloat16_params(run):
  c, workdir, _, index, _ = run
  c = copy.deepcopy(c)
  c.train.compute_dtype = "bfloat16"
  _, params, _ = eval_stage.load_trained(c, workdir, index)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.slow
def test_lora_run_exports_and_restores_the_same_merged_params(tmp_path):
  workdir = str(tmp_path)
  c = _config(os.path.join(workdir, "ml-100k.index.json"))
  c.model.lora.rank, c.model.lora.alpha = 2, 4.0
  c.train.num_steps, c.train.eval_every, c.train.lr = 8, 8, 1e-2
  c.eval.max_users = 8
  dataset = load_dataset(c.data)
  _index_file(c.index.path, dataset)
  index = index_stage.run_index_stage(c, workdir, dataset, None)
  train_stage.run_train_stage(c, workdir, dataset, index)
  with open(os.path.join(workdir, "train", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert any("valid/HR@10" in r for r in records)  # the hook got base params + adapters
  _, params, _ = eval_stage.load_trained(c, workdir, index)
  _, e_params, _ = _export(workdir)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(e_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  base, _ = train_stage.trained_tree(c, *_base_params(c, workdir, index))
  q = ("layers_0", "self_attn", "q_proj", "kernel")
  a, b = params, base.params
  for k in q:
    a, b = a[k], b[k]
  moved = float(np.abs(np.asarray(a) - np.asarray(b)).max())
  assert moved > 0  # the adapters trained and are merged in


def _base_params(c, workdir, index):
  from lcrec_jax.llm import build  # pylint: disable=g-import-not-at-top
  model, base, _ = build.build_model(c.model, index, c.seed,
                                     tokenizer_dir=os.path.join(workdir, "train", "tokenizer"))
  return base, model.config


# --- the provided index's checks (no training) -------------------------------------------


@pytest.fixture(scope="module")
def ml100k():
  return load_dataset(ml100k_quick.get_config().data)


def _bad(tmp_path, dataset, edit):
  path = str(tmp_path / "bad.index.json")
  data = _index_file(path, dataset)
  edit(data)
  with open(path, "w") as f:
    json.dump(data, f)
  return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("50"), "have no code, e.g. item '50'"),
    (lambda d: d.update({"99999": ["<a_1>", "<b_2>", "<c_3>"]}), "not in dataset"),
    (lambda d: d.update({"7": ["<a_1>", "<b_2>"]}), "item '7' has a 2-token code"),
    (lambda d: d.update({"7": ["<a_1>", "<c_2>", "<b_3>"]}), "item '7': token '<c_2>' at position 1"),
    (lambda d: d.update({"7": ["<a_1>", "b_2", "<c_3>"]}), "item '7': not an item code token"),
    (lambda d: d.update({"7": "<a_1><b_2><c_3>"}), "item '7': the code must be a non-empty list"),
    (lambda d: d.update({"7": ["<a_1>", "<b_16>", "<c_3>"]}), "item '7': code '<b_16>' is out of range"),
])
def test_bad_index_files_name_the_file_and_item(tmp_path, ml100k, edit, message):
  path = _bad(tmp_path, ml100k, edit)
  with pytest.raises(DataError, match="bad.index.json") as e:
    provided.provided_index(path, ml100k, level_size=K)
  assert message in str(e.value)


def test_index_without_duplicates_is_taken_as_is(tmp_path, ml100k):
  path = str(tmp_path / "ok.index.json")
  data = _index_file(path, ml100k)
  index, rep = provided.provided_index(path, ml100k)
  assert index.to_json_dict() == data
  assert rep["repair"]["items_moved"] == 0 and not rep["repair"]["extra_level_added"]
  assert rep["level_sizes"] == [K] * LEVELS  # max code + 1 when level_size is 0


def test_not_json_and_missing_file(tmp_path, ml100k):
  path = tmp_path / "x.index.json"
  path.write_text("{not json")
  with pytest.raises(DataError, match="x.index.json: not valid json"):
    provided.provided_index(str(path), ml100k)
  with pytest.raises(DataError, match="nope.json"):
    provided.provided_index(str(tmp_path / "nope.json"), ml100k)
