"""Tests for lcrec_jax/index/rqvae.py and lcrec_jax/index/kmeans.py."""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcrec_jax.index import kmeans as km
from lcrec_jax.index import rqvae as rq

BETA = 0.25


def _model(**kw):
  args = dict(in_dim=12, encoder_layers=(16,), e_dim=6, num_levels=3, codebook_size=8,
              dropout=0.0, batch_norm=False, beta=BETA, sk_epsilons=(0.0, 0.0, 0.0),
              sk_iters=30)
  args.update(kw)
  return rq.RQVAE(**args)


def _setup(seed=0, b=10, **kw):
  model = _model(**kw)
  x = jax.random.normal(jax.random.key(seed), (b, model.in_dim))
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(seed + 1), x)
  return model, variables, x


# Jitted wrappers, cached per model and static arguments: one compile each instead of
# op-by-op dispatch or a recompile per call (keeps the tests fast).
@functools.lru_cache(maxsize=None)
def _jitted(model, method, *static, **kw):
  if method == "encode":
    return jax.jit(lambda v, x: model.apply(v, x, method=rq.RQVAE.encode))
  if method == "quantize":
    return jax.jit(lambda v, z: model.apply(v, z, *static, method=rq.RQVAE.quantize))
  return jax.jit(lambda v, x: model.apply(v, x, **kw))


def _encode(model, variables, x):
  return _jitted(model, "encode")(variables, x)


def _quantize(model, variables, z, use_sinkhorn=False, sk_epsilons=None):
  return _jitted(model, "quantize", use_sinkhorn, sk_epsilons)(variables, z)


def _call(model, variables, x, **kw):
  return _jitted(model, "call", **kw)(variables, x)


def test_param_layout_and_shapes():
  model, variables, x = _setup()
  for l in range(3):
    chex.assert_shape(variables["params"]["quantizer"][f"level_{l}"]["codebook"], (8, 6))
  out = _call(model, variables, x, train=False)
  chex.assert_shape([out.recon, out.z, out.z_q, out.codes, out.distances],
                    [(10, 12), (10, 6), (10, 6), (10, 3), (10, 3, 8)])
  assert out.codes.dtype == jnp.int32 and out.quant_loss.shape == ()
  assert len(rq.get_codebooks(variables, 3)) == 3


def test_residual_identity_and_loss_values_float64():
  model, variables, x = _setup()
  z = _encode(model, variables, x)
  z_q, quant_loss, codes, dists = _quantize(model, variables, z)
  cbs = [np.asarray(c, np.float64) for c in rq.get_codebooks(variables, 3)]
  codes = np.asarray(codes)
  # Float64 residual chain with nearest codes.
  r = np.asarray(z, np.float64)
  losses = []
  for l, cb in enumerate(cbs):
    d = ((r[:, None, :] - cb[None]) ** 2).sum(-1)
    np.testing.assert_allclose(np.asarray(dists[:, l]), d, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(codes[:, l], d.argmin(1))
    e = cb[codes[:, l]]
    losses.append((1 + BETA) * np.mean((e - r) ** 2))
    r = r - e
  # Sum of chosen code vectors is z_q; z - z_q is the last residual.
  chosen = sum(cb[codes[:, l]] for l, cb in enumerate(cbs))
  np.testing.assert_allclose(np.asarray(z_q), chosen, atol=1e-5)
  np.testing.assert_allclose(np.asarray(z) - np.asarray(z_q), r, atol=1e-5)
  # LC-Rec: mean over levels of codebook + beta * commitment.
  np.testing.assert_allclose(float(quant_loss), np.mean(losses), rtol=1e-5)
  summed = _model(quant_loss_reduction="sum")
  _, qs, _, _ = _quantize(summed, variables, z)
  np.testing.assert_allclose(float(qs), np.sum(losses), rtol=1e-5)
  # Total loss = recon MSE + quant loss.
  out = _call(model, variables, x, train=False, use_sinkhorn=False)
  total, aux = rq.loss_fn(out, x)
  recon = np.mean((np.asarray(out.recon, np.float64) - np.asarray(x, np.float64)) ** 2)
  np.testing.assert_allclose(float(aux["recon_mse"]), recon, rtol=1e-5)
  np.testing.assert_allclose(float(total), recon + np.mean(losses), rtol=1e-5)


def test_straight_through_gradients():
  model, variables, x = _setup(b=4)
  z = _encode(model, variables, x)

  def zq_of(z):
    return model.apply(variables, z, False, method=rq.RQVAE.quantize)[0]

  jac = jax.jit(jax.jacobian(zq_of))(z).reshape(z.size, z.size)
  np.testing.assert_allclose(np.asarray(jac), np.eye(z.size), atol=1e-6)

  # Quant loss gradient w.r.t. z: only level 0's commitment reaches z (later residuals are
  # built from straight-through outputs, as in LC-Rec): beta * 2 (z - e0) / (B e) / L.
  def ql_of(z):
    return model.apply(variables, z, False, method=rq.RQVAE.quantize)[1]

  g = np.asarray(jax.jit(jax.grad(ql_of))(z), np.float64)
  codes = np.asarray(_quantize(model, variables, z)[2])
  e0 = np.asarray(rq.get_codebooks(variables, 3)[0], np.float64)[codes[:, 0]]
  expect = BETA * 2 * (np.asarray(z, np.float64) - e0) / z.size / 3
  np.testing.assert_allclose(g, expect, rtol=1e-4, atol=1e-8)

  # The reconstruction loss reaches the encoder through the quantizer, not the codebooks.
  def recon_loss(params):
    out = model.apply({"params": params}, x, train=False)
    return rq.loss_fn(out, x)[1]["recon_mse"]

  grads = jax.jit(jax.grad(recon_loss))(variables["params"])
  assert float(jnp.abs(grads["encoder"]["dense_0"]["kernel"]).max()) > 0
  for l in range(3):
    assert float(jnp.abs(grads["quantizer"][f"level_{l}"]["codebook"]).max()) == 0


def test_sinkhorn_spreads_near_identical_inputs():
  model = _model(num_levels=1, codebook_size=16, sk_epsilons=(0.003,), sk_iters=100)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((2, 12)), train=False))(jax.random.key(0))
  cb = rq.get_codebooks(variables, 1)[0]
  z = cb[5] + 1e-2 * jax.random.normal(jax.random.key(1), (64, 6))
  _, _, codes_nn, _ = _quantize(model, variables, z, False)
  _, _, codes_sk, _ = _quantize(model, variables, z, True)
  assert len(np.unique(np.asarray(codes_nn))) == 1
  counts = np.bincount(np.asarray(codes_sk)[:, 0], minlength=16)
  assert (counts > 0).sum() >= 12, counts
  # The override switches Sinkhorn off (or on) per level.
  _, _, codes_off, _ = _quantize(model, variables, z, True, (0.0,))
  np.testing.assert_array_equal(np.asarray(codes_off), np.asarray(codes_nn))


def test_batch_norm_and_dropout_modes():
  model, variables, x = _setup(b=32, batch_norm=True, dropout=0.2)
  assert "batch_stats" in variables
  out, updates = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)}))(
          variables, x)
  before = variables["batch_stats"]["encoder"]["bn_0"]["mean"]
  after = updates["batch_stats"]["encoder"]["bn_0"]["mean"]
  assert float(jnp.abs(after - before).max()) > 0
  a = _call(model, variables, x, train=False)
  b = _call(model, variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(a.recon), np.asarray(b.recon))
  assert bool(jnp.isfinite(out.recon).all())


def test_toy_training_loss_falls():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(8, 16)) * 2
  x = jnp.asarray(centers[rng.integers(0, 8, 512)] + 0.3 * rng.normal(size=(512, 16)),
                  jnp.float32)
  model = rq.RQVAE(in_dim=16, encoder_layers=(32,), e_dim=8, num_levels=2, codebook_size=16,
                   sk_epsilons=(0.0, 0.003), sk_iters=30)
  params = jax.jit(lambda k: model.init(k, x[:4], train=False))(jax.random.key(0))["params"]
  tx = optax.adamw(3e-3, weight_decay=1e-4)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, xb):
    def f(p):
      return rq.loss_fn(model.apply({"params": p}, xb, train=True), xb)[0]
    loss, g = jax.value_and_grad(f)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  evaluate = jax.jit(lambda p: rq.loss_fn(
      model.apply({"params": p}, x, train=False, use_sinkhorn=False), x)[0])
  first = float(evaluate(params))
  for i in range(240):
    s = (i * 64) % 512
    params, opt, _ = step(params, opt, x[s:s + 64])
  last = float(evaluate(params))
  assert np.isfinite(last) and last < first / 5, (first, last)


def test_init_codebooks_kmeans():
  model, variables, _ = _setup(b=4)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(200, 12)), jnp.float32)
  key = jax.random.key(7)
  new = rq.init_codebooks_kmeans(variables, model, x, key, iters=10)
  z = _encode(model, variables, x)
  cb0 = km.kmeans(jax.random.fold_in(key, 0), z, 8, 10)
  np.testing.assert_allclose(np.asarray(rq.get_codebooks(new, 3)[0]), np.asarray(cb0), atol=1e-6)
  r1 = z - cb0[km.assign_nearest(z, cb0)]
  cb1 = km.kmeans(jax.random.fold_in(key, 1), r1, 8, 10)
  np.testing.assert_allclose(np.asarray(rq.get_codebooks(new, 3)[1]), np.asarray(cb1), atol=1e-6)
  # Encoder untouched, quantisation error far below random codebooks.
  np.testing.assert_array_equal(np.asarray(new["params"]["encoder"]["dense_0"]["kernel"]),
                                np.asarray(variables["params"]["encoder"]["dense_0"]["kernel"]))

  def qerr(v):
    zq = _quantize(model, v, z)[0]
    return float(jnp.mean((z - zq) ** 2))

  assert qerr(new) < 0.5 * qerr(variables)
  frozen = rq.init_codebooks_kmeans(flax.core.freeze(variables), model, x, key, iters=10)
  assert isinstance(frozen, flax.core.FrozenDict)


# ------------------------------------------------------------------------------ k-means


def test_kmeans_recovers_separated_clusters():
  rng = np.random.default_rng(0)
  true = rng.normal(size=(6, 5)) * 10
  labels = np.repeat(np.arange(6), 50)
  x = jnp.asarray(true[labels] + 0.1 * rng.normal(size=(300, 5)), jnp.float32)
  c = np.asarray(km.kmeans(jax.random.key(0), x, 6, 20))
  chex.assert_shape(c, (6, 5))
  # Every true centre has a centroid within noise, one-to-one.
  d = ((true[:, None] - c[None]) ** 2).sum(-1)
  match = d.argmin(1)
  assert len(set(match.tolist())) == 6
  assert np.sqrt(d.min(1)).max() < 0.1
  # Deterministic for a key.
  np.testing.assert_array_equal(c, np.asarray(km.kmeans(jax.random.key(0), x, 6, 20)))


def test_kmeans_fewer_points_than_clusters():
  x = jnp.arange(12, dtype=jnp.float32).reshape(4, 3)
  c = np.asarray(km.kmeans(jax.random.key(1), x, 7, 5))
  chex.assert_shape(c, (7, 3))
  # Every point is a centroid (first N rows) and the rest repeat points.
  np.testing.assert_array_equal(np.sort(c[:4], axis=0), np.asarray(x))
  assert all(any((row == np.asarray(x)).all(1)) for row in c[4:])


def test_kmeans_reseeds_empty_clusters():
  x = jnp.asarray([[0.0], [0.1], [10.0], [10.2], [30.0]], jnp.float32)
  centers = jnp.asarray([[0.05], [10.1], [1000.0]], jnp.float32)  # third gets no point
  new = np.asarray(km._lloyd_step(x, centers))
  np.testing.assert_allclose(new[:2, 0], [0.05, (10.0 + 10.2 + 30.0) / 3], rtol=1e-6)
  # 30.0 is the point farthest from its centre (10.1): it seeds the empty cluster.
  np.testing.assert_allclose(new[2, 0], 30.0)
  # Duplicated data (fewer distinct points than k) gives finite centroids, no NaN.
  dup = jnp.asarray(np.repeat([[1.0, 2.0], [3.0, 4.0]], 10, axis=0), jnp.float32)
  c = km.kmeans(jax.random.key(2), dup, 4, 5)
  assert bool(jnp.isfinite(c).all())
  assert {tuple(r) for r in np.asarray(c).tolist()} == {(1.0, 2.0), (3.0, 4.0)}
