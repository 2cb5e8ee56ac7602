"""RQ-KMeans: item codes by residual k-means on the item embeddings (no encoder, no decoder).

``index.source = "rqkmeans"`` replaces the RQ-VAE: level 0 clusters the embeddings
``x [N, D]`` into ``K`` centroids, each item takes a code, and level ``l`` clusters what
the levels before left over (``x`` minus the sum of the chosen centroids). The sizes come
from the RQ-VAE keys: ``rqvae.num_levels`` levels of ``rqvae.codebook_size`` codes,
``rqvae.kmeans_iters`` Lloyd rounds, ``rqvae.sk_epsilons`` / ``rqvae.sk_iters`` per level.

Balanced levels: on a level whose epsilon is ``> 0`` the assignment is the argmax of the
Sinkhorn plan of all items against the centroids (:mod:`sinkhorn`, columns of equal mass
``N / K``) instead of the nearest centroid, in the Lloyd rounds (balanced k-means, after a
plain k-means start) and in the final codes. With epsilon 0 the level is plain k-means
with nearest-centroid codes. Balanced first level: a nearest-code first level on
MovieLens-100K puts most items under a few dozen codes (see ``BENCHMARKS.md``); the
Sinkhorn assignment spreads them over all ``K``.

The codes then go through the same conflict repair as an RQ-VAE index
(:func:`lcrec_jax.index.assign.assign_codes`: LC-Rec's Sinkhorn rounds on the last level,
then the uniqueness step), with the last level's squared distances under each item's own
prefix. Deterministic: a pure function of ``(seed, x)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcrec_jax.index import kmeans as kmeans_lib
from lcrec_jax.index import sinkhorn as sinkhorn_lib


@dataclasses.dataclass(frozen=True)
class RQKMeansResult:
  """What :func:`rq_kmeans` returns.

  Attributes:
    codes: ``[N, L]`` int32 code per level (before any conflict repair).
    codebooks: ``[L, K, D]`` float32 centroids per level.
    last_distances: ``[N, K]`` float32 squared distances from each item's last-level
      residual to every last-level centroid.
    recon_sq_err: ``[N]`` float32 mean over dimensions of ``(x - sum of centroids)^2``.
  """

  codes: np.ndarray
  codebooks: np.ndarray
  last_distances: np.ndarray
  recon_sq_err: np.ndarray


def _assign(d: jax.Array, epsilon: float, sk_iters: int) -> jax.Array:
  """``[N]`` codes from distances ``d [N, K]``: Sinkhorn argmax if ``epsilon > 0``."""
  if epsilon > 0:
    return jnp.argmax(sinkhorn_lib.log_sinkhorn(d, epsilon, sk_iters), axis=1)
  return jnp.argmin(d, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "iters", "epsilon", "sk_iters"))
def balanced_kmeans(key: jax.Array, x: jax.Array, k: int, iters: int, epsilon: float,
                    sk_iters: int) -> tuple[jax.Array, jax.Array]:
  """Centroids and codes of ``x [N, D]``, balanced by Sinkhorn when ``epsilon > 0``.

  Plain k-means (k-means++ and ``iters`` Lloyd rounds, :func:`kmeans_lib.kmeans`) gives
  the start; with ``epsilon > 0``, ``iters`` more rounds assign by the Sinkhorn plan's
  argmax and move each centroid to the mean of its items (a centroid left without items
  stays where it is).

  Returns:
    ``(centers [k, D] float32, codes [N] int32)``.
  """
  x = jnp.asarray(x, jnp.float32)
  centers = kmeans_lib.kmeans(key, x, k, iters)
  if epsilon > 0:
    def round_(_, c):
      idx = _assign(kmeans_lib.pairwise_sq_dists(x, c), epsilon, sk_iters)
      sums = jax.ops.segment_sum(x, idx, num_segments=k)
      counts = jax.ops.segment_sum(jnp.ones(x.shape[0], x.dtype), idx, num_segments=k)
      return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)
    centers = jax.lax.fori_loop(0, iters, round_, centers)
  codes = _assign(kmeans_lib.pairwise_sq_dists(x, centers), epsilon, sk_iters)
  return centers, codes.astype(jnp.int32)


def rq_kmeans(x: np.ndarray, *, num_levels: int, codebook_size: int,
              sk_epsilons: Sequence[float], iters: int, sk_iters: int,
              seed: int) -> RQKMeansResult:
  """Residual k-means codes of ``x [N, D]``; see the module docstring.

  Args:
    x: ``[N, D]`` item embeddings (finite).
    num_levels: ``L``.
    codebook_size: ``K`` centroids per level.
    sk_epsilons: ``L`` Sinkhorn epsilons; ``> 0`` balances that level, 0 = nearest.
    iters: Lloyd rounds (plain, then as many balanced ones on balanced levels).
    sk_iters: Sinkhorn rounds per assignment.
    seed: level ``l`` uses ``fold_in(PRNGKey(seed), l)``.

  Returns:
    :class:`RQKMeansResult`.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"embeddings must be [num_items, dim], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("embeddings contain NaN or inf")
  if len(sk_epsilons) != num_levels:
    raise ValueError(f"sk_epsilons has {len(sk_epsilons)} entries for {num_levels} levels")
  key = jax.random.PRNGKey(int(seed))
  residual = jnp.asarray(x)
  codes, books, last_d = [], [], None
  for l, eps in enumerate(sk_epsilons):
    centers, idx = balanced_kmeans(jax.random.fold_in(key, l), residual, int(codebook_size),
                                   int(iters), float(eps), int(sk_iters))
    last_d = kmeans_lib.pairwise_sq_dists(residual, centers)
    residual = residual - centers[idx]
    codes.append(np.asarray(idx))
    books.append(np.asarray(centers))
  err = np.mean(np.square(np.asarray(residual)), axis=1)
  return RQKMeansResult(np.stack(codes, axis=1).astype(np.int32),
                        np.stack(books).astype(np.float32),
                        np.asarray(last_d, np.float32), err.astype(np.float32))
