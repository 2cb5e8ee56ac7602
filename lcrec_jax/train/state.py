"""Train state, optimizer (AdamW + schedule + clipping) and sharded state creation.

Trainable/frozen split: with a trainable mask (LoRA, or freezing part of a model) the
params are split into a *trainable* tree and a *frozen* tree of the same structure,
with `None` where a leaf belongs to the other part. Gradients, gradient accumulators
and optimizer state exist only for the trainable part, so a frozen 7B base costs no
optimizer memory.
"""

from __future__ import annotations

import math

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from lcrec_jax.llm.lora import LoraTree
from lcrec_jax.train import mesh as mesh_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; saved whole in checkpoints.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    trainable: trainable params (None at frozen leaves), float32 master copy.
    frozen: frozen params (None at trainable leaves).
    opt_state: optax state over `trainable`.
    rng: uint32 `[2]` PRNG key data, split once per step.
  """
  step: jax.Array
  trainable: PyTree
  frozen: PyTree
  opt_state: PyTree
  rng: jax.Array

  @property
  def params(self) -> PyTree:
    """The full param tree (trainable and frozen merged)."""
    return merge_params(self.trainable, self.frozen)


def _is_none(x: Any) -> bool:
  return x is None


def split_params(params: PyTree, mask: PyTree | None) -> tuple[PyTree, PyTree]:
  """Splits params into (trainable, frozen) by a bool mask tree (None = all trainable)."""
  if mask is None:
    return params, jax.tree.map(lambda _: None, params)
  try:
    trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
  except ValueError as e:
    raise ValueError("train: the trainable mask must have the params' tree structure "
                     f"with bool leaves: {e}") from e
  return trainable, frozen


def merge_params(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of `split_params`."""
  return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=_is_none)


def make_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Learning-rate schedule: linear warmup from 0, then cosine / linear decay / constant.

  Args:
    cfg: the `c.train` section (`lr`, `warmup_steps` or `warmup_ratio` (a fraction of
      `num_steps`, LC-Rec's 1%; used when > 0), `schedule`, `end_lr_ratio`).
    num_steps: total optimizer steps of the run (warmup included).
  """
  lr = float(cfg.lr)
  warmup = int(cfg.warmup_steps)
  if float(cfg.warmup_ratio) > 0:
    warmup = int(math.ceil(float(cfg.warmup_ratio) * num_steps))
  warmup = min(warmup, max(num_steps - 1, 0))
  end = lr * float(cfg.end_lr_ratio)
  decay_steps = max(num_steps - warmup, 1)
  kind = cfg.schedule
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"train.schedule: unknown schedule {kind!r} (cosine | linear | constant)")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _decay_mask(params: PyTree) -> PyTree:
  """Weight decay on matrices only (not on norms, biases or other vectors)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int,
                   tail: optax.GradientTransformation | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping followed by AdamW with the configured schedule.

  Args:
    cfg: the `c.train` section (`lr`, `b1`, `b2`, `eps`, `weight_decay`,
      `max_grad_norm` (<= 0: no clipping), schedule fields).
    num_steps: total optimizer steps.
    tail: optional transform applied last (e.g. `lora.freeze_rows`).

  Returns:
    (optimizer over the trainable tree, learning-rate schedule).
  """
  schedule = make_schedule(cfg, num_steps)
  parts = []
  if cfg.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.max_grad_norm)))
  parts.append(optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay),
                           mask=_decay_mask))
  if tail is not None:
    parts.append(tail)
  return optax.chain(*parts), schedule


def abstract_boxed_params(model: nn.Module, example_tokens: jax.Array | np.ndarray) -> PyTree:
  """Shapes and logical axis boxes of `model`'s params, without allocating them."""
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(example_tokens)))
  return variables["params"]


def full_param_shardings(boxed_params: PyTree, mesh: Mesh, rules: mesh_lib.LogicalRules,
                         params: PyTree | None = None) -> PyTree:
  """Shardings of the trained param tree: the model's, plus replicated LoRA adapters.

  Args:
    boxed_params: the base model's abstract params with logical partitioning boxes.
    mesh: device mesh.
    rules: logical axis rules.
    params: the tree that will be trained when it is not the plain base tree, i.e. a
      `LoraTree`; its adapters (small) are replicated.
  """
  base = mesh_lib.param_shardings(boxed_params, mesh, rules)
  if isinstance(params, LoraTree):
    rep = mesh_lib.replicated(mesh)
    return LoraTree(params=base, lora=jax.tree.map(lambda _: rep, params.lora))
  return base


def _param_shapes(boxed_params: PyTree, params: PyTree | None) -> PyTree:
  if isinstance(params, LoraTree):
    return LoraTree(params=nn.unbox(boxed_params),
                    lora=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                      params.lora))
  return nn.unbox(boxed_params)


def state_shardings(tx: optax.GradientTransformation, boxed_params: PyTree, mask: PyTree | None,
                    mesh: Mesh, rules: mesh_lib.LogicalRules,
                    params: PyTree | None = None) -> TrainState:
  """NamedShardings for every leaf of the `TrainState` built from `boxed_params`.

  Args:
    tx: the optimizer.
    boxed_params: abstract params with logical partitioning boxes.
    mask: trainable mask (None = all trainable).
    mesh: device mesh.
    rules: logical axis rules.
    params: the trained tree when it is a LoRA tree (see `full_param_shardings`).

  Returns:
    A `TrainState` whose leaves are `NamedSharding`s.
  """
  p_shard = full_param_shardings(boxed_params, mesh, rules, params)
  abstract = _param_shapes(boxed_params, params)
  t_shape, _ = split_params(abstract, mask)
  t_shard, f_shard = split_params(p_shard, mask)
  abstract_opt = jax.eval_shape(tx.init, t_shape)
  o_shard = mesh_lib.opt_state_shardings(tx, abstract_opt, t_shard, mesh)
  rep = mesh_lib.replicated(mesh)
  return TrainState(step=rep, trainable=t_shard, frozen=f_shard, opt_state=o_shard, rng=rep)


def create_train_state(params: PyTree, tx: optax.GradientTransformation, shardings: TrainState,
                       rng: jax.Array, mask: PyTree | None = None,
                       master_dtype: jnp.dtype | None = jnp.float32,
                       donate_params: bool = False) -> TrainState:
  """Places `params` with their shardings and builds the optimizer state in place.

  Args:
    params: unboxed params (host or device arrays).
    tx: the optimizer.
    shardings: from `state_shardings`.
    rng: a PRNG key (`jax.random.PRNGKey`), stored as raw uint32 key data.
    mask: trainable mask (None = all trainable).
    master_dtype: dtype of trainable floating params (float32 master weights);
      None keeps the dtype given.
    donate_params: let the state take over `params`' device buffers (saves a copy of
      a large model; the caller's arrays become unusable). By default they are copied,
      since the train step donates the state.

  Returns:
    The sharded `TrainState` at step 0.
  """
  params = nn.unbox(params)
  trainable, frozen = split_params(params, mask)
  if master_dtype is not None:
    trainable = jax.tree.map(
        lambda p: p.astype(master_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
        trainable)
  if donate_params:
    put = lambda t, sh: jax.device_put(t, sh, donate=True)
  else:
    # A jitted copy: device_put may alias the caller's buffers (e.g. a replicated
    # sharding reuses the device-0 buffer), and the train step donates the state.
    put = lambda t, sh: jax.jit(lambda x: jax.tree.map(jnp.copy, x), out_shardings=sh)(t)
  trainable = put(trainable, shardings.trainable)
  frozen = put(frozen, shardings.frozen)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(trainable)
  if jnp.issubdtype(getattr(rng, "dtype", jnp.uint32), jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
      trainable=trainable, frozen=frozen, opt_state=opt_state,
      rng=jax.device_put(jnp.asarray(rng, jnp.uint32), shardings.rng))


def abstract_state(shardings: TrainState, boxed_params: PyTree, tx: optax.GradientTransformation,
                   mask: PyTree | None, master_dtype: jnp.dtype | None = jnp.float32,
                   params: PyTree | None = None) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the state, the target of a checkpoint restore."""
  params = _param_shapes(boxed_params, params)
  trainable, frozen = split_params(params, mask)
  if master_dtype is not None:
    trainable = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, master_dtype)
        if jnp.issubdtype(p.dtype, jnp.floating) else p, trainable)
  opt = jax.eval_shape(tx.init, trainable)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
                      frozen=frozen, opt_state=opt,
                      rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def count_params(tree: PyTree) -> int:
  """Number of scalars in a param tree (None leaves count 0)."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))

