"""Constrained beam search against brute-force scoring of every item's code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcrec_jax.decode.beam_search import codes_to_items, constrained_beam_search
from lcrec_jax.decode.trie import build_trie, position_mask
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm import config as llm_config
from lcrec_jax.llm.model import Llama, init_params

LEVELS, K, BASE_VOCAB = 3, 4, 40


def _setup(num_items=24, seed=0):
  rng = np.random.default_rng(seed)
  codes = rng.permutation(np.array(np.meshgrid(*[np.arange(K)] * LEVELS)).reshape(LEVELS, -1).T)
  codes = codes[:num_items].astype(np.int32)
  index = ItemIndex(tuple(str(i) for i in range(num_items)), codes, (K,) * LEVELS)
  code_ids = BASE_VOCAB + np.arange(LEVELS * K, dtype=np.int32).reshape(LEVELS, K)
  cfg = llm_config.tiny(vocab=BASE_VOCAB + LEVELS * K, dtype="float32", param_dtype="float32")
  model = Llama(cfg)
  params = init_params(cfg, jax.random.PRNGKey(seed))
  # Sharpen the output distribution so scores differ clearly between items.
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 and x.shape[0] == cfg.vocab_size else x,
                        params)
  return index, code_ids, model, params


def _brute_force(model, params, prompt, index, code_ids):
  """``[num_items]`` log p(code tokens of item | prompt): a full forward over every item."""
  toks = code_ids[np.arange(LEVELS)[None], index.codes]                   # [N, L]
  seqs = np.concatenate([np.broadcast_to(prompt, (index.num_items, len(prompt))), toks], 1)
  logits, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(seqs))
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  n = len(prompt)
  rows = np.arange(index.num_items)[:, None]
  return logp[rows, n - 1 + np.arange(LEVELS)[None], toks].sum(1)


def _left_pad(prompts, length):
  toks = np.zeros((len(prompts), length), np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for r, p in enumerate(prompts):
    toks[r, length - len(p):], mask[r, length - len(p):] = p, 1
  return jnp.asarray(toks), jnp.asarray(mask)


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_exhaustive_beams_equal_brute_force(layout):
  index, code_ids, model, params = _setup()
  trie = build_trie(index, layout)
  prompts = [np.array([3, 17, 5, 9, 22]), np.array([11, 4, 30])]
  tok, mask = _left_pad(prompts, 7)
  beams = index.num_items  # enough beams to keep every prefix: the search is exact
  res = constrained_beam_search(model, params, tok, mask, jnp.asarray(code_ids), trie,
                                num_beams=beams)
  for r, p in enumerate(prompts):
    ref = _brute_force(model, params, p, index, code_ids)
    order = np.argsort(-ref, kind="stable")
    items, scores = np.asarray(res.items[r]), np.asarray(res.scores[r])
    np.testing.assert_array_equal(items[:10], order[:10])
    np.testing.assert_allclose(scores, ref[items], atol=1e-4)
    assert sorted(items.tolist()) == list(range(index.num_items))  # valid, no duplicates


def test_small_beam_outputs_valid_distinct_items_and_padding_invariance():
  index, code_ids, model, params = _setup(num_items=40, seed=1)
  trie = build_trie(index)
  p = np.array([3, 17, 5, 9, 22])
  alone = constrained_beam_search(model, params, *_left_pad([p], 5), jnp.asarray(code_ids), trie,
                                  num_beams=6)
  batched = constrained_beam_search(model, params, *_left_pad([p, np.array([1, 2])], 9),
                                    jnp.asarray(code_ids), trie, num_beams=6)
  items = np.asarray(alone.items[0])
  assert (items >= 0).all() and len(set(items.tolist())) == 6
  np.testing.assert_array_equal(items, np.asarray(batched.items[0]))
  np.testing.assert_allclose(alone.scores[0], batched.scores[0], atol=1e-5)
  codes = np.asarray(alone.codes[0])
  np.testing.assert_array_equal(codes, index.codes[items])


def test_position_mask_mode_can_emit_non_items():
  index, code_ids, model, params = _setup(num_items=10, seed=2)
  tok, mask = _left_pad([np.array([5, 6, 7])], 3)
  res = constrained_beam_search(model, params, tok, mask, jnp.asarray(code_ids),
                                allowed_codes=jnp.asarray(position_mask(index)),
                                num_beams=20, mode="position")
  items = codes_to_items(res.codes, res.scores, index.lookup())
  # 20 beams over at most 4^3 = 64 codes but only 10 items: some beams must be invalid.
  assert (items[0] == -1).sum() >= 10
  assert set(items[0][items[0] >= 0].tolist()) <= set(range(10))


def test_split_cache_equals_full_copy_and_brute_force():
  """Prompt cache once per user + per-beam generated slots == prompt copied into every beam.

  (The scanned-layers model runs the same split attention; tests/test_kv_cache.py covers it.)
  """
  index, code_ids, model, params = _setup(num_items=30, seed=4)
  trie = build_trie(index)
  prompts = [np.array([3, 17, 5, 9, 22, 8, 1]), np.array([11, 4]), np.array([30, 2, 7, 19])]
  tok, mask = _left_pad(prompts, 9)  # three different amounts of left padding
  cid = jnp.asarray(code_ids)
  split = constrained_beam_search(model, params, tok, mask, cid, trie, num_beams=8)
  full = constrained_beam_search(model, params, tok, mask, cid, trie, num_beams=8,
                                 cache_layout="full")
  np.testing.assert_array_equal(np.asarray(split.items), np.asarray(full.items))
  np.testing.assert_array_equal(np.asarray(split.codes), np.asarray(full.codes))
  np.testing.assert_allclose(np.asarray(split.scores), np.asarray(full.scores), atol=1e-5)
  for r, p in enumerate(prompts):
    ref = _brute_force(model, params, p, index, code_ids)
    items = np.asarray(split.items[r])
    assert (items >= 0).all() and len(set(items.tolist())) == 8
    np.testing.assert_allclose(np.asarray(split.scores[r]), ref[items], atol=1e-4)
    # 8 beams over 30 items need not be exact; with this seed they find the best item.
    assert items[0] == int(np.argmax(ref))


def _ban(num_items, seen_per_user):
  banned = np.zeros((len(seen_per_user), num_items), bool)
  for r, seen in enumerate(seen_per_user):
    banned[r, seen] = True
  return banned


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_banned_items_exhaustive_equals_brute_force_over_the_rest(layout):
  """With as many beams as items, the ban ranks exactly the unbanned items, best first;
  a user left with fewer items than beams gets -1 / -inf in the last beams."""
  index, code_ids, model, params = _setup()
  trie = build_trie(index, layout)
  prompts = [np.array([3, 17, 5, 9, 22]), np.array([11, 4, 30])]
  tok, mask = _left_pad(prompts, 7)
  beams = index.num_items
  refs = [_brute_force(model, params, p, index, code_ids) for p in prompts]
  # user 0: its 5 best items banned (the unbanned search must skip them); user 1: a
  # whole first-level subtree (every item starting with code 0) and three more.
  seen = [np.argsort(-refs[0])[:5],
          np.concatenate([np.flatnonzero(index.codes[:, 0] == 0), [1, 2, 3]])]
  seen[1] = np.unique(seen[1])
  res = constrained_beam_search(model, params, tok, mask, jnp.asarray(code_ids), trie,
                                num_beams=beams, banned=jnp.asarray(_ban(beams, seen)))
  for r in range(2):
    rest = np.setdiff1d(np.arange(index.num_items), seen[r])
    order = rest[np.argsort(-refs[r][rest], kind="stable")]
    items, scores = np.asarray(res.items[r]), np.asarray(res.scores[r])
    n = len(rest)
    np.testing.assert_array_equal(items[:n], order)
    np.testing.assert_allclose(scores[:n], refs[r][order], atol=1e-4)
    assert (items[n:] == -1).all() and np.isneginf(scores[n:]).all()


def test_banned_items_small_beams_equal_search_over_the_users_own_trie():
  """A 6-beam search with a ban is the 6-beam search over the trie of the unbanned items:
  no beam is spent on a banned item, so all 6 beams are unseen items."""
  index, code_ids, model, params = _setup(num_items=40, seed=1)
  trie = build_trie(index)
  prompts = [np.array([3, 17, 5, 9, 22]), np.array([1, 2])]
  tok, mask = _left_pad(prompts, 5)
  cid = jnp.asarray(code_ids)
  plain = constrained_beam_search(model, params, tok, mask, cid, trie, num_beams=6)
  # ban each user's 4 best beams of the plain search plus a few other items
  seen = [np.concatenate([np.asarray(plain.items[r])[:4], [r + 7, 30]]) for r in range(2)]
  res = constrained_beam_search(model, params, tok, mask, cid, trie, num_beams=6,
                                banned=jnp.asarray(_ban(index.num_items, seen)))
  for r, p in enumerate(prompts):
    rest = np.setdiff1d(np.arange(index.num_items), seen[r])
    sub = ItemIndex(tuple(str(i) for i in rest), index.codes[rest], index.level_sizes)
    ref = constrained_beam_search(model, params, *_left_pad([p], 5), cid, build_trie(sub),
                                  num_beams=6)
    items = np.asarray(res.items[r])
    assert (items >= 0).all() and not set(items.tolist()) & set(seen[r].tolist())
    np.testing.assert_array_equal(items, rest[np.asarray(ref.items[0])])
    np.testing.assert_allclose(np.asarray(res.scores[r]), np.asarray(ref.scores[0]), atol=1e-5)


def test_banned_items_need_trie_mode_and_the_right_shape():
  index, code_ids, model, params = _setup(num_items=10, seed=2)
  tok, mask = _left_pad([np.array([5, 6, 7])], 3)
  cid = jnp.asarray(code_ids)
  with pytest.raises(ValueError, match="mode='trie'"):
    constrained_beam_search(model, params, tok, mask, cid,
                            allowed_codes=jnp.asarray(position_mask(index)), num_beams=4,
                            mode="position", banned=jnp.zeros((1, 10), bool))
  with pytest.raises(ValueError, match="num_items"):
    constrained_beam_search(model, params, tok, mask, cid, build_trie(index), num_beams=4,
                            banned=jnp.zeros((1, 9), bool))
