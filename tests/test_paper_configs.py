"""LC-Rec paper recipes (Instruments, Arts, Games with LLaMA-7B): fields and data layout.

Each recipe must carry the paper's settings (RUCAIBox/LC-Rec run.sh, index/run.sh,
test.sh): 4 x 256 codes of dim 32, full fine-tune of LLaMA-7B in bf16, lr 5e-5, 4
epochs, cosine with 1% warmup, global batch 128, history 20, fusionseqrec sample counts
20,000 / 30,000 / 100,000, 20 beams, and a 16-chip TPU v4-32 mesh. The loader check
writes LC-Rec's released file layout (`<data>/<Dataset>/<Dataset>.{inter,item,index,
user}.json` and `.emb-llama-td.npy`) as small fixtures and loads it through the recipe's
own `c.data` / `c.embed` fields.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.index.provided import load_lcrec_index
from lcrec_jax.data.loaders import load_dataset
from lcrec_jax.llm import config as llm_config
from lcrec_jax.train import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"Instruments": ("lcrec_instruments_llama7b.py", 20000),
           "Arts": ("lcrec_arts_llama7b.py", 30000),
           "Games": ("lcrec_games_llama7b.py", 100000)}


def _load(filename):
  spec = importlib.util.spec_from_file_location(filename[:-3],
                                                os.path.join(ROOT, "configs", filename))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("dataset", sorted(RECIPES))
def test_recipe_fields(dataset):
  filename, fusion = RECIPES[dataset]
  c = _load(filename)
  assert (c.data.format, c.data.name) == ("lcrec", dataset)
  assert c.data.path.startswith("gs://")  # a placeholder the user replaces
  assert c.embed.encoder == "npy"
  assert c.embed.npy_path.endswith(f"/{dataset}/{dataset}.emb-llama-td.npy")
  # Item index: 4 levels x 256 codes of dim 32, Sinkhorn on the last level.
  assert (c.rqvae.num_levels, c.rqvae.codebook_size, c.rqvae.e_dim) == (4, 256, 32)
  assert tuple(c.rqvae.sk_epsilons) == (0.0, 0.0, 0.0, 0.003)
  assert tuple(c.rqvae.encoder_layers) == (2048, 1024, 512, 256, 128, 64)
  # Tasks: all six, fusionseqrec sampled as in LC-Rec's run.sh, history 20.
  assert tuple(c.tasks.names) == ("seqrec", "item2index", "index2item", "fusionseqrec",
                                  "itemsearch", "preferenceobtain")
  assert tuple(c.tasks.sample_nums) == (0, 0, 0, fusion, 0, 0)
  assert tuple(c.tasks.prompt_sample_nums) == (1,) * 6
  assert c.tasks.max_history == 20
  # Model: pretrained LLaMA-7B from a user-supplied HF directory, full fine-tune.
  assert c.model.init == "pretrained" and c.model.hf_dir and c.model.lora.rank == 0
  arch = llm_config.preset(c.model.preset)
  assert (arch.hidden_size, arch.num_hidden_layers, arch.vocab_size) == (4096, 32, 32000)
  assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", "float32")
  assert c.model.scan_layers and c.model.remat_policy == "full"
  # Optimisation as the paper ran it.
  t = c.train
  assert (t.batch_size, t.epochs, t.lr, t.schedule) == (128, 4, 5e-5, "cosine")
  assert t.warmup_ratio == 0.01 and t.weight_decay == 0.01
  assert t.compute_dtype == "bfloat16" and t.num_steps == 0
  assert set(spec.section("train").keys()) <= set(t.keys())
  # Mesh: a TPU v4-32 slice (16 chips) as FSDP; the batch splits evenly over it.
  assert c.mesh.tpu_slice == "v4-32"
  shape = mesh_lib.resolve_mesh_shape((c.mesh.data, c.mesh.fsdp, c.mesh.tensor), 16)
  assert shape == (1, 16, 1)
  assert t.batch_size % (t.grad_accum_steps * shape[0] * shape[1]) == 0
  assert mesh_lib.axis_rules(c.mesh) == mesh_lib.DEFAULT_AXIS_RULES
  assert c.eval.num_beams == 20


def test_warmup_steps_is_one_percent_of_all_steps():
  spec = importlib.util.spec_from_file_location(
      "_lcrec_paper", os.path.join(ROOT, "configs", "_lcrec_paper.py"))
  paper = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(paper)
  c = paper.paper_config("Games")
  assert paper.warmup_steps(12800, c) == 4       # 4 epochs x 100 steps -> 4
  assert paper.warmup_steps(100000, c) == 32     # 4 x 782 = 3128 steps -> ceil(31.28)
  assert paper.warmup_steps(128, c) == 1
  with pytest.raises(ValueError, match="dataset"):
    paper.paper_config("Beauty")


ITEMS = {
    "0": {"title": "Guitar Strings", "description": "Bright.", "brand": "Acme",
          "categories": "Musical Instruments,Strings"},
    "1": {"title": "Drum Sticks", "description": "Maple.", "brand": "Beat",
          "categories": "Musical Instruments,Drums"},
    "2": {"title": "Capo", "description": "", "brand": "Acme", "categories": "Accessories"},
    "3": {"title": "Tuner", "description": "Clip-on.", "brand": "Tune", "categories": "Tools"},
}
INTERS = {"0": [0, 1, 2, 3], "1": [3, 2, 1], "2": [1, 3, 0, 2]}
INDEX = {"0": ["<a_12>", "<b_200>", "<c_3>", "<d_255>"],
         "1": ["<a_12>", "<b_7>", "<c_0>", "<d_0>"],
         "2": ["<a_255>", "<b_0>", "<c_99>", "<d_1>"],
         "3": ["<a_0>", "<b_7>", "<c_0>", "<d_0>"]}
USERS = {"user_explicit_preference": {"0": ["strings"], "1": ["drums"], "2": ["tools"]},
         "user_vague_intention": {"train": {"0": {"item": 3, "inters": [0, 1, 2],
                                                  "querys": ["a tuner", "clip-on"]}},
                                  "test": {}}}


def _write_release(data_dir, dataset, emb_dim=16):
  """LC-Rec's released layout: <data>/<Dataset>/<Dataset>.<kind>.json + embeddings."""
  d = os.path.join(data_dir, dataset)
  os.makedirs(d)
  for kind, obj in (("item", ITEMS), ("inter", INTERS), ("index", INDEX), ("user", USERS)):
    with open(os.path.join(d, f"{dataset}.{kind}.json"), "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=4)
  emb = np.random.RandomState(0).randn(len(ITEMS), emb_dim).astype(np.float32)
  np.save(os.path.join(d, f"{dataset}.emb-llama-td.npy"), emb)
  return emb


@pytest.mark.parametrize("dataset", sorted(RECIPES))
def test_recipe_loads_lcrec_release_layout(tmp_path, dataset):
  c = _load(RECIPES[dataset][0])
  emb = _write_release(str(tmp_path / "data"), dataset)
  c.data.path = str(tmp_path / "data")  # the one path the user sets
  ds = load_dataset(c.data)
  assert ds.name == dataset and ds.num_users == 3
  assert [it.title for it in ds.items] == [v["title"] for v in ITEMS.values()]
  for seq, ref in zip(ds.sequences, INTERS.values()):
    np.testing.assert_array_equal(seq, ref)
  assert ds.user_text["0"]["user_vague_intention"]["train"]["item"] == 3
  # The embeddings path follows data.path; one row per item, in item order.
  assert c.embed.npy_path == str(tmp_path / "data" / dataset / f"{dataset}.emb-llama-td.npy")
  np.testing.assert_array_equal(np.load(c.embed.npy_path), emb)
  # A released index loads as 4 levels x 256 codes, the recipe's code space.
  sizes = (c.rqvae.codebook_size,) * c.rqvae.num_levels
  index = load_lcrec_index(os.path.join(c.data.path, dataset, f"{dataset}.index.json"), ds,
                           level_sizes=sizes)
  assert index.level_sizes == sizes and index.is_conflict_free()
  np.testing.assert_array_equal(index.codes[0], [12, 200, 3, 255])
  assert index.to_json_dict() == INDEX
