"""Device mesh, logical axis rules and NamedShardings for params and optimizer state.

The mesh has three axes, `('data', 'fsdp', 'tensor')`:

- `data`: pure data parallelism (weights replicated),
- `fsdp`: data parallelism with weights (and optimizer state) sharded over it,
- `tensor`: tensor (model) parallelism over heads / MLP / vocabulary.

Models annotate weights and activations with *logical* axis names
(`nn.with_logical_partitioning`, `nn.with_logical_constraint`); the rules below map
those names to mesh axes, so models never mention the mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# The axes a batch dimension is split over (data parallel and FSDP both split the batch).
from lcrec_jax.train.axis_rules import BATCH_AXES, DEFAULT_AXIS_RULES, LogicalRules  # noqa: E402,F401


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 entry in `shape` by the number of devices left over.

  Args:
    shape: axis sizes, at most one of them -1.
    num_devices: devices the mesh must cover exactly.

  Returns:
    The concrete axis sizes, whose product is `num_devices`.
  """
  shape = [int(s) for s in shape]
  if sum(s == -1 for s in shape) > 1:
    raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {shape}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
          f"mesh: {num_devices} devices are not divisible by the fixed axis sizes "
          f"{shape} (product {known})")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh: axis sizes {shape} (data, fsdp, tensor) use {math.prod(shape)} devices, "
        f"but {num_devices} are available; set one of them to -1")
  return tuple(shape)


def make_mesh(mesh_cfg: ml_collections.ConfigDict | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the `('data', 'fsdp', 'tensor')` mesh from the `c.mesh` config section.

  Args:
    mesh_cfg: config with integer fields `data`, `fsdp`, `tensor` (-1 = the rest);
      None: every device on `data` (`(-1, 1, 1)`).
    devices: devices to use (default: all of `jax.devices()`).

  Returns:
    A `Mesh` with auto (not explicit) axis types.
  """
  devices = list(devices) if devices is not None else jax.devices()
  sizes = (-1, 1, 1) if mesh_cfg is None else (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
  shape = resolve_mesh_shape(sizes, len(devices))
  try:
    # Topology-aware order on TPU/GPU (keeps `tensor` within fast links).
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(device_array, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def axis_rules(mesh_cfg: ml_collections.ConfigDict | None = None) -> LogicalRules:
  """The logical axis rules from config (`c.mesh.axis_rules`), as a tuple of pairs."""
  if mesh_cfg is None:
    return DEFAULT_AXIS_RULES
  rules = []
  for rule in mesh_cfg.axis_rules:
    if len(rule) != 2:
      raise ValueError(f"mesh.axis_rules: each rule must be (logical, mesh axes), got {rule}")
    name, target = rule
    if isinstance(target, list):
      target = tuple(target)
    targets = target if isinstance(target, tuple) else (target,)
    for t in targets:
      if t is not None and t not in MESH_AXES:
        raise ValueError(f"mesh.axis_rules: rule {rule} names unknown mesh axis {t!r}; "
                         f"axes are {MESH_AXES}")
    rules.append((name, target))
  return tuple(rules)


def batch_spec(ndim: int = 2) -> PartitionSpec:
  """PartitionSpec of a `[batch, ...]` array: batch over (data, fsdp), rest replicated."""
  return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """NamedSharding of a `[batch, ...]` input array on `mesh`."""
  return NamedSharding(mesh, batch_spec(ndim))


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding (scalars, RNG keys, step counters)."""
  return NamedSharding(mesh, PartitionSpec())


def logical_specs(boxed_tree: Any) -> Any:
  """Logical PartitionSpecs of a tree holding `nn.LogicallyPartitioned` boxes.

  Unboxed leaves (e.g. arrays created without `with_logical_partitioning`) get
  `PartitionSpec()`, i.e. replicated.
  """
  return nn.get_partition_spec(boxed_tree)


def _fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (e.g. vocab 50 over tensor=4)."""
  out = []
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    if axes is None:
      out.append(None)
      continue
    axes_t = axes if isinstance(axes, tuple) else (axes,)
    kept = []
    size = 1
    for a in axes_t:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return PartitionSpec(*out)


def mesh_shardings(logical_spec_tree: Any, shapes_tree: Any, mesh: Mesh,
                   rules: LogicalRules) -> Any:
  """Maps logical PartitionSpecs to NamedShardings on `mesh` via `rules`.

  Args:
    logical_spec_tree: tree of logical `PartitionSpec`s (from `logical_specs`).
    shapes_tree: matching tree of arrays / ShapeDtypeStructs (for divisibility).
    mesh: the device mesh.
    rules: logical axis rules.

  Returns:
    Tree of `NamedSharding`. A mesh axis that does not divide a dimension is dropped
    for that dimension (that dimension is replicated instead of failing).
  """
  mesh_specs = nn.logical_to_mesh(logical_spec_tree, rules)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, _fit_spec_to_shape(s, np.shape(x), mesh)),
      mesh_specs, shapes_tree, is_leaf=is_spec)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """NamedShardings for an (abstract) boxed param tree, matching its unboxed structure.

  Args:
    boxed_params: params as returned by `model.init` / `jax.eval_shape(model.init)`,
      still holding `nn.LogicallyPartitioned` boxes.
    mesh: the device mesh.
    rules: logical axis rules.
  """
  specs = logical_specs(boxed_params)
  return mesh_shardings(specs, nn.unbox(boxed_params), mesh, rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optax state: param-shaped parts mirror the params, the rest replicated.

  Args:
    tx: the optimizer that produced `abstract_opt_state`.
    abstract_opt_state: `jax.eval_shape(tx.init, params)`.
    params_shardings: tree of NamedSharding matching the (unboxed) params.
    mesh: the device mesh.
  """
  rep = replicated(mesh)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt_state, params_shardings,
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def shard_batch_from_host(batch: dict[str, np.ndarray], mesh: Mesh,
                          sharding: NamedSharding | None = None,
                          batch_dim: int = 0, host_local: bool = False
                          ) -> dict[str, jax.Array]:
  """Turns host numpy batches into global arrays sharded over (data, fsdp).

  Two ways to feed several hosts, both through `jax.make_array_from_process_local_data`:
  every host holds the same *global* batch and contributes the rows its devices hold
  (`host_local=False`), or every host holds only its own rows, process p holding rows
  `[p * B / P, (p + 1) * B / P)` as `tasks.batching.Batcher.batches(...,
  process_index, process_count)` yields them (`host_local=True`). On one host both are
  a plain device put.

  Args:
    batch: dict of numpy arrays, batch dimension at `batch_dim`.
    mesh: the device mesh.
    sharding: the arrays' sharding (default: `batch_sharding(mesh, ndim)`).
    batch_dim: which dimension is the (sharded) batch.
    host_local: the arrays are this process's rows only.

  Returns:
    Dict of global `jax.Array`s.
  """
  out = {}
  pc, pi = jax.process_count(), jax.process_index()
  for name, x in batch.items():
    x = np.asarray(x)
    sh = sharding if sharding is not None else batch_sharding(mesh, x.ndim)
    if pc == 1:
      out[name] = jax.device_put(x, sh)
      continue
    if host_local:
      n = x.shape[batch_dim]
      global_shape = x.shape[:batch_dim] + (n * pc,) + x.shape[batch_dim + 1:]
      rows = host_rows(sh, global_shape, batch_dim)
      if rows != slice(pi * n, (pi + 1) * n):
        raise ValueError(f"mesh: process {pi} feeds rows {pi * n}..{(pi + 1) * n} but its "
                         f"devices hold rows {rows.start}..{rows.stop} of batch key {name!r}")
      out[name] = jax.make_array_from_process_local_data(sh, x, global_shape)
    else:
      rows = host_rows(sh, x.shape, batch_dim)
      local = x[(slice(None),) * batch_dim + (rows,)]
      out[name] = jax.make_array_from_process_local_data(sh, local, x.shape)
  return out


def host_rows(sharding: NamedSharding, global_shape: Sequence[int], batch_dim: int = 0) -> slice:
  """The contiguous block along `batch_dim` of a global array that this process feeds.

  Raises if the process's devices do not hold one contiguous block (the mesh device
  order then does not group devices by host).
  """
  index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
  n = global_shape[batch_dim]
  starts, stops = [], []
  for idx in index_map.values():
    s = idx[batch_dim]
    starts.append(s.start or 0)
    stops.append(n if s.stop is None else s.stop)
  lo, hi = min(starts), max(stops)
  covered = np.zeros(hi - lo, bool)
  for a, b in zip(starts, stops):
    covered[a - lo:b - lo] = True
  if not covered.all():
    raise ValueError("mesh: this host's devices do not hold a contiguous block of the batch; "
                     "order mesh devices by process")
  return slice(lo, hi)


def maybe_initialize_distributed(flag: bool | None = None) -> None:
  """Calls `jax.distributed.initialize()` for multi-host runs.

  Enabled by `flag` (config `train.distributed`) or, when `flag` is None, by the
  environment variable `LCREC_DISTRIBUTED=1`. On Cloud TPU pods the coordinator is
  detected automatically; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
  and JAX_PROCESS_ID. Must run before any other JAX call.
  """
  import os  # pylint: disable=g-import-not-at-top
  if flag is None:
    flag = os.environ.get("LCREC_DISTRIBUTED", "0") == "1"
  if not flag:
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize()
