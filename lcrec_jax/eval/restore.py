"""Trained parameters for evaluation, read from the training checkpoint onto a mesh.

The train stage's checkpoints (``<workdir>/train/checkpoints/<step>/state``, written by
:mod:`lcrec_jax.train.trainer`) hold the *trainable* params in float32 master copies, the
optimizer state, the step and the RNG; frozen params (a LoRA base) are not in them and
are rebuilt exactly as training built them. Evaluation reads only the ``trainable``
subtree (orbax partial restore: the optimizer state, 2x the params, is never read),
each array straight into the ``NamedSharding`` the same logical-axis rules give it in
training (``fsdp`` / ``tensor``), so no host or device ever holds the whole model unless
the mesh says so. LoRA adapters are merged on the devices, and the result is cast to the
configured compute dtype (``train.compute_dtype``) in one sharded ``jit``.

    params = restore_trained_params(checkpoint_dir, model, init_tree, mask, mesh, rules,
                                    compute_dtype="bfloat16")
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from lcrec_jax.errors import WorkdirError
from lcrec_jax.llm import lora as lora_lib
from lcrec_jax.llm.config import DTYPES
from lcrec_jax.train import mesh as mesh_lib
from lcrec_jax.train import state as state_lib
from lcrec_jax.train.step import cast_floating

PyTree = Any


def latest_checkpoint_step(checkpoint_dir: str) -> int | None:
  """The newest finished step under ``checkpoint_dir`` (orbax layout), or None."""
  d = epath.Path(checkpoint_dir)
  if not d.exists():
    return None
  steps = [int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "state").exists()]
  return max(steps) if steps else None


def restore_trained_params(checkpoint_dir: str, model: nn.Module, init_tree: PyTree,
                           mask: PyTree | None, mesh: Mesh, rules: mesh_lib.LogicalRules,
                           compute_dtype: str = "float32", step: int | None = None
                           ) -> tuple[PyTree, int]:
  """The trained, merged params of ``model`` on ``mesh``, in ``compute_dtype``.

  Args:
    checkpoint_dir: ``<workdir>/train/checkpoints`` (local or ``gs://``).
    model: the ``Llama`` that was trained.
    init_tree: the tree training started from, as the train stage built it: the base
      params, or a ``LoraTree(params=base, lora=adapters)``. Only its frozen leaves'
      values are used (the trainable ones come from the checkpoint); host arrays.
    mask: the trainable mask training used (None = everything trained).
    mesh: the ``('data', 'fsdp', 'tensor')`` mesh to place the params on.
    rules: logical axis rules (``config.mesh.axis_rules``).
    compute_dtype: a name in ``llm.config.DTYPES`` (configs offer ``float32``,
      ``bfloat16``, ``float16``); floating params are cast to it.
    step: checkpoint step (default: the newest).

  Returns:
    ``(params, step)``: the plain ``Llama`` param tree (adapters merged), every leaf a
    ``jax.Array`` with the training ``NamedSharding`` of that weight.

  Raises:
    WorkdirError: no finished checkpoint under ``checkpoint_dir``.
  """
  if compute_dtype not in DTYPES:
    raise ValueError(f"train.compute_dtype: {compute_dtype!r} is not one of {list(DTYPES)}")
  step = latest_checkpoint_step(checkpoint_dir) if step is None else step
  if step is None:
    raise WorkdirError(f"{checkpoint_dir}: no finished training checkpoint (run the train "
                       "stage, --stages=train)")
  boxed = state_lib.abstract_boxed_params(model, np.zeros((1, 8), np.int32))
  shardings = state_lib.full_param_shardings(boxed, mesh, rules, init_tree)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), init_tree)
  t_shape, _ = state_lib.split_params(shapes, mask)
  t_shard, f_shard = state_lib.split_params(shardings, mask)
  target = jax.tree.map(  # float32 master copies, as the trainer saves them
      lambda s, sh: jax.ShapeDtypeStruct(
          s.shape, jnp.float32 if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype,
          sharding=sh), t_shape, t_shard)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(
        epath.Path(checkpoint_dir) / str(step) / "state",
        args=ocp.args.PyTreeRestore(
            item={"trainable": target},
            restore_args={"trainable": ocp.checkpoint_utils.construct_restore_args(target)},
            partial_restore=True))
  trainable = restored["trainable"]
  _, frozen = state_lib.split_params(init_tree, mask)
  frozen = jax.jit(lambda x: x, out_shardings=f_shard)(frozen)
  base_shard = shardings.params if isinstance(init_tree, lora_lib.LoraTree) else shardings
  dtype = DTYPES[compute_dtype]

  def finish(t, f):
    p = state_lib.merge_params(t, f)
    if isinstance(p, lora_lib.LoraTree):
      p = lora_lib.merge(p.params, p.lora)
    return cast_floating(p, dtype)

  params = jax.jit(finish, out_shardings=base_shard)(trainable, frozen)
  return params, int(step)
