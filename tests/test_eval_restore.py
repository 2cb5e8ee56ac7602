"""`eval.restore`: the trainable part of a training checkpoint, frozen base rebuilt, LoRA
merged on the devices, onto a (data=2, fsdp=2, tensor=2) mesh in the compute dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.errors import WorkdirError
from lcrec_jax.eval import restore
from lcrec_jax.llm import lora as lora_lib
from lcrec_jax.llm.config import tiny
from lcrec_jax.llm.model import Llama, init_params
from lcrec_jax.runtime import checkpoint as ckpt_lib
from lcrec_jax.train import mesh as mesh_lib
from lcrec_jax.train import state as state_lib


def _setup(tmp_path, lora: bool, dict_on_disk: bool = False):
  cfg = tiny(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)
  model = Llama(cfg)
  base = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
  tree, mask = base, None
  if lora:
    adapters = lora_lib.init_lora(jax.random.PRNGKey(1), base, cfg, rank=4, alpha=8.0,
                                  targets=("q_proj", "down_proj"))
    tree = lora_lib.LoraTree(params=base, lora=adapters)
    mask = lora_lib.trainable_mask(tree)
  trainable, _ = state_lib.split_params(tree, mask)
  # "Trained": every trainable leaf moved (lora_b away from zero, so merging matters).
  rng = np.random.default_rng(0)
  trained = jax.tree.map(lambda x: np.asarray(x) + rng.normal(size=np.shape(x)).astype(
      np.float32) * 0.05, trainable)
  saved = trained
  if dict_on_disk:  # as written before LoraTree: {"params": ..., "lora": ...}
    saved = {"params": trained.params, "lora": trained.lora}
  ckpt_dir = str(tmp_path / "checkpoints")
  with ckpt_lib.Checkpointer(ckpt_dir, async_save=False) as ckpt:
    ckpt.save(7, {"step": np.int32(7), "trainable": saved,
                  "opt_state": {"mu": saved}, "rng": np.zeros(2, np.uint32)},
              {"epoch": 0, "step_in_epoch": 7}, force=True)
  _, frozen = state_lib.split_params(tree, mask)
  want = state_lib.merge_params(trained, frozen)
  if lora:
    want = lora_lib.merge(want.params, want.lora)
  return model, tree, mask, ckpt_dir, jax.device_get(want)


@pytest.mark.parametrize("lora,dict_on_disk", [(False, False), (True, False), (True, True)],
                         ids=["full", "lora", "lora_dict_checkpoint"])
def test_restores_trained_params_sharded_and_merged(tmp_path, lora, dict_on_disk):
  model, tree, mask, ckpt_dir, want = _setup(tmp_path, lora, dict_on_disk)
  mesh = mesh_lib.make_mesh(_mesh_cfg())
  params, step = restore.restore_trained_params(ckpt_dir, model, tree, mask, mesh,
                                                mesh_lib.DEFAULT_AXIS_RULES)
  assert step == 7
  assert jax.tree.structure(params) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # The training rules' shardings: [embed 32, mlp 64] split over fsdp and tensor.
  gate = params["layers_0"]["mlp"]["gate_proj"]["kernel"]
  assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert gate.addressable_shards[0].data.shape == (16, 32)
  if lora:  # the merged kernel differs from the frozen base: the adapters are in it
    base_q = np.asarray(tree.params["layers_0"]["self_attn"]["q_proj"]["kernel"])
    assert np.abs(np.asarray(params["layers_0"]["self_attn"]["q_proj"]["kernel"])
                  - base_q).max() > 1e-3


def test_compute_dtype_and_missing_checkpoint(tmp_path):
  model, tree, mask, ckpt_dir, want = _setup(tmp_path, lora=False)
  mesh = mesh_lib.make_mesh(_mesh_cfg())
  params, _ = restore.restore_trained_params(ckpt_dir, model, tree, mask, mesh,
                                             mesh_lib.DEFAULT_AXIS_RULES,
                                             compute_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_allclose(np.asarray(params["lm_head"]["kernel"], np.float32),
                             want["lm_head"]["kernel"], atol=1e-2)
  with pytest.raises(WorkdirError, match="none: no finished training checkpoint"):
    restore.restore_trained_params(str(tmp_path / "none"), model, tree, mask, mesh,
                                   mesh_lib.DEFAULT_AXIS_RULES)
  with pytest.raises(ValueError, match="train.compute_dtype"):
    restore.restore_trained_params(ckpt_dir, model, tree, mask, mesh,
                                   mesh_lib.DEFAULT_AXIS_RULES, compute_dtype="fp8")


def _mesh_cfg():
  c = spec.section("mesh")
  c.data, c.fsdp, c.tensor = 2, 2, 2
  return c


def test_validation_hook_finds_the_training_mesh(tmp_path):
  """The trainer's validation decodes on the mesh the params live on (no gathering)."""
  from lcrec_jax.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  model, tree, mask, ckpt_dir, _ = _setup(tmp_path, lora=False)
  mesh = mesh_lib.make_mesh(_mesh_cfg())
  params, _ = restore.restore_trained_params(ckpt_dir, model, tree, mask, mesh,
                                             mesh_lib.DEFAULT_AXIS_RULES)
  assert evaluate_lib._training_mesh(params) is mesh  # pylint: disable=protected-access
  assert evaluate_lib._training_mesh(tree) is None  # pylint: disable=protected-access
