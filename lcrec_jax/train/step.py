"""Loss on label positions only, and the jitted (sharded, accumulating) train/eval steps.

Batch layout (from `lcrec_jax.tasks.batching`), all `[batch, len]`:
  tokens          int32 token ids,
  labels          int32, HF convention: `labels[b, t]` is the token expected *at*
                  position t (usually `tokens[b, t]`), `IGNORE` (-100) where there is
                  no loss (prompt and padding); the model's output at t-1 predicts it,
  attention_mask  int32/bool, 1 for real tokens,
  positions       int32 rotary positions,
  segment_ids     optional (packed rows, `tasks.batching` packing): int32 id of the
                  example each token belongs to (1, 2, ...; 0 = padding). Attention stays
                  inside a segment, positions restart per segment, and no target crosses a
                  segment boundary, so a packed row's loss sums are those of its examples.

The loss is the mean token cross-entropy over all label positions of the (global,
accumulated) batch. The vocab projection runs only at label positions: per example,
the hidden states predicting a label are gathered into a fixed buffer of
`max_label_tokens` rows, then `model.logits` maps them to the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcrec_jax.llm.lora import LoraTree
from lcrec_jax.tasks.batching import IGNORE
from lcrec_jax.runtime import finite
from lcrec_jax.train import mesh as mesh_lib
from lcrec_jax.train.state import TrainState, merge_params

BATCH_KEYS = ("tokens", "labels", "attention_mask", "positions")
PACKED_KEYS = BATCH_KEYS + ("segment_ids",)
PyTree = Any
Batch = Mapping[str, jax.Array]


def _check_batch(batch: Batch) -> None:
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise KeyError(f"train step: batch lacks {missing}; expected keys {BATCH_KEYS}")


def cast_floating(tree: PyTree, dtype: jnp.dtype) -> PyTree:
  """Casts floating leaves of `tree` to `dtype` (mixed precision compute copy)."""
  return jax.tree.map(
      lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, tree)


def shifted_targets(labels: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """Next-token targets `[batch, len]`: `labels[:, t + 1]` at t, IGNORE at the last position.

  With `segment_ids [batch, len]` (packed rows) a target whose token starts another
  segment than position t's is IGNORE too: no example predicts its neighbour's first token.
  """
  pad = jnp.full((labels.shape[0], 1), IGNORE, labels.dtype)
  targets = jnp.concatenate([labels[:, 1:], pad], axis=1)
  if segment_ids is None:
    return targets
  same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                          jnp.zeros((labels.shape[0], 1), jnp.bool_)], axis=1)
  return jnp.where(same, targets, IGNORE)


def _model_inputs(batch: Batch) -> dict[str, jax.Array]:
  """Keyword inputs of the model's forward pass (segment_ids only for packed batches)."""
  kw = {"positions": batch["positions"], "attention_mask": batch["attention_mask"]}
  if "segment_ids" in batch:
    kw["segment_ids"] = batch["segment_ids"]
  return kw


def gather_label_positions(targets: jax.Array, max_label_tokens: int
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per example, the first `max_label_tokens` positions whose target is a label.

  Args:
    targets: `[batch, len]` next-token targets (IGNORE = no loss).
    max_label_tokens: buffer size R per example.

  Returns:
    (idx `[batch, R]` positions, tgt `[batch, R]` targets (0 where unused),
    weight `[batch, R]` float32, 1 for real label slots).
  """
  valid = targets != IGNORE
  order = jnp.argsort(jnp.logical_not(valid).astype(jnp.int8), axis=1, stable=True)
  idx = order[:, :max_label_tokens]
  weight = jnp.take_along_axis(valid, idx, axis=1)
  tgt = jnp.where(weight, jnp.take_along_axis(targets, idx, axis=1), 0)
  return idx, tgt, weight.astype(jnp.float32)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-position cross-entropy in float32: `logsumexp(logits) - logits[target]`.

  Args:
    logits: `[..., vocab]`.
    targets: `[...]` int token ids (must be valid ids).
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


def label_loss_sums(params: PyTree, model: nn.Module, batch: Batch, max_label_tokens: int = 0,
                    compute_dtype: jnp.dtype = jnp.float32, rngs: dict | None = None
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Summed cross-entropy over label positions, logits only where labels are.

  Args:
    params: full (unboxed) param tree, or a `LoraTree(params=base, lora=adapters)` to run
      LoRA adapters on the fly (`lcrec_jax.llm.lora`).
    model: Linen LLaMA with `__call__(tokens, positions=, attention_mask=, return_hidden=)`
      returning `(hidden [B, T, D], cache)` and a `logits(hidden)` method.
    batch: dict with BATCH_KEYS, `[B, T]` each.
    max_label_tokens: label slots per example R; 0 = T (never drops a label).
    compute_dtype: params are cast to this for the forward pass (float32 master
      weights stay in the caller).
    rngs: optional Linen RNG streams (e.g. dropout).

  Returns:
    (loss_sum, (label_count, dropped_count)): float32 scalars; dropped counts labels
    beyond the R-slot buffer (they get no loss; the trainer refuses such batches).
  """
  _check_batch(batch)
  p = cast_floating(params, compute_dtype)
  extra = {}
  if isinstance(p, LoraTree):
    p, extra = p.params, {"lora": p.lora}
  hidden, _ = model.apply({"params": p}, batch["tokens"], **_model_inputs(batch),
                          return_hidden=True, rngs=rngs or {}, **extra)
  targets = shifted_targets(batch["labels"], batch.get("segment_ids"))
  seq_len = targets.shape[1]
  r = seq_len if max_label_tokens <= 0 else min(int(max_label_tokens), seq_len)
  idx, tgt, weight = gather_label_positions(targets, r)
  h = jnp.take_along_axis(hidden, idx[..., None], axis=1)           # [B, R, D]
  h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))
  logits = model.apply({"params": p}, h, method="logits")           # [B, R, V]
  logits = nn.with_logical_constraint(
      logits, ("activation_batch", "activation_length", "activation_vocab"))
  ce = token_cross_entropy(logits, tgt)
  total = jnp.sum((targets != IGNORE).astype(jnp.float32))
  count = jnp.sum(weight)
  return jnp.sum(ce * weight), (count, total - count)


def full_logits_loss(params: PyTree, model: nn.Module, batch: Batch) -> jax.Array:
  """Reference mean loss computing logits at every position (for tests and debugging)."""
  extra = {}
  if isinstance(params, LoraTree):
    params, extra = params.params, {"lora": params.lora}
  logits, _ = model.apply({"params": params}, batch["tokens"], **_model_inputs(batch),
                          **extra)
  targets = shifted_targets(batch["labels"], batch.get("segment_ids"))
  valid = targets != IGNORE
  ce = token_cross_entropy(logits, jnp.where(valid, targets, 0))
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def split_micro_batches(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
  """Host-side `[B, T]` -> `[n, B / n, T]`; micro-batch i = rows i, i + n, i + 2n, ...

  Works on numpy or jax arrays. Strided rows spread every micro-batch evenly over the
  batch-sharded devices. Done before the step so that the jitted step never reshapes
  a sharded batch dimension (which would need communication).
  """
  out = {}
  for k, v in batch.items():
    if v.shape[0] % n:
      raise ValueError(f"train.grad_accum_steps={n} does not divide the batch size "
                       f"{v.shape[0]} (batch key {k!r})")
    out[k] = v.reshape(v.shape[0] // n, n, *v.shape[1:]).swapaxes(0, 1)
  return out


def _constrain_batch(batch: Batch, lead: int = 0) -> Batch:
  """Constrains `[*lead, batch, ...]` arrays to batch sharding over (data, fsdp)."""
  return {k: nn.with_logical_constraint(
      v, (None,) * lead + ("activation_batch",) + (None,) * (v.ndim - 1 - lead))
          for k, v in batch.items()}


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule | None = None,
               grad_accum_steps: int = 1, max_label_tokens: int = 0,
               compute_dtype: jnp.dtype = jnp.float32) -> tuple[TrainState, dict]:
  """One optimizer step over a global batch, accumulating `grad_accum_steps` micro-batches.

  Pure function (jit it with `make_train_step`). With `grad_accum_steps` n > 1 the
  batch arrives split as `[n, B / n, T]` (see `split_micro_batches`). The loss is
  sum(CE over every label of the batch) / (number of labels), i.e. exactly the loss
  of the whole batch at once, whatever the micro-batch split.

  Finite or nothing: when the loss, the gradient norm or any leaf of the updated
  params / optimizer state is NaN or inf, the params and optimizer state are left as
  they were (only `step` and `rng` advance, so the batch counts as consumed) and
  `is_finite` is 0. The choice is made inside the jitted step, with no host round trip.

  Returns:
    (new state, metrics dict of float32 scalars: loss, grad_norm, lr, label_tokens,
    dropped_label_tokens, tokens, is_finite (1.0 = update committed, 0.0 = skipped)).
  """
  rng, step_rng = jax.random.split(state.rng)
  batch = _constrain_batch(batch, lead=1 if grad_accum_steps > 1 else 0)
  frozen = state.frozen

  def loss_fn(trainable, micro):
    params = merge_params(trainable, frozen)
    return label_loss_sums(params, model, micro, max_label_tokens, compute_dtype,
                           rngs={"dropout": step_rng})

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps <= 1:
    (loss_sum, (count, dropped)), grads = grad_fn(state.trainable, batch)
  else:
    if batch["tokens"].shape[0] != grad_accum_steps:
      raise ValueError(f"train step: batch must be split into [{grad_accum_steps}, B / "
                       f"{grad_accum_steps}, T] micro-batches, got {batch['tokens'].shape}")

    def body(carry, micro):
      g_acc, l_acc, c_acc, d_acc = carry
      micro = _constrain_batch(micro)
      (l, (c, d)), g = grad_fn(state.trainable, micro)
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      return (g_acc, l_acc + l, c_acc + c, d_acc + d), None

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32))
    (grads, loss_sum, count, dropped), _ = jax.lax.scan(body, init, batch)

  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  loss, grad_norm = loss_sum / denom, optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & finite.all_finite(trainable, opt_state)
  trainable = finite.select_tree(ok, trainable, state.trainable)
  opt_state = finite.select_tree(ok, opt_state, state.opt_state)
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "is_finite": ok.astype(jnp.float32),
      "lr": jnp.asarray(schedule(state.step) if schedule is not None else 0.0, jnp.float32),
      "label_tokens": count,
      "dropped_label_tokens": dropped,
      "tokens": jnp.sum(batch["attention_mask"].astype(jnp.float32)),
  }
  new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng)
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, model: nn.Module, max_label_tokens: int = 0,
              compute_dtype: jnp.dtype = jnp.float32) -> dict:
  """Summed validation loss of one batch: {'loss_sum', 'label_tokens'} (float32 scalars)."""
  batch = _constrain_batch(batch)
  loss_sum, (count, _) = label_loss_sums(state.params, model, batch, max_label_tokens,
                                         compute_dtype)
  return {"loss_sum": loss_sum, "label_tokens": count}


def train_batch_sharding(mesh: Mesh, grad_accum_steps: int = 1) -> NamedSharding:
  """Sharding of one train-step input: `[B, T]`, or `[n, B / n, T]` when accumulating."""
  if grad_accum_steps > 1:
    return NamedSharding(mesh, PartitionSpec(None, mesh_lib.BATCH_AXES, None))
  return mesh_lib.batch_sharding(mesh, 2)


def with_context(fn: Callable, mesh: Mesh | None, rules: mesh_lib.LogicalRules) -> Callable:
  """Runs `fn` (and so its tracing) under the mesh and the logical axis rules."""

  def wrapped(*args):
    with nn.logical_axis_rules(rules):
      if mesh is None:
        return fn(*args)
      with jax.set_mesh(mesh):
        return fn(*args)

  wrapped.jitted = fn  # the jax.jit object, for lowering without running (lcrec_jax.plan)
  return wrapped


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    shardings: TrainState | None, mesh: Mesh | None,
                    rules: mesh_lib.LogicalRules = mesh_lib.DEFAULT_AXIS_RULES,
                    schedule: optax.Schedule | None = None, grad_accum_steps: int = 1,
                    max_label_tokens: int = 0, compute_dtype: jnp.dtype = jnp.float32,
                    donate: bool = True, packed: bool = False
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`jax.jit`-compiled `train_step` with explicit in/out shardings and a donated state.

  Args:
    model: the Linen model.
    tx: optimizer over the trainable tree.
    shardings: `TrainState` of NamedShardings (from `state.state_shardings`); None with
      `mesh=None` compiles an unsharded step (single device reference).
    mesh: the device mesh, or None.
    rules: logical axis rules for activation constraints.
    schedule: learning-rate schedule, only for the `lr` metric.
    grad_accum_steps: micro-batches per step.
    max_label_tokens: label slots per example (0 = sequence length).
    compute_dtype: forward/backward dtype (bf16 with float32 master params).
    donate: donate the input state's buffers.
    packed: batches carry `segment_ids` (PACKED_KEYS; packed rows); False = BATCH_KEYS,
      today's step unchanged.

  Returns:
    `step(state, batch) -> (state, metrics)`.
  """
  fn = lambda s, b: train_step(s, b, model=model, tx=tx, schedule=schedule,
                               grad_accum_steps=grad_accum_steps,
                               max_label_tokens=max_label_tokens, compute_dtype=compute_dtype)
  kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
  if mesh is not None:
    keys = PACKED_KEYS if packed else BATCH_KEYS
    batch_shard = {k: train_batch_sharding(mesh, grad_accum_steps) for k in keys}
    kwargs["in_shardings"] = (shardings, batch_shard)
    kwargs["out_shardings"] = (shardings, mesh_lib.replicated(mesh))
  return with_context(jax.jit(fn, **kwargs), mesh, rules)


def make_eval_step(model: nn.Module, *, shardings: TrainState | None, mesh: Mesh | None,
                   rules: mesh_lib.LogicalRules = mesh_lib.DEFAULT_AXIS_RULES,
                   max_label_tokens: int = 0, compute_dtype: jnp.dtype = jnp.float32,
                   packed: bool = False) -> Callable[[TrainState, Batch], dict]:
  """`jax.jit`-compiled `eval_step` (state not donated); `packed` as `make_train_step`."""
  fn = lambda s, b: eval_step(s, b, model=model, max_label_tokens=max_label_tokens,
                              compute_dtype=compute_dtype)
  kwargs: dict[str, Any] = {}
  if mesh is not None:
    keys = PACKED_KEYS if packed else BATCH_KEYS
    batch_shard = {k: mesh_lib.batch_sharding(mesh, 2) for k in keys}
    kwargs["in_shardings"] = (shardings, batch_shard)
    kwargs["out_shardings"] = mesh_lib.replicated(mesh)
  return with_context(jax.jit(fn, **kwargs), mesh, rules)
