"""Conflict-free code assignment: LC-Rec's repair and the uniqueness guarantee."""

import itertools

import jax
import numpy as np
import pytest

from lcrec_jax.index import assign
from lcrec_jax.index.item_index import ItemIndex


def _brute_collision_rate(codes):
  rows = [tuple(r) for r in np.asarray(codes).tolist()]
  return (len(rows) - len(set(rows))) / len(rows)


def _assert_unique_and_prefix(before, after, k):
  after = np.asarray(after)
  assert len({tuple(r) for r in after.tolist()}) == len(after), "codes not unique"
  l = before.shape[1]
  np.testing.assert_array_equal(after[:, :l - 1], before[:, :l - 1])  # prefix kept
  assert after[:, l - 1].min() >= 0 and after[:, l - 1].max() < k


def test_collision_stats_match_brute_force():
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 3, size=(200, 3))
  assert assign.collision_rate(codes) == pytest.approx(_brute_collision_rate(codes))
  groups = assign.collision_groups(codes)
  by_code = {}
  for i, r in enumerate(codes.tolist()):
    by_code.setdefault(tuple(r), []).append(i)
  expect = sorted([v for v in by_code.values() if len(v) > 1], key=lambda g: g[0])
  assert [g.tolist() for g in groups] == expect
  assert assign.max_items_per_code(codes) == max(len(v) for v in by_code.values())
  n_coll = ItemIndex(tuple(map(str, range(200))), codes, (3, 3, 3)).num_collisions()
  assert n_coll == sum(len(g) for g in expect)


def test_make_unique_moves_farther_member_to_nearest_free_code():
  # Two items share code (0, 1); item 1 is farther from code 1, so it moves, and it goes
  # to its nearest free code (3); code 0 is taken by item 2 under the same prefix.
  codes = np.array([[0, 1], [0, 1], [0, 0], [1, 1]])
  dist = np.array([[5., 0.1, 9, 9], [0.1, 0.5, 9, 0.3], [0, 9, 9, 9], [9, 0, 9, 9]])
  out, moved, extra = assign.make_unique(codes, dist)
  assert (moved, extra) == (1, 0)
  np.testing.assert_array_equal(out, [[0, 1], [0, 3], [0, 0], [1, 1]])


def test_make_unique_is_optimal_on_small_cases_against_brute_force_count():
  # Greedy keeps the nearest member and the result is unique; the number of moved items
  # equals the minimum possible (sum over codes of count - 1 within each prefix).
  rng = np.random.default_rng(1)
  for _ in range(20):
    k = 12  # a prefix never holds more than K items here
    codes = np.stack([rng.integers(0, 2, 12), rng.integers(0, 4, 12)], 1)
    dist = rng.random((12, k))
    out, moved, extra = assign.make_unique(codes, dist)
    _assert_unique_and_prefix(codes, out, k)
    assert extra == 0
    min_moves = sum(c - 1 for c in np.unique(codes, axis=0, return_counts=True)[1])
    assert moved == min_moves
    # Every code that had members keeps one of them: the nearest (ties by item number).
    for code, grp in itertools.groupby(sorted(range(12), key=lambda i: tuple(codes[i])),
                                       key=lambda i: tuple(codes[i])):
      grp = list(grp)
      keeper = min(grp, key=lambda i: (dist[i, code[1]], i))
      assert tuple(out[keeper]) == code


def test_identical_embeddings_break_ties_by_item_number():
  codes = np.zeros((6, 4), int)
  out, moved, extra = assign.make_unique(codes, np.zeros((6, 8)))
  assert (moved, extra) == (5, 0)
  # Item 0 keeps code 0; items 1..5 take codes 1..5 in item order.
  np.testing.assert_array_equal(out[:, -1], np.arange(6))
  _assert_unique_and_prefix(codes, out, 8)


@pytest.mark.parametrize("n, k", [(600, 256), (9, 4), (257, 256)])
def test_prefix_overflow_adds_smallest_extra_level(n, k):
  # n identical items under one prefix, more than the K last-level codes can hold.
  codes = np.tile(np.array([[3, 7, 1, 0]]), (n, 1))
  codes = np.concatenate([codes, [[3, 7, 2, 3], [0, 0, 0, 0]]])  # other prefixes
  dist = np.zeros((len(codes), k))
  out, moved, extra = assign.make_unique(codes, dist)
  cap = -(-n // k)
  assert extra == cap, "extra level is as small as possible: ceil(n / K)"
  assert out.shape == (len(codes), 5)
  assert len({tuple(r) for r in out.tolist()}) == len(out)
  np.testing.assert_array_equal(out[:, :3], codes[:, :3])
  assert out[:, 4].max() == cap - 1 and out[:, 4].min() == 0
  idx = ItemIndex(tuple(map(str, range(len(out)))), out, (8, 8, 8, k, extra))
  assert idx.is_conflict_free()
  # Items that never collided keep their code and get 0 in the extra level.
  np.testing.assert_array_equal(out[n:], [[3, 7, 2, 3, 0], [0, 0, 0, 0, 0]])


def test_mixed_overflow_and_free_prefixes():
  # Prefix A overflows (20 items, K=4); prefix B has 3 colliders and free codes: B's
  # items keep their prefix and get distinct last codes.
  rng = np.random.default_rng(2)
  a = np.tile([[0, 0]], (20, 1))
  a[:, 1] = rng.integers(0, 4, 20)
  b = np.array([[1, 2], [1, 2], [1, 2]])
  codes = np.concatenate([a, b])
  dist = rng.random((23, 4))
  out, _, extra = assign.make_unique(codes, dist)
  assert extra == 5
  assert len({tuple(r) for r in out.tolist()}) == 23
  np.testing.assert_array_equal(out[:, 0], codes[:, 0])
  assert len(set(out[20:, 1].tolist())) == 3
  assert np.bincount(out[:20, 1], minlength=4).max() == 5


def test_repair_codes_stops_when_free_and_counts_rounds():
  # Two items share code (0, 0); each is nearest to a different last-level code, so one
  # Sinkhorn round over the pair separates them and the loop stops.
  codes = np.array([[0, 0], [0, 0], [1, 1]])
  dist = np.array([[0.0, 1.0, 2.0, 2.0], [0.1, 0.05, 2.0, 2.0], [1.0, 0.0, 1.0, 1.0]])
  out, used, changed = assign.repair_codes(codes, dist, rounds=20, sk_epsilon=0.005,
                                           sk_iters=50)
  assert (used, changed) == (1, 1)
  np.testing.assert_array_equal(out, [[0, 0], [0, 1], [1, 1]])
  # Identical rows cannot be separated: all rounds are used and the duplicates stay.
  out, used, _ = assign.repair_codes(np.zeros((3, 2), int), np.tile(dist[:1], (3, 1)),
                                     rounds=4, sk_epsilon=0.005, sk_iters=50)
  assert used == 4 and assign.collision_rate(out) == pytest.approx(2 / 3)


def _lcrec_sinkhorn_float64(d, eps, iters):
  """LC-Rec's plain-domain iteration (index/models/layers.py), float64."""
  middle = (d.max() + d.min()) / 2
  d = (d - middle) / (d.max() - middle + 1e-5)
  q = np.exp(-d / eps)
  q /= q.sum()
  b, k = q.shape
  for _ in range(iters):
    q /= q.sum(1, keepdims=True)
    q /= b
    q /= q.sum(0, keepdims=True)
    q /= k
  return q * b


@pytest.mark.parametrize("eps", [0.05, 0.02])
def test_sinkhorn_plan_matches_lcrec_and_jax_sinkhorn(eps):
  # At these epsilons LC-Rec's exp() does not overflow float64, so its plain iteration is
  # a reference; the model's JAX float32 log-domain Sinkhorn agrees too.
  from lcrec_jax.index import sinkhorn
  rng = np.random.default_rng(5)
  for g in (2, 5, 17):
    d = rng.random((g, 32)) * 3
    ours = np.exp(assign.sinkhorn_log_plan(d, eps, 50))
    np.testing.assert_allclose(ours, _lcrec_sinkhorn_float64(d, eps, 50), rtol=1e-9,
                               atol=1e-12)
    jx = np.exp(np.asarray(sinkhorn.log_sinkhorn(d.astype(np.float32), eps, 50)))
    np.testing.assert_allclose(jx, ours, atol=2e-5)
    # Codes are a row maximum of the plan.
    codes = assign.sinkhorn_codes(d, eps, 50)
    np.testing.assert_allclose(ours[np.arange(g), codes], ours.max(1), rtol=1e-8)


def test_sinkhorn_codes_spread_a_group_and_break_ties_by_distance():
  rng = np.random.default_rng(6)
  d = rng.random((8, 16))
  codes = assign.sinkhorn_codes(d, 0.003, 50)  # tiny epsilon: finite, balanced spread
  assert len(set(codes.tolist())) == 8
  # One item alone owns every column: the plan is flat, the nearest code wins.
  d1 = rng.random((1, 16))
  assert assign.sinkhorn_codes(d1, 0.003, 50)[0] == np.argmin(d1)


# -- with the real RQ-VAE -----------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered_model():
  """A k-means-initialised RQ-VAE (3 x 16 codes) on 300 items in 6 tight clusters.

  Items 250..299 are 50 exact copies of item 0: more than the 16 last-level codes of
  their prefix can hold.
  """
  from lcrec_jax.index import rqvae
  rng = np.random.default_rng(3)
  centers = rng.normal(size=(6, 16)).astype(np.float32)
  x = centers[rng.integers(0, 6, 300)] + 0.05 * rng.normal(size=(300, 16))
  x = x.astype(np.float32)
  x[250:] = x[0]
  model = rqvae.RQVAE(in_dim=16, encoder_layers=(32,), e_dim=8, num_levels=3,
                      codebook_size=16, sk_epsilons=(0.0, 0.0, 0.003), sk_iters=50)
  key = jax.random.PRNGKey(0)
  variables = model.init({"params": key, "dropout": key}, x[:16], train=False)
  variables = rqvae.init_codebooks_kmeans(variables, model, x, jax.random.PRNGKey(1), 20)
  return model, variables, x


def test_repair_reduces_collisions_and_final_index_is_unique(clustered_model):
  # Many items packed into few clusters: argmax codes collide, LC-Rec's Sinkhorn repair
  # separates distinct items, the uniqueness step the rest (the 51 identical items need an
  # extra level: they share one prefix with 16 last-level codes).
  model, variables, x = clustered_model
  ids = [f"i{j}" for j in range(len(x))]
  index, stats, enc = assign.build_item_index(model, variables, x, ids,
                                              repair_rounds=20, repair_sk_epsilon=0.005,
                                              batch_size=64)
  distinct = np.arange(1, 250)  # items with no exact copy
  before = assign.collision_rate(enc.codes[distinct])
  assert before > 0.05
  _, repaired, _ = assign.assign_codes(enc.codes[distinct], enc.last_distances[distinct],
                                       rounds=20, sk_epsilon=0.005, sk_iters=50)
  assert assign.collision_rate(repaired) < before / 2
  assert stats.collision_rate_after_repair < stats.collision_rate_before
  assert stats.collision_rate_after == 0.0 and stats.extra_level_added
  assert index.is_conflict_free() and index.item_ids == tuple(ids)
  assert index.level_sizes == (16, 16, 16, stats.extra_level_size)
  assert stats.extra_level_size >= 4  # ceil(51 / 16)
  # Padded batches give the same codes as one unpadded pass.
  full = assign.encode_items(model, variables, x, batch_size=len(x))
  np.testing.assert_array_equal(enc.codes, full.codes)
  np.testing.assert_allclose(enc.last_distances, full.last_distances, rtol=1e-4, atol=1e-5)
  # Repair and uniqueness never change a prefix.
  np.testing.assert_array_equal(index.codes[:, :2], enc.codes[:, :2])


def test_600_identical_items_with_real_model(clustered_model):
  model, variables, x = clustered_model
  x = np.concatenate([x, np.tile(x[:1], (600, 1))])
  index, stats, _ = assign.build_item_index(model, variables, x,
                                            [str(j) for j in range(len(x))],
                                            repair_rounds=3, repair_sk_epsilon=0.005,
                                            batch_size=64)
  assert index.is_conflict_free()
  assert stats.extra_level_added and index.num_levels == 4
  assert stats.extra_level_size >= -(-651 // 16)
  assert index.level_sizes[-1] == stats.extra_level_size
