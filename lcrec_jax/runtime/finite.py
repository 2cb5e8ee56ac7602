"""Finite or nothing: checks that a param / optimizer tree holds no NaN or inf.

* :func:`all_finite` is jittable (one bool scalar); the train steps use it to commit an
  update only when the loss, the gradients and the updated state are all finite.
* :func:`check_finite` is the host-side refusal used before a model is exported,
  evaluated or used by ``recommend``: it raises :class:`NonFiniteError` naming the first
  bad leaf, e.g. ``model params: layers_0/attn/q_proj/kernel holds 4096 NaN/inf values
  (of 4096)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcrec_jax.errors import UserError

PyTree = Any


class NonFiniteError(UserError, FloatingPointError):
  """A model or train state holds NaN/inf values (a diverged run)."""


def _float_leaves(tree: PyTree) -> list:
  return [x for x in jax.tree.leaves(tree)
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]


def all_finite(*trees: PyTree) -> jax.Array:
  """bool scalar: every floating leaf of every tree is finite (jittable; True if none)."""
  ok = jnp.asarray(True)
  for x in _float_leaves(trees):
    ok = jnp.logical_and(ok, jnp.all(jnp.isfinite(x)))
  return ok


def select_tree(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Leafwise ``where(pred, on_true, on_false)`` over two trees of one structure."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def first_non_finite(tree: PyTree) -> tuple[str, int, int] | None:
  """``(path, bad count, size)`` of the first leaf with NaN/inf values, or None."""
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.inexact):
      continue
    # counted where the leaf lives: a sharded (even multi-host) array is never gathered
    bad = int(np.sum(~np.isfinite(x))) if isinstance(x, np.ndarray) else int(
        jnp.sum(~jnp.isfinite(x)))
    if bad:
      name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                      for k in path)
      return name, bad, int(np.prod(x.shape))
  return None


def check_finite(tree: PyTree, what: str, hint: str | None = None) -> None:
  """Raises :class:`NonFiniteError` when a floating leaf of ``tree`` has NaN/inf values.

  Args:
    tree: params (numpy or jax arrays, possibly sharded).
    what: how the message names the tree, e.g. ``"runs/x/model: params"``.
    hint: the error's second line (default: retrain with a lower learning rate).
  """
  bad = first_non_finite(tree)
  if bad is None:
    return
  path, n, size = bad
  raise NonFiniteError(
      f"{what}: {path or '<root>'} holds {n} NaN/inf values (of {size}); the model diverged "
      "and is not used",
      hint=hint or "retrain from the last finite checkpoint with a lower learning rate "
                   "(train.lr / rqvae.lr)")
