"""Sharded train step == unsharded step on 8 simulated CPU devices; intended shardings.

Meshes (data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2), (1,1,8). Tolerance (float32): loss
within 1e-6 relative, gradient global norm within 1e-5 relative, and params after one
AdamW step (lr 1e-3) within 1e-5 absolute, i.e. 1% of the step Adam's first update makes
(~lr per weight). Adam divides by |g| + eps, so weights with gradients near zero turn
reduction-order noise of ~1e-9 in g into ~3e-6 in the update; that is the slack.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lcrec_jax.pipeline import spec as spec_lib
from lcrec_jax.llm.config import tiny
from lcrec_jax.llm.model import Llama
from lcrec_jax.train import mesh as mesh_lib
from lcrec_jax.train import state as state_lib
from lcrec_jax.train import step as step_lib

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
VOCAB, B, T = 512, 16, 16


@pytest.fixture(scope="module")
def setup():
  model = Llama(tiny(vocab=VOCAB, hidden=64, layers=2, heads=8, kv_heads=4, intermediate=128))
  tokens = np.zeros((1, 8), np.int32)
  boxed = state_lib.abstract_boxed_params(model, tokens)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.asarray(tokens))["params"])
  rs = np.random.RandomState(0)
  toks = rs.randint(3, VOCAB, (B, T)).astype(np.int32)
  mask = (np.arange(T)[None] < rs.randint(T // 2, T + 1, (B, 1))).astype(np.int32)
  labels = np.where((np.arange(T)[None] >= T // 3) & (mask == 1), toks, -100).astype(np.int32)
  batch = dict(tokens=toks, labels=labels, attention_mask=mask,
               positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))
  cfg = spec_lib.section_settings("train", lr=1e-3, warmup_steps=0, schedule="constant",
                                  weight_decay=0.01, max_grad_norm=1.0)
  tx, schedule = state_lib.make_optimizer(cfg, 10)
  # Unsharded reference (one device, no mesh).
  trainable = jax.tree.map(jnp.copy, params)
  ref_state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), trainable=trainable,
      frozen=jax.tree.map(lambda _: None, params), opt_state=tx.init(trainable),
      rng=jax.random.PRNGKey(7))
  ref_fn = step_lib.make_train_step(model, tx, shardings=None, mesh=None, schedule=schedule,
                                    donate=False)
  ref_new, ref_m = ref_fn(ref_state, batch)
  return dict(model=model, boxed=boxed, params=params, batch=batch, tx=tx, schedule=schedule,
              ref_params=jax.device_get(ref_new.params), ref_loss=float(ref_m["loss"]),
              ref_grad_norm=float(ref_m["grad_norm"]))


def _mesh(shape):
  cfg = spec_lib.section("mesh")
  cfg.data, cfg.fsdp, cfg.tensor = shape
  return mesh_lib.make_mesh(cfg)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_matches_unsharded(setup, shape):
  mesh = _mesh(shape)
  rules = mesh_lib.DEFAULT_AXIS_RULES
  tx, params = setup["tx"], setup["params"]
  shardings = state_lib.state_shardings(tx, setup["boxed"], None, mesh, rules)
  state = state_lib.create_train_state(params, tx, shardings, jax.random.PRNGKey(7))
  fn = step_lib.make_train_step(setup["model"], tx, shardings=shardings, mesh=mesh,
                                rules=rules, schedule=setup["schedule"])
  new, m = fn(state, mesh_lib.shard_batch_from_host(setup["batch"], mesh))
  np.testing.assert_allclose(float(m["loss"]), setup["ref_loss"], rtol=1e-6)
  np.testing.assert_allclose(float(m["grad_norm"]), setup["ref_grad_norm"], rtol=1e-5)
  got = jax.device_get(new.params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(setup["ref_params"])):
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path))

  # Intended shardings, after the step (out_shardings) for params and Adam moments.
  data, fsdp, tensor = shape
  t_ax = "tensor"
  expect = {
      ("embed_tokens", "embedding"): P(t_ax, "fsdp"),                   # [vocab, embed]
      ("lm_head", "kernel"): P("fsdp", t_ax),                           # [embed, vocab]
      ("layers_0", "self_attn", "q_proj", "kernel"): P("fsdp", t_ax, None),  # heads 8
      ("layers_1", "mlp", "down_proj", "kernel"): P(t_ax, "fsdp"),      # [mlp, embed]
      ("norm", "scale"): P(None),
  }
  # kv_heads=4 cannot split 8 ways: that dimension falls back to replicated.
  expect[("layers_0", "self_attn", "k_proj", "kernel")] = (
      P("fsdp", t_ax if tensor <= 4 else None, None))
  adam = new.opt_state[1][0]
  for keys, spec in expect.items():
    leaf, mu = new.trainable, adam.mu
    for k in keys:
      leaf, mu = leaf[k], mu[k]
    want = jax.sharding.NamedSharding(mesh, spec)
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (keys, leaf.sharding.spec, spec)
    assert mu.sharding.is_equivalent_to(want, mu.ndim), (keys, mu.sharding.spec, spec)
    if fsdp * tensor > 1 and keys[0] == "lm_head":
      assert leaf.addressable_shards[0].data.size == leaf.size // (fsdp * tensor)
  assert adam.count.sharding.is_fully_replicated
  assert new.step.sharding.is_fully_replicated


def test_accumulation_on_mesh_matches_unsharded(setup):
  """grad_accum_steps=2 on the (2, 2, 2) mesh: same step as the unsharded big batch."""
  mesh = _mesh((2, 2, 2))
  tx = setup["tx"]
  shardings = state_lib.state_shardings(tx, setup["boxed"], None, mesh,
                                        mesh_lib.DEFAULT_AXIS_RULES)
  state = state_lib.create_train_state(setup["params"], tx, shardings, jax.random.PRNGKey(7))
  fn = step_lib.make_train_step(setup["model"], tx, shardings=shardings, mesh=mesh,
                                schedule=setup["schedule"], grad_accum_steps=2)
  host = step_lib.split_micro_batches(setup["batch"], 2)
  batch = mesh_lib.shard_batch_from_host(host, mesh, step_lib.train_batch_sharding(mesh, 2), 1)
  new, m = fn(state, batch)
  np.testing.assert_allclose(float(m["loss"]), setup["ref_loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.device_get(new.params)),
                  jax.tree.leaves(setup["ref_params"])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_resolve_mesh_shape_and_errors():
  assert mesh_lib.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert mesh_lib.resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="at most one"):
    mesh_lib.resolve_mesh_shape((-1, -1, 1), 8)
  with pytest.raises(ValueError, match="not divisible"):
    mesh_lib.resolve_mesh_shape((-1, 3, 1), 8)
  with pytest.raises(ValueError, match="set one of them to -1"):
    mesh_lib.resolve_mesh_shape((2, 2, 1), 8)
  mesh = _mesh((-1, 1, 2))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  cfg = spec_lib.section("mesh")
  cfg.axis_rules = (("embed", "model"),)
  with pytest.raises(ValueError, match="unknown mesh axis"):
    mesh_lib.axis_rules(cfg)


def test_host_rows_and_batch_placement():
  mesh = _mesh((2, 2, 2))
  sharding = mesh_lib.batch_sharding(mesh)
  assert mesh_lib.host_rows(sharding, (16, 4)) == slice(0, 16)  # one process holds all
  x = np.arange(64, dtype=np.int32).reshape(16, 4)
  arr = mesh_lib.shard_batch_from_host({"x": x}, mesh)["x"]
  np.testing.assert_array_equal(np.asarray(arr), x)
  assert arr.addressable_shards[0].data.shape == (4, 4)  # 16 rows over data*fsdp = 4


def test_recipe_config_sections():
  """configs/ml100k_quick.py's c.mesh rules are the defaults; c.train has every field."""
  from configs.ml100k_quick import get_config
  c = get_config()
  assert mesh_lib.axis_rules(c.mesh) == mesh_lib.DEFAULT_AXIS_RULES
  assert set(c.train.keys()) == set(spec_lib.section("train").keys())
