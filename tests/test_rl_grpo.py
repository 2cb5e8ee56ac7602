"""GRPO pieces against independent references: a hand-worked reward group, numpy float64
advantages, loss and gradient, and the zero-advantage share."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcrec_jax.rl import grpo, rewards


def test_ranking_reward_hand_worked_group():
  # G = 4: penalties -(1/log2(g+2)) / sum = -[1, 0.6309, 0.5, 0.4307] / 2.5616
  s = 1 + 1 / np.log2(3) + 0.5 + 1 / np.log2(5)
  items = np.array([[7, 3, 9, 1],      # target 3 at rank 1: a hit group
                    [5, 6, 8, 2],      # target 4 absent: all zero
                    [4, -1, -1, -1]])  # target 4 at rank 0; empty beams get 0
  got = rewards.ranking_reward(items, np.array([3, 4, 4]))
  want = np.array([[-1 / s, 1.0, -0.5 / s, -(1 / np.log2(5)) / s],
                   [0, 0, 0, 0],
                   [1.0, 0, 0, 0]])
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert rewards.rank_penalties(16).sum() == pytest.approx(-1.0)


def test_partial_credit_counts_leading_levels_only():
  codes = np.array([[[1, 2, 3], [1, 2, 0], [1, 0, 3], [0, 2, 3]]])
  got = rewards.partial_credit_reward(np.array([[0, 1, 2, -1]]), codes, np.array([[1, 2, 3]]))
  np.testing.assert_allclose(got, [[1.0, 2 / 3, 1 / 3, 0.0]])   # [0, 2, 3]: level a differs
  total = rewards.combine(np.array([[0, 1, 2, 5]]), codes, np.array([0]), np.array([[1, 2, 3]]),
                          {"ranking": 1.0, "partial": 0.5,
                           "collab": 2.0},
                          extra={"collab": lambda rows, items: np.ones(items.shape)},
                          prompt_rows=np.array([0]))
  s = rewards.rank_penalties(4)
  np.testing.assert_allclose(total[0], [1 + 0.5 + 2, s[1] + 0.5 * 2 / 3 + 2,
                                        s[2] + 0.5 / 3 + 2, s[3] + 2])
  with pytest.raises(ValueError, match="unknown reward"):
    rewards.combine(np.zeros((1, 4), int), codes, np.array([0]), np.array([[1, 2, 3]]),
                    {"nope": 1.0})


def test_group_advantages_and_zero_share_match_numpy():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(5, 6))
  r[1] = 0.0           # all equal: zero advantage
  r[3] = 0.7
  valid = np.ones_like(r, bool)
  valid[4, 4:] = False
  got = np.asarray(grpo.group_advantages(r, valid))
  for p in range(5):
    v = valid[p]
    x = r[p, v]
    want = (x - x.mean()) / (x.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(got[p, v], want, rtol=1e-5, atol=1e-5)
    assert (got[p, ~v] == 0).all()
  zero = grpo.zero_advantage_groups(r, valid)
  np.testing.assert_array_equal(zero, [False, True, False, True, False])
  assert np.abs(got[zero]).max() == 0


def _numpy_loss_and_grad(logp, old, ref, adv, w, beta, eps):
  """float64 reference: loss and d loss / d logp, written out by hand."""
  logp, old, ref = (np.asarray(x, np.float64) for x in (logp, old, ref))
  rho = np.exp(logp - old)
  a = adv[:, None]
  unclipped, clipped = rho * a, np.clip(rho, 1 - eps, 1 + eps) * a
  d = ref - logp
  kl = np.exp(d) - d - 1
  ww = np.broadcast_to(w[:, None], logp.shape)
  wsum = ww.sum()
  loss = -(ww * (np.minimum(unclipped, clipped) - beta * kl)).sum() / wsum
  takes_unclipped = unclipped <= clipped          # the min's branch that moves with logp
  inside = (rho >= 1 - eps) & (rho <= 1 + eps)
  d_sur = np.where(takes_unclipped | inside, rho * a, 0.0)
  d_kl = 1.0 - np.exp(d)
  grad = -ww * (d_sur - beta * d_kl) / wsum
  return loss, grad


@pytest.mark.parametrize("on_policy", [True, False])
def test_grpo_loss_and_gradient_match_numpy_float64(on_policy):
  rng = np.random.default_rng(1)
  n, levels, beta, eps = 12, 4, 0.04, 0.2
  logp = np.log(rng.uniform(0.05, 0.9, size=(n, levels)))
  old = logp if on_policy else logp + rng.normal(scale=0.3, size=logp.shape)
  ref = logp + rng.normal(scale=0.5, size=logp.shape)
  adv = rng.normal(size=n)
  w = (rng.uniform(size=n) > 0.25).astype(np.float64)
  f = jax.jit(lambda lp: grpo.grpo_loss(lp, None if on_policy else jnp.asarray(old, jnp.float32),
                                        jnp.asarray(ref, jnp.float32),
                                        jnp.asarray(adv, jnp.float32),
                                        jnp.asarray(w, jnp.float32), beta=beta, clip_eps=eps))
  (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
  want_loss, want_grad = _numpy_loss_and_grad(logp, old, ref, adv, w, beta, eps)
  assert float(loss) == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)
  d = ref - logp
  want_kl = ((np.exp(d) - d - 1) * w[:, None]).sum() / (w.sum() * levels)
  assert float(aux["kl"]) == pytest.approx(want_kl, rel=1e-5)
  if on_policy:
    assert float(aux["ratio"]) == pytest.approx(1.0) and float(aux["clip_frac"]) == 0.0
  else:
    assert 0 < float(aux["clip_frac"]) < 1   # the clip is exercised


def test_k3_is_zero_at_the_reference_and_positive_elsewhere():
  x = jnp.linspace(-3, 0, 7)
  assert float(jnp.abs(grpo.kl_k3(x, x)).max()) == 0.0
  assert (np.asarray(grpo.kl_k3(x, x + 0.3)) > 0).all()
