"""RQ-KMeans (index.source = "rqkmeans"): residual k-means, Sinkhorn-balanced levels."""

import numpy as np
import pytest

from lcrec_jax.index import rqkmeans


def _skewed(d=8, seed=0):
  """200 points: blobs of 150 (wide), 35 and 15 (tight); nearest-code levels are unbalanced."""
  rng = np.random.default_rng(seed)
  lab = np.repeat(np.arange(3), [150, 35, 15])
  centers = np.stack([np.zeros(d), 4 * np.ones(d), -4 * np.ones(d)])
  scale = np.array([1.0, 0.3, 0.3])[lab, None]
  return (centers[lab] + scale * rng.normal(size=(200, d))).astype(np.float32)


def _run(x, eps, **kw):
  args = dict(num_levels=len(eps), codebook_size=8, sk_epsilons=eps, iters=10, sk_iters=50,
              seed=0)
  args.update(kw)
  return rqkmeans.rq_kmeans(x, **args)


def test_shapes_residuals_and_determinism():
  x = _skewed()
  r = _run(x, (0.0, 0.003))
  assert r.codes.shape == (200, 2) and r.codes.dtype == np.int32
  assert r.codebooks.shape == (2, 8, 8) and r.last_distances.shape == (200, 8)
  recon = r.codebooks[0][r.codes[:, 0]] + r.codebooks[1][r.codes[:, 1]]
  np.testing.assert_allclose(r.recon_sq_err, np.mean((x - recon) ** 2, axis=1), rtol=1e-4,
                             atol=1e-7)
  level1 = x - r.codebooks[0][r.codes[:, 0]]
  want = ((level1[:, None, :] - r.codebooks[1][None]) ** 2).sum(-1)
  np.testing.assert_allclose(r.last_distances, want, rtol=1e-3, atol=1e-5)
  again = _run(x, (0.0, 0.003))
  np.testing.assert_array_equal(again.codes, r.codes)


def test_sinkhorn_balances_a_skewed_level():
  x = _skewed()
  def counts(eps):
    codes = _run(x, eps).codes
    return np.stack([np.bincount(codes[:, l], minlength=8) for l in range(2)])

  plain = counts((0.0, 0.0))
  balanced = counts((0.003, 0.003))
  assert plain[1].max() > 50  # 200 items on 8 codes: 25 each when balanced
  assert balanced.min() >= 15 and balanced.max() <= 36  # the tight blob of 35 stays put


def test_bad_input():
  with pytest.raises(ValueError, match="sk_epsilons"):
    _run(_skewed(), (0.0,), num_levels=2)
  x = _skewed()
  x[0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    _run(x, (0.0,))
