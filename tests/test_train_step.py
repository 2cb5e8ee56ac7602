"""Train step: label-only loss, label masking, gradient accumulation, masks, bf16.

Tiny LLaMA (2 layers, hidden 64, vocab 512), unsharded (single device). References:
numpy float64 cross-entropy over the full logits, and the same batch without
accumulation.
"""

import functools

import flax.linen as nn
import optax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.llm.config import tiny
from lcrec_jax.llm.model import Llama
from lcrec_jax.train import state as state_lib
from lcrec_jax.train import step as step_lib

VOCAB, B, T = 512, 8, 16


@pytest.fixture(scope="module")
def model_and_params():
  model = Llama(tiny(vocab=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params


def make_batch(seed: int = 0, b: int = B, t: int = T) -> dict[str, np.ndarray]:
  """Right-padded prompt + response + EOS rows; labels on response and EOS only."""
  rs = np.random.RandomState(seed)
  tokens = np.zeros((b, t), np.int32)
  labels = np.full((b, t), -100, np.int32)
  mask = np.zeros((b, t), np.int32)
  for r in range(b):
    p = rs.randint(3, t // 2)
    n_resp = rs.randint(1, 6)
    n = min(p + n_resp + 1, t)
    seq = rs.randint(3, VOCAB, n)
    seq[-1] = 2  # EOS
    tokens[r, :n] = seq
    mask[r, :n] = 1
    labels[r, p:n] = seq[p:]
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  return dict(tokens=tokens, labels=labels, attention_mask=mask, positions=positions)


def numpy_loss(model, params, batch) -> float:
  """float64 cross-entropy from full logits, only where labels are."""
  logits, _ = model.apply({"params": params}, jnp.asarray(batch["tokens"]),
                          positions=jnp.asarray(batch["positions"]),
                          attention_mask=jnp.asarray(batch["attention_mask"]))
  logits = np.asarray(logits, np.float64)[:, :-1]
  targets = batch["labels"][:, 1:]
  valid = targets != -100
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, np.where(valid, targets, 0)[..., None], -1)[..., 0]
  return float(((lse - picked) * valid).sum() / valid.sum())


@functools.lru_cache(maxsize=None)
def _loss_fn(model, r):
  return jax.jit(lambda p, b: step_lib.label_loss_sums(p, model, b, r))


def label_loss(model, params, batch, r=0):
  s, (c, d) = _loss_fn(model, r)(params, batch)
  return float(s / c), float(c), float(d)


def opt_cfg(**kw) -> ml_collections.ConfigDict:
  """The train section at the spec's defaults with this file's optimizer (no warmup)."""
  c = spec.section("train")
  c.update(dict(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.01,
                max_grad_norm=1.0, b1=0.9, b2=0.999, eps=1e-8, **kw))
  return c


def test_label_gather_equals_full_logits_float64(model_and_params):
  model, params = model_and_params
  batch = make_batch()
  ref = numpy_loss(model, params, batch)
  n_labels = int((batch["labels"][:, 1:] != -100).sum())
  max_per_row = int((batch["labels"][:, 1:] != -100).sum(1).max())
  for r in (0, max_per_row, T // 2):
    loss, count, dropped = label_loss(model, params, batch, r)
    assert count == n_labels and dropped == 0
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_allclose(float(step_lib.full_logits_loss(params, model, batch)), ref,
                             rtol=1e-6)


def test_too_small_label_buffer_reports_dropped(model_and_params):
  model, params = model_and_params
  batch = make_batch()
  per_row = (batch["labels"][:, 1:] != -100).sum(1)
  _, count, dropped = label_loss(model, params, batch, 1)
  assert count == B and dropped == per_row.sum() - B


def test_prompt_and_padding_get_no_loss(model_and_params):
  """Changing prompt labels' ids, padding tokens or their labels (still -100) changes nothing;
  moving a label onto the response / EOS does."""
  model, params = model_and_params
  batch = make_batch(1)
  base, _, _ = label_loss(model, params, batch)
  changed = {k: v.copy() for k, v in batch.items()}
  pad = changed["attention_mask"] == 0
  changed["tokens"][pad] = 77  # padding tokens after the sequence: invisible (causal + mask)
  loss, _, _ = label_loss(model, params, changed)
  np.testing.assert_allclose(loss, base, rtol=1e-6)
  # Dropping the EOS label of row 0 changes the loss: EOS is trained.
  eos_pos = int(batch["attention_mask"][0].sum()) - 1
  no_eos = {k: v.copy() for k, v in batch.items()}
  no_eos["labels"][0, eos_pos] = -100
  loss2, count2, _ = label_loss(model, params, no_eos)
  assert count2 == label_loss(model, params, batch)[1] - 1
  assert abs(loss2 - base) > 1e-6
  # Labels on the prompt would add loss terms: labelling the whole prompt changes the count.
  all_lab = {k: v.copy() for k, v in batch.items()}
  all_lab["labels"] = np.where(batch["attention_mask"] == 1, batch["tokens"], -100)
  _, count3, _ = label_loss(model, params, all_lab)
  assert count3 == (batch["attention_mask"][:, 1:] == 1).sum()


def _one_step(model, params, batch, accum, mask=None, compute_dtype=jnp.float32, tx=None):
  schedule = None
  if tx is None:
    tx, schedule = state_lib.make_optimizer(opt_cfg(), 10)
  trainable, frozen = state_lib.split_params(params, mask)
  trainable = jax.tree.map(jnp.copy, trainable)  # the step donates the state
  frozen = jax.tree.map(jnp.copy, frozen)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                               frozen=frozen, opt_state=tx.init(trainable),
                               rng=jax.random.PRNGKey(3))
  fn = step_lib.make_train_step(model, tx, shardings=None, mesh=None, schedule=schedule,
                                grad_accum_steps=accum, compute_dtype=compute_dtype)
  host = step_lib.split_micro_batches(batch, accum) if accum > 1 else batch
  return fn(state, host)


def test_grad_accumulation_equals_big_batch(model_and_params):
  """4 micro-batches of 4 == one batch of 16: loss and gradients (SGD with lr 1 exposes
  them as the update)."""
  model, params = model_and_params
  batch = make_batch(2, b=16)
  sgd = optax.sgd(1.0)
  s1, m1 = _one_step(model, params, batch, 1, tx=sgd)
  s4, m4 = _one_step(model, params, batch, 4, tx=sgd)
  np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m1["loss"]), numpy_loss(model, params, batch), rtol=1e-6)
  assert float(m4["label_tokens"]) == float(m1["label_tokens"])
  g1 = jax.tree.map(jnp.subtract, params, s1.params)
  g4 = jax.tree.map(jnp.subtract, params, s4.params)
  assert min(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1)) > 0  # all get gradients
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7 + 1e-4 * float(
        jnp.max(jnp.abs(b))))


def test_trainable_mask_freezes_and_has_no_opt_state(model_and_params):
  model, params = model_and_params
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: "embed_tokens" not in jax.tree_util.keystr(path), params)
  state, _ = _one_step(model, params, make_batch(3), 1, mask=mask)
  np.testing.assert_array_equal(np.asarray(state.params["embed_tokens"]["embedding"]),
                                np.asarray(params["embed_tokens"]["embedding"]))
  assert state.trainable["embed_tokens"]["embedding"] is None
  assert float(jnp.max(jnp.abs(state.params["norm"]["scale"] - params["norm"]["scale"]))) > 0
  adam = state.opt_state[1][0]
  assert adam.mu["embed_tokens"]["embedding"] is None
  assert adam.mu["lm_head"]["kernel"].shape == params["lm_head"]["kernel"].shape


def test_bf16_compute_keeps_float32_master(model_and_params):
  model, params = model_and_params
  batch = make_batch(4)
  s32, m32 = _one_step(model, params, batch, 1)
  s16, m16 = _one_step(model, params, batch, 1, compute_dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
  np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=2e-2)
  assert float(m16["loss"]) != float(m32["loss"])  # really computed in bf16


def test_schedule_warmup_and_decay():
  cfg = opt_cfg()
  cfg.warmup_steps, cfg.schedule, cfg.end_lr_ratio = 4, "cosine", 0.1
  sched = state_lib.make_schedule(cfg, 20)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 2, 4)], [0.0, 5e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(float(sched(20)), 1e-4, rtol=1e-5)
  cfg.schedule = "linear"
  sched = state_lib.make_schedule(cfg, 20)
  np.testing.assert_allclose(float(sched(12)), 1e-3 - 0.5 * 9e-4, rtol=1e-5)
  cfg.schedule = "bogus"
  with pytest.raises(ValueError, match="train.schedule"):
    state_lib.make_schedule(cfg, 20)


def test_lora_tree_trains_adapters_only(model_and_params):
  """A `LoraTree` with lora.trainable_mask: base kernels stay, B moves; with
  B = 0 the first loss equals the base model's."""
  from lcrec_jax.llm import lora as lora_lib
  model, params = model_and_params
  adapters = lora_lib.init_lora(jax.random.PRNGKey(1), params, model.config, rank=4)
  tree = lora_lib.LoraTree(params=params, lora=adapters)
  mask = lora_lib.trainable_mask(tree, train_embeddings_rows=False)
  batch = make_batch(5)
  state, m = _one_step(model, tree, batch, 1, mask=mask)
  np.testing.assert_allclose(float(m["loss"]), numpy_loss(model, params, batch), rtol=1e-6)
  q = ("layers_0", "self_attn", "q_proj", "kernel")
  new_q, old_q = state.params.params, params
  for k in q:
    new_q, old_q = new_q[k], old_q[k]
  np.testing.assert_array_equal(np.asarray(new_q), np.asarray(old_q))
  b = state.params.lora.adapters["layers_0"]["self_attn"]["q_proj"]["lora_b"]
  assert float(jnp.max(jnp.abs(b))) > 0
  assert state.trainable.params["lm_head"]["kernel"] is None
