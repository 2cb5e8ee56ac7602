"""k-means in JAX (k-means++ seeding, Lloyd iterations, empty clusters re-seeded).

Used to initialise each RQ-VAE codebook from the residuals it will quantise (LC-Rec
calls scikit-learn's KMeans for this; here it stays in JAX and under ``jit``).

Everything is a pure function of ``(key, x)``: the same key and data give the same
centroids.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def pairwise_sq_dists(x: jax.Array, c: jax.Array) -> jax.Array:
  """Squared L2 distances ``[N, K]`` between rows of ``x [N, D]`` and ``c [K, D]``.

  Uses ``|x|^2 + |c|^2 - 2 x.c`` (one matmul), clipped at 0.
  """
  x2 = jnp.sum(x * x, axis=1, keepdims=True)
  c2 = jnp.sum(c * c, axis=1)[None, :]
  return jnp.maximum(x2 + c2 - 2.0 * (x @ c.T), 0.0)


def kmeans_plusplus(key: jax.Array, x: jax.Array, k: int) -> jax.Array:
  """k-means++ seeding: ``k`` rows of ``x [N, D]`` (``N >= 1``) -> ``[k, D]``.

  Each new centre is drawn with probability proportional to the squared distance to the
  nearest centre chosen so far. When every point already coincides with a centre (fewer
  than ``k`` distinct points) the draw becomes uniform, so duplicates are picked then.
  """
  n = x.shape[0]
  key0, key_rest = jax.random.split(key)
  first = jax.random.randint(key0, (), 0, n)
  centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
  min_d = jnp.sum((x - x[first]) ** 2, axis=1)

  def body(i, carry):
    centers, min_d = carry
    total = jnp.sum(min_d)
    logits = jnp.where(total > 0, jnp.log(jnp.maximum(min_d, 0.0)), 0.0)
    idx = jax.random.categorical(jax.random.fold_in(key_rest, i), logits)
    c = x[idx]
    centers = centers.at[i].set(c)
    min_d = jnp.minimum(min_d, jnp.sum((x - c) ** 2, axis=1))
    return centers, min_d

  centers, _ = jax.lax.fori_loop(1, k, body, (centers, min_d))
  return centers


def _lloyd_step(x: jax.Array, centers: jax.Array) -> jax.Array:
  """One Lloyd update; an empty cluster takes one of the points farthest from its centre.

  Empty clusters are served in index order by the points in decreasing order of their
  distance to their own (current) centre, so distinct empty clusters get distinct points.
  """
  k = centers.shape[0]
  d = pairwise_sq_dists(x, centers)
  assign = jnp.argmin(d, axis=1)
  own_d = jnp.take_along_axis(d, assign[:, None], axis=1)[:, 0]
  sums = jax.ops.segment_sum(x, assign, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones_like(own_d), assign, num_segments=k)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  empty = counts == 0
  far_order = jnp.argsort(-own_d)  # farthest first
  rank = jnp.clip(jnp.cumsum(empty) - 1, 0, x.shape[0] - 1)
  reseed = x[far_order[rank]]
  return jnp.where(empty[:, None], reseed, means)


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def kmeans(key: jax.Array, x: jax.Array, k: int, iters: int) -> jax.Array:
  """k-means centroids of ``x``.

  Args:
    key: PRNG key (seeding and, if ``N < k``, padding); same key, same result.
    x: ``[N, D]`` points, ``N >= 1``.
    k: number of clusters.
    iters: number of Lloyd iterations (fixed; no early stop, so it compiles once).

  Returns:
    ``[k, D]`` float32 centroids. If ``N <= k`` there is nothing to cluster: the result
    holds every point of ``x`` once (in a key-dependent order) followed by ``k - N``
    points of ``x`` drawn with replacement, i.e. duplicate centroids that an argmin
    never selects (ties go to the lower index) until training moves them apart.
  """
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  if x.ndim != 2 or n == 0:
    raise ValueError(f"kmeans: x must be [N>=1, D], got shape {x.shape}")
  if k < 1:
    raise ValueError(f"kmeans: k must be >= 1, got {k}")
  key_perm, key_pad, key_seed = jax.random.split(key, 3)
  if n <= k:
    perm = jax.random.permutation(key_perm, n)
    pad = jax.random.randint(key_pad, (k - n,), 0, n)
    return x[jnp.concatenate([perm, pad])]
  centers = kmeans_plusplus(key_seed, x, k)
  return jax.lax.fori_loop(0, iters, lambda _, c: _lloyd_step(x, c), centers)


def assign_nearest(x: jax.Array, centers: jax.Array) -> jax.Array:
  """Index ``[N]`` int32 of the nearest row of ``centers [K, D]`` for each row of ``x``."""
  return jnp.argmin(pairwise_sq_dists(x, centers), axis=1).astype(jnp.int32)
