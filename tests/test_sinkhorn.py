"""Tests for lcrec_jax/index/sinkhorn.py against a float64 plain-domain reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcrec_jax.index import sinkhorn as sk


def _reference_sinkhorn(d: np.ndarray, epsilon: float, iters: int, center: bool = True):
  """LC-Rec's algorithm in plain float64: centre, exp(-d/eps), rows then columns, * B."""
  d = np.asarray(d, np.float64)
  if center:
    mid = (d.max() + d.min()) / 2
    d = (d - mid) / (d.max() - mid + 1e-5)
  q = np.exp(-d / epsilon)
  b, k = q.shape
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= b
    q /= q.sum(axis=0, keepdims=True)
    q /= k
  return q * b


def _sq_dists(rng, b, k, dim=8, scale=1.0):
  x = rng.normal(size=(b, dim)) * scale
  c = rng.normal(size=(k, dim)) * scale
  return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("epsilon,iters", [(0.1, 30), (0.02, 50), (0.003, 50)])
def test_matches_float64_reference(epsilon, iters):
  # At these sizes the centred float64 exponent stays within +-1/eps <= 334: no overflow.
  rng = np.random.default_rng(0)
  d = _sq_dists(rng, 48, 16)
  ref = _reference_sinkhorn(d, epsilon, iters)
  assert np.isfinite(ref).all()
  ours = np.asarray(sk.sinkhorn(jnp.asarray(d, jnp.float32), epsilon, iters), np.float64)
  chex.assert_shape(ours, (48, 16))
  assert ours.dtype == np.float64  # (converted above; the JAX result is float32)
  np.testing.assert_allclose(ours, ref, atol=2e-4 * ref.max(), rtol=0)
  # Codes agree where the reference has a clear winner.
  top2 = np.sort(ref, axis=1)[:, -2:]
  clear = top2[:, 1] > 1.01 * top2[:, 0]
  assert clear.mean() > 0.8
  np.testing.assert_array_equal(ours.argmax(1)[clear], ref.argmax(1)[clear])


def test_marginals():
  rng = np.random.default_rng(1)
  b, k = 64, 16
  d = jnp.asarray(_sq_dists(rng, b, k), jnp.float32)
  q = np.asarray(sk.sinkhorn(d, 0.05, 300))
  assert q.dtype == np.float32
  np.testing.assert_allclose(q.sum(0), np.full(k, b / k), rtol=1e-4)
  np.testing.assert_allclose(q.sum(1), np.ones(b), atol=1e-3)
  assert (q >= 0).all()


def test_balances_code_usage():
  # Points all nearest to one code: argmin uses 1 code, the balanced plan spreads them.
  rng = np.random.default_rng(2)
  b, k = 64, 8
  codes = rng.normal(size=(k, 4))
  x = codes[3] + 0.05 * rng.normal(size=(b, 4))
  d = ((x[:, None] - codes[None]) ** 2).sum(-1)
  assert len(np.unique(d.argmin(1))) == 1
  assign = np.asarray(sk.sinkhorn(jnp.asarray(d, jnp.float32), 0.003, 100)).argmax(1)
  counts = np.bincount(assign, minlength=k)
  assert (counts > 0).sum() >= k - 1, counts
  assert counts.max() <= 2 * b // k, counts


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6])
@pytest.mark.parametrize("center", [True, False])
def test_no_nan_or_inf_at_small_epsilon(scale, center):
  rng = np.random.default_rng(3)
  d = jnp.asarray(_sq_dists(rng, 256, 256, scale=scale), jnp.float32)
  # The plain float32 form overflows here: that is what the log domain is for.
  with np.errstate(over="ignore"):
    plain = np.exp(-np.float32(-1.0) / np.float32(0.003))
  assert not np.isfinite(plain)
  q = sk.sinkhorn(d, 0.003, 50, center=center)
  assert bool(jnp.isfinite(q).all())
  np.testing.assert_allclose(np.asarray(q.sum(0)), np.ones(256), rtol=1e-3)
  lq = sk.log_sinkhorn(d, 0.003, 50, center=center)
  assert bool(jnp.isfinite(lq).all())


def test_constant_and_degenerate_inputs():
  q = np.asarray(sk.sinkhorn(jnp.zeros((6, 3)), 0.003, 10))
  np.testing.assert_allclose(q, np.full((6, 3), 1 / 3), rtol=1e-5)
  q = np.asarray(sk.sinkhorn(jnp.ones((1, 5)) * 7.0, 0.003, 10))
  np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-5)
  # iters = 0: row-normalised Gibbs kernel.
  d = jnp.asarray([[0.0, 1.0], [1.0, 0.0]])
  q = np.asarray(sk.sinkhorn(d, 1.0, 0, center=False))
  np.testing.assert_allclose(q.sum(1), [1.0, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="epsilon"):
    sk.sinkhorn(d, 0.0, 5)


def test_jit_and_traced_epsilon():
  d = jnp.asarray(_sq_dists(np.random.default_rng(4), 16, 4), jnp.float32)
  f = jax.jit(lambda d, e: sk.sinkhorn(d, e, 20))
  np.testing.assert_allclose(np.asarray(f(d, jnp.float32(0.05))),
                             np.asarray(sk.sinkhorn(d, 0.05, 20)), rtol=1e-5, atol=1e-7)


def test_center_distances_range():
  d = jnp.asarray(_sq_dists(np.random.default_rng(5), 10, 7), jnp.float32)
  c = np.asarray(sk.center_distances(d))
  assert abs(c.max() - 1) < 1e-4 and abs(c.min() + 1) < 1e-4


@pytest.mark.parametrize("epsilon", [0.05, 0.003])
def test_scaled_blocks_match_log_rounds(epsilon):
  d = jnp.asarray(_sq_dists(np.random.default_rng(6), 128, 32), jnp.float32)
  fast = np.asarray(sk.log_sinkhorn(d, epsilon, 50, block=10))
  slow = np.asarray(sk.log_sinkhorn(d, epsilon, 50, block=0))
  np.testing.assert_allclose(np.exp(fast), np.exp(slow), atol=1e-4 * np.exp(slow).max())
  big = slow > np.log(1e-3)
  np.testing.assert_allclose(fast[big], slow[big], atol=1e-3)
