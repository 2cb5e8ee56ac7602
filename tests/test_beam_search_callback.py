"""The model-agnostic searches (logits callback + cache pytree with beam axes) against
brute force over a toy model whose next-token logits depend on the whole fed-back
history (kept in a per-beam cache leaf) and on a per-user leaf shared by the beams."""

import jax
import jax.numpy as jnp
import numpy as np

from lcrec_jax.decode.beam_search import expand_beams, gather_beams, search_codes
from lcrec_jax.decode.trie import build_trie
from lcrec_jax.decode.unconstrained import search_tokens
from lcrec_jax.index.item_index import ItemIndex

VOCAB, LEVELS, K, USERS = 23, 3, 4, 3
RNG = np.random.default_rng(0)
TABLE = RNG.normal(size=(VOCAB, VOCAB)) * 2.0          # [prev token, next token]
MIX = RNG.normal(size=(VOCAB,)) * 2.0                  # history term
USER_BIAS = RNG.normal(size=(USERS, VOCAB)) * 2.0      # per user, shared by its beams
FIRST = RNG.normal(size=(USERS, VOCAB)) * 2.0          # logits after each prompt
CODE_IDS = (VOCAB - LEVELS * K + np.arange(LEVELS * K)).reshape(LEVELS, K).astype(np.int32)


def _logits_np(user, history):
  """float64 next-token logits of one beam: fed tokens ``history`` (non-empty)."""
  h = float(np.sum(np.asarray(history) * (np.arange(len(history)) + 1)) % 7)
  return TABLE[history[-1]] + USER_BIAS[user] + np.sin(h + MIX)


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def _toy():
  """``(tokens_to_logits, cache, beam_axes)``: a shared user leaf, a per-beam history hash."""
  cache = {"user": jnp.asarray(USER_BIAS, jnp.float32),           # [users, V], shared
           "hist": jnp.zeros((USERS, 1), jnp.float32),            # [rows, 1] per beam
           "step": jnp.zeros((), jnp.float32)}                    # scalar, shared
  axes = {"user": None, "hist": 0, "step": None}

  def tokens_to_logits(tok, cache):
    rows = tok.shape[0]
    beams = rows // cache["user"].shape[0]
    step = cache["step"] + 1
    hist = cache["hist"] + tok.astype(jnp.float32) * step
    h = jnp.mod(hist, 7.0)
    logits = (jnp.asarray(TABLE, jnp.float32)[tok[:, 0]]
              + jnp.repeat(cache["user"], beams, axis=0) + jnp.sin(h + jnp.asarray(MIX, jnp.float32)))
    return logits, {"user": cache["user"], "hist": hist, "step": step}

  return tokens_to_logits, cache, axes


def test_expand_and_gather_follow_the_axes_and_keep_shared_leaves():
  tree = {"a": jnp.arange(6).reshape(2, 3), "b": jnp.arange(8).reshape(4, 2).T, "s": jnp.ones(5)}
  axes = {"a": 0, "b": 1, "s": None}
  wide = expand_beams(tree, axes, 3)
  np.testing.assert_array_equal(wide["a"], np.repeat(np.asarray(tree["a"]), 3, axis=0))
  np.testing.assert_array_equal(wide["b"], np.repeat(np.asarray(tree["b"]), 3, axis=1))
  assert wide["s"] is tree["s"]
  rows = jnp.asarray([2, 0, 1, 5, 5, 3])
  back = gather_beams(wide, axes, rows)
  np.testing.assert_array_equal(back["a"], np.asarray(wide["a"])[np.asarray(rows)])
  np.testing.assert_array_equal(back["b"], np.asarray(wide["b"])[:, np.asarray(rows)])
  assert back["s"] is tree["s"]


def test_search_codes_with_a_callback_equals_brute_force():
  """As many beams as items: the search ranks every item exactly by its float64 score."""
  grid = np.stack(np.meshgrid(*[np.arange(K)] * LEVELS, indexing="ij"), -1).reshape(-1, LEVELS)
  codes = grid[RNG.permutation(len(grid))[:30]].astype(np.int32)
  index = ItemIndex(tuple(str(i) for i in range(len(codes))), codes, (K,) * LEVELS)
  fn, cache, axes = _toy()
  res = jax.jit(lambda first, cache: search_codes(
      fn, first, cache, axes, jnp.asarray(CODE_IDS), build_trie(index),
      num_beams=index.num_items))(jnp.asarray(FIRST, jnp.float32), cache)
  for u in range(USERS):
    ref = np.zeros(index.num_items)
    for i, code in enumerate(codes):
      toks = CODE_IDS[np.arange(LEVELS), code]
      ref[i] = _log_softmax(FIRST[u])[toks[0]]
      for l in range(1, LEVELS):
        ref[i] += _log_softmax(_logits_np(u, toks[:l]))[toks[l]]
    order = np.argsort(-ref, kind="stable")
    np.testing.assert_array_equal(np.asarray(res.items[u]), order)
    np.testing.assert_allclose(np.asarray(res.scores[u]), ref[order], atol=1e-4)


def test_search_tokens_with_a_callback_equals_brute_force():
  """Unconstrained search, beams = vocab over 2 steps: the exact top sequences."""
  fn, cache, axes = _toy()
  res = jax.jit(lambda first, cache: search_tokens(fn, first, cache, axes, num_beams=VOCAB,
                                                   num_steps=2))(
      jnp.asarray(FIRST, jnp.float32), cache)
  for u in range(USERS):
    first = _log_softmax(FIRST[u])
    ref = {(a, b): first[a] + _log_softmax(_logits_np(u, [a]))[b]
           for a in range(VOCAB) for b in range(VOCAB)}
    best = sorted(ref, key=lambda s: -ref[s])[:VOCAB]
    got = [tuple(int(t) for t in row) for row in np.asarray(res.sequences[u])]
    assert got == best
    np.testing.assert_allclose(np.asarray(res.scores[u]), [ref[s] for s in best], atol=1e-4)
