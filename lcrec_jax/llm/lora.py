"""LoRA adapters for `Llama` as a params transform, plus optax masks for what trains.

Adapters mirror the params tree: for a targeted projection with kernel
`[*lead, *in, *out]` (lead = `[L]` when layers are scanned) the adapter is
`{"lora_a": [*lead, *in, r], "lora_b": [*lead, r, *out]}`, and the effective kernel is
`W + (alpha / r) * A @ B`. B starts at zero, so a fresh adapter leaves the model as is.

Two equivalent ways to run a model with adapters:
  * `Llama(cfg).apply({"params": params}, tokens, lora=lora)` adds `scale * (x A) B` on
    the fly (cheap: no weight-sized products or gradients);
  * `Llama(cfg).apply({"params": merge(params, lora)}, tokens)`.

What LoRA training trains is a `LoraTree(params=base, lora=adapters)`: a pytree node
(jit, optax, shardings and orbax go through it) that code tells from a plain param
tree with `isinstance`. Its leaves' paths are `params/...` and `lora/adapters/...`,
the same names the earlier `{"params": base, "lora": adapters}` dict had, so
checkpoints written with either load into the other.

LC-Rec's LoRA variant also trains the token embeddings and the output head (the new
index-token rows need training); `trainable_mask` marks those, and `freeze_rows`
keeps chosen rows (e.g. the original vocabulary) fixed.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from lcrec_jax.llm.config import LlamaConfig
from lcrec_jax.llm.names import LORA_TARGETS
from lcrec_jax.llm.tree_paths import get_path, set_path

TARGETS = LORA_TARGETS
_IN_DIMS = {"o_proj": 2}  # contracted input dims of each kernel (others: 1)


@struct.dataclass
class LoraParams:
  """Adapter weights (a pytree) and the static scale alpha / rank.

  Attributes:
    adapters: nested dict mirroring params, `{"lora_a", "lora_b"}` per target.
    scale: alpha / rank (static: not a leaf, gets no gradient).
  """
  adapters: dict[str, Any]
  scale: float = struct.field(pytree_node=False, default=1.0)


@struct.dataclass
class LoraTree:
  """Base params plus adapters run on the fly: the param tree of a LoRA fine-tune.

  Attributes:
    params: the base `Llama` param tree (frozen, except the rows `trainable_mask` marks).
    lora: the `LoraParams` adapters.
  """
  params: Any
  lora: LoraParams


def _walk(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  """Yields (path, subtree) for every dict in `tree`."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield prefix + (k,), v
      yield from _walk(v, prefix + (k,))


def _unbox(x):
  return getattr(x, "value", x)


def check_targets(targets: Iterable[str], name: str = "lora targets") -> tuple[str, ...]:
  """`targets` as a tuple; ValueError (naming `name`) unless a non-empty subset of TARGETS."""
  targets = tuple(targets)
  bad = [t for t in targets if t not in TARGETS]
  if bad or not targets:
    raise ValueError(f"{name}={targets}: {bad or 'empty'}; choose from {TARGETS}")
  return targets


def init_lora(key: jax.Array, params: Mapping[str, Any], cfg: LlamaConfig, rank: int = 8,
              alpha: float = 16.0, targets: Iterable[str] = ("q_proj", "v_proj"),
              dtype: Any = None) -> LoraParams:
  """Creates adapters for every targeted projection in `params`.

  A is drawn like PEFT's (uniform in +-1/sqrt(fan_in), on the host with numpy seeded
  from `key`, which avoids one XLA compile per adapter shape); B is zero.

  Args:
    key: PRNG key.
    params: `Llama(cfg)` params.
    cfg: the config (its `scan_layers` tells whether kernels carry a layer axis).
    rank: r.
    alpha: LoRA alpha; scale = alpha / r.
    targets: projection names, subset of `TARGETS`.
    dtype: adapter dtype (default `cfg.param_dtype`).

  Returns:
    `LoraParams`.

  Raises:
    ValueError: an unknown target name, a non-positive rank, or a target not in params.
  """
  targets = check_targets(targets)
  if rank <= 0:
    raise ValueError(f"lora rank must be positive, got {rank}")
  dtype = jnp.dtype(dtype or cfg.weight_dtype)
  lead = 1 if cfg.scan_layers else 0
  adapters: dict[str, Any] = {}
  found = set()
  sites = [(p, sub) for p, sub in _walk(params) if p[-1] in targets and "kernel" in sub]
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint64).tolist())
  for path, sub in sites:
    w = _unbox(sub["kernel"])
    n_in = _IN_DIMS.get(path[-1], 1)
    lead_shape = w.shape[:lead]
    in_shape = w.shape[lead:lead + n_in]
    out_shape = w.shape[lead + n_in:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = rng.uniform(-bound, bound, lead_shape + in_shape + (rank,)).astype(np.float32)
    b = np.zeros(lead_shape + (rank,) + out_shape, np.float32)
    set_path(adapters, path, {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype)})
    found.add(path[-1])
  missing = [t for t in targets if t not in found]
  if missing:
    raise ValueError(f"lora targets {missing} not found in params")
  return LoraParams(adapters=adapters, scale=float(alpha) / rank)


def lora_delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...],
               scale: float) -> jax.Array:
  """`scale * A @ B` reshaped to the kernel's shape, float32.

  Args:
    a: `[*lead, *in, r]`.
    b: `[*lead, r, *out]`.
    kernel_shape: `[*lead, *in, *out]`.
    scale: alpha / r.
  """
  r = a.shape[-1]
  n_lead = b.ndim - 1 - (len(kernel_shape) - (a.ndim - 1))
  lead = kernel_shape[:n_lead]
  nl = math.prod(lead)
  a2 = a.astype(jnp.float32).reshape(nl, -1, r)
  b2 = b.astype(jnp.float32).reshape(nl, r, -1)
  return (scale * jnp.einsum("lir,lro->lio", a2, b2)).reshape(kernel_shape)


def _apply(params: Mapping[str, Any], lora: LoraParams, sign: float) -> dict[str, Any]:
  out = jax.tree.map(lambda x: x, dict(params))  # new containers, same leaves
  for path, sub in _walk(lora.adapters):
    if "lora_a" not in sub:
      continue
    kpath = path + ("kernel",)
    try:
      w = _unbox(get_path(out, kpath))
    except KeyError as e:
      raise KeyError(f"lora adapter {'/'.join(path)} has no kernel in params") from e
    d = lora_delta(sub["lora_a"], sub["lora_b"], w.shape, lora.scale)
    new = (w.astype(jnp.float32) + sign * d).astype(w.dtype)
    set_path(out, kpath, new)
  return out


def merge(params: Mapping[str, Any], lora: LoraParams) -> dict[str, Any]:
  """Effective params `W + scale * A @ B` on every adapted kernel (differentiable)."""
  return _apply(params, lora, 1.0)


def unmerge(merged: Mapping[str, Any], lora: LoraParams) -> dict[str, Any]:
  """Inverse of `merge` (exact up to float rounding)."""
  return _apply(merged, lora, -1.0)


def _path_names(path) -> list[str]:
  names = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        names.append(str(getattr(p, attr)))
        break
  return names


def trainable_mask(tree: Any, train_embeddings_rows: bool = True,
                   train_head: bool | None = None, train_norms: bool = False) -> Any:
  """Bool pytree (same structure as `tree`) for `optax.masked` / `optax.multi_transform`.

  True for LoRA adapter leaves; for `embed_tokens` if `train_embeddings_rows`; for
  `lm_head` if `train_head` (default: same as `train_embeddings_rows`; with tied
  embeddings the head is the embedding); for RMSNorm scales if `train_norms`; False
  for every other (frozen base) leaf.

  Args:
    tree: params, a `LoraParams`, a `LoraTree`, or any container of them.
  """
  if train_head is None:
    train_head = train_embeddings_rows

  def leaf_mask(path, _):
    names = _path_names(path)
    if "lora_a" in names or "lora_b" in names:
      return True
    if "embed_tokens" in names:
      return train_embeddings_rows
    if "lm_head" in names:
      return train_head
    if names and names[-1] == "scale" and any(n.endswith("norm") for n in names):
      return train_norms
    return False

  return jax.tree_util.tree_map_with_path(leaf_mask, tree)


def freeze_rows(num_frozen: int) -> optax.GradientTransformation:
  """Zeroes updates of the first `num_frozen` vocabulary rows of embedding and head.

  Put it last in an optax chain so the original vocabulary stays exactly fixed while
  new (item-code) rows train: it acts on leaves under `embed_tokens` (rows, axis 0 of
  `[V, E]`) and `lm_head` (axis 1 of `[E, V]`).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params

    def f(path, u):
      names = _path_names(path)
      if "embed_tokens" in names:
        rows = jnp.arange(u.shape[0])[:, None] >= num_frozen
        return jnp.where(rows, u, 0)
      if "lm_head" in names:
        cols = jnp.arange(u.shape[-1])[None, :] >= num_frozen
        return jnp.where(cols, u, 0)
      return u

    return jax.tree_util.tree_map_with_path(f, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def num_trainable(tree: Any, mask: Any) -> int:
  """Number of scalars where `mask` is True."""
  sizes = jax.tree.map(lambda x, m: int(np.prod(x.shape)) if m else 0, tree, mask)
  return int(sum(jax.tree.leaves(sizes)))
