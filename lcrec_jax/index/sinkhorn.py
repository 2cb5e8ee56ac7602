"""Sinkhorn-Knopp balanced assignment of a batch to codebook entries, in the log domain.

LC-Rec spreads the items of a batch evenly over a level's codes by solving an
entropy-regularised optimal-transport problem between the batch (uniform mass, one unit
per row) and the codes (uniform mass, ``B / K`` per column), then taking each row's argmax.
It first maps the batch's squared distances affinely onto ``[-1, 1]`` (global min and max
of the ``[B, K]`` matrix) and then iterates on ``Q = exp(-d / epsilon)`` in float64. At
``epsilon = 0.003`` that exponent reaches ``±333``: ``exp`` overflows float32 (max about
``e^88``). Here the same iteration runs on ``log Q`` with ``logsumexp`` normalisations, so
float32 is enough and nothing overflows, whatever the distances.

Cost: the log domain needs a ``B x K`` ``exp`` per half-round; after the first round the
matrix is balanced and the iteration continues as stabilised matrix scaling (one
matrix-vector product per half-round, absorbed back into the log plan every ``block``
rounds), which is several times faster and falls back to log rounds if a scaling ever
leaves the float32 range.

One iteration normalises rows to sum 1, then columns to sum ``B / K`` (LC-Rec's order),
so after a fixed number of iterations the columns hold exactly ``B / K`` and the rows sum
to 1 up to the convergence of the iteration. Scaling a row never changes its argmax, so
codes taken as ``argmax(plan, axis=1)`` agree with LC-Rec's float64 iteration except
where a row's two best entries are within float32 rounding of each other.

:func:`log_sinkhorn_float64` is the same iteration on the host in float64 (numpy), as
LC-Rec runs it; the index repair (``assign.py``) uses it for its tie tolerance.

Note: identical rows of ``distances`` give identical rows of the plan (uniform over the
codes when all rows are equal); an argmax then puts them on the same code. Only
near-duplicates are spread; exact duplicates need a separate tie-break.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def center_distances(distances: jax.Array) -> jax.Array:
  """Maps ``[B, K]`` distances affinely onto ``[-1, 1]`` by their global min and max.

  This is LC-Rec's normalisation before Sinkhorn, which gives ``epsilon`` a meaning
  independent of the scale of the embeddings. A constant matrix maps to zeros.

  Args:
    distances: ``[B, K]`` squared distances.

  Returns:
    ``[B, K]`` float32 values in ``[-1, 1]``.
  """
  return _center(distances.astype(jnp.float32))


def _center(d):
  """:func:`center_distances` in the dtype and array library of ``d`` (numpy or JAX)."""
  middle = (d.max() + d.min()) / 2
  amplitude = d.max() - middle + 1e-5
  return (d - middle) / amplitude


def _log_round(log_q: jax.Array, log_col_mass: jax.Array) -> jax.Array:
  """One log-domain round: rows to sum 1, then columns to sum ``B / K``."""
  log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True)
  return log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) + log_col_mass


def _scaled_rounds(log_q: jax.Array, log_col_mass: jax.Array, rounds: int) -> jax.Array:
  """``rounds`` log rounds computed as plain-domain matrix scaling, then absorbed.

  ``log_q`` must be balanced already (its columns sum to ``B / K``): then ``exp(log_q)``
  has no all-zero row or column in float32 (every column holds at least ``1 / K``, every
  row at least ``1 / K^2``), and each half-round rescales by a bounded factor. The rounds
  ``u = 1 / (P v)``, ``v = (B / K) / (P^T u)`` equal the log rounds in exact arithmetic
  and cost one matrix-vector product each instead of a ``B x K`` ``exp``. If the scalings
  ever leave the float32 range the block is redone in the log domain.
  """
  p = jnp.exp(log_q)
  col_mass = jnp.exp(log_col_mass)

  def one(_, uv):
    _, v = uv
    u = 1.0 / (p @ v)
    return u, col_mass / (u @ p)

  u, v = jax.lax.fori_loop(
      0, rounds, one, (jnp.ones(p.shape[0], p.dtype), jnp.ones(p.shape[1], p.dtype)))
  ok = (jnp.all(jnp.isfinite(u) & (u > 0)) & jnp.all(jnp.isfinite(v) & (v > 0)))
  return jax.lax.cond(
      ok,
      lambda: log_q + jnp.log(u)[:, None] + jnp.log(v)[None, :],
      lambda: jax.lax.fori_loop(0, rounds, lambda _, lq: _log_round(lq, log_col_mass), log_q))


@functools.partial(jax.jit, static_argnames=("iters", "center", "block"))
def log_sinkhorn(
    distances: jax.Array,
    epsilon: float | jax.Array,
    iters: int,
    *,
    center: bool = True,
    block: int = 10,
) -> jax.Array:
  """Log of the Sinkhorn transport plan; see :func:`sinkhorn`.

  The first round runs in the log domain (that is where the ``±1/epsilon`` exponents
  are); later rounds run in blocks of ``block`` plain-domain scaling rounds on the
  balanced matrix, absorbed into the log plan after each block (stabilised scaling, the
  same iterates up to float rounding; ``block=0`` keeps every round in the log domain).

  Args:
    distances: ``[B, K]`` squared L2 distances (any finite float values).
    epsilon: entropic regularisation, ``> 0``; smaller is closer to hard assignment.
    iters: number of (row, column) normalisation rounds; fixed, so it compiles once.
    center: map ``distances`` onto ``[-1, 1]`` first (:func:`center_distances`), as
      LC-Rec does. With ``False`` the raw distances are used.
    block: plain-domain rounds between two absorptions.

  Returns:
    ``[B, K]`` float32 ``log(plan)``, finite for finite input (entries whose plan
    value would underflow to 0 in the plain domain stay finite here).
  """
  if iters < 0 or block < 0:
    raise ValueError(f"sinkhorn: iters and block must be >= 0, got {iters}, {block}")
  d = center_distances(distances) if center else distances.astype(jnp.float32)
  num_rows, num_cols = d.shape
  log_col_mass = jnp.log(jnp.float32(num_rows) / jnp.float32(num_cols))
  log_q = -d / jnp.asarray(epsilon, jnp.float32)
  # Rows first so that iters=0 still returns a row-stochastic matrix.
  log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True)
  if iters == 0:
    return log_q
  log_q = _log_round(log_q, log_col_mass)
  rest = iters - 1
  if block == 0:
    return jax.lax.fori_loop(0, rest, lambda _, lq: _log_round(lq, log_col_mass), log_q)
  if rest >= block:
    log_q = jax.lax.fori_loop(
        0, rest // block, lambda _, lq: _scaled_rounds(lq, log_col_mass, block), log_q)
  if rest % block:
    log_q = _scaled_rounds(log_q, log_col_mass, rest % block)
  return log_q


def sinkhorn(
    distances: jax.Array, epsilon: float | jax.Array, iters: int, *, center: bool = True
) -> jax.Array:
  """Balanced soft assignment of ``B`` rows to ``K`` codes (LC-Rec's Sinkhorn), float32.

  Args:
    distances: ``[B, K]`` squared L2 distances between a batch and a codebook.
    epsilon: entropic regularisation ``> 0`` (LC-Rec: 0.003 on the last level).
    iters: fixed number of Sinkhorn rounds (LC-Rec: 50 or 100).
    center: map distances onto ``[-1, 1]`` first, as LC-Rec does (default).

  Returns:
    ``[B, K]`` float32 transport plan: each column sums to ``B / K`` (exact up to
    float rounding), each row to 1 once the iteration has converged. Never NaN or inf
    for finite input, also at ``epsilon = 0.003`` with large distances.
  """
  if not isinstance(epsilon, jax.Array) and float(epsilon) <= 0:
    raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
  return jnp.exp(log_sinkhorn(distances, epsilon, iters, center=center))


def log_sinkhorn_float64(distances: np.ndarray, epsilon: float, iters: int) -> np.ndarray:
  """``[g, K]`` float64 log plan of LC-Rec's Sinkhorn, on the host (numpy).

  The same iteration as :func:`log_sinkhorn` (centred distances, rows to 1, then
  ``iters`` rounds of rows to 1 and columns to ``g / K``), every round in the log domain
  and in float64 as LC-Rec computes it: the index repair (``index/assign.py``) breaks ties
  between a row's best codes at a 1e-9 tolerance, which float32 cannot resolve.
  """
  d = np.asarray(distances, np.float64)
  if d.ndim != 2:
    raise ValueError(f"distances must be [group, codes], got shape {d.shape}")
  if not epsilon > 0:
    raise ValueError(f"repair Sinkhorn epsilon must be > 0, got {epsilon}")
  g, k = d.shape
  log_q = -_center(d) / float(epsilon)
  log_q = log_q - _logsumexp(log_q, axis=1)
  log_col = np.log(g / k)
  for _ in range(int(iters)):
    log_q = log_q - _logsumexp(log_q, axis=1)
    log_q = log_q - _logsumexp(log_q, axis=0) + log_col
  return log_q


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
  m = np.max(a, axis=axis, keepdims=True)
  return m + np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True))
