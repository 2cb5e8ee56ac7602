"""KV cache: prefill + cached one-token steps reproduce a full forward (float32, 1e-5);
typed per-layer views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcrec_jax.llm import model as model_lib
from lcrec_jax.llm.config import tiny
from lcrec_jax.llm.kv_cache import (BeamLayerKV, LayerKV, init_cache, reorder_beam_kv,
                                    reorder_cache, split_beam_cache)

TOL = 1e-5
T_PROMPT, N_STEPS = 6, 4


def _setup(scan):
  cfg = tiny(vocab=61, layers=2, heads=4, kv_heads=2, initializer_range=0.1, scan_layers=scan)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(3))
  m = model_lib.Llama(cfg)
  full = jax.jit(lambda p, x, msk: m.apply({"params": p}, x, attention_mask=msk)[0])
  step = jax.jit(lambda p, x, msk, c: m.apply({"params": p}, x, attention_mask=msk, cache=c))
  return cfg, params, full, step


def _prompts(pad, vocab, b=3):
  rng = np.random.default_rng(0)
  lens = [T_PROMPT, 4, 1][:b]
  toks = rng.integers(3, vocab, (b, T_PROMPT)).astype(np.int32)
  mask = np.zeros((b, T_PROMPT), np.int32)
  for i, n in enumerate(lens):
    if pad == "right":
      mask[i, :n] = 1
    else:
      mask[i, T_PROMPT - n:] = 1
  return np.where(mask == 1, toks, 0), mask


@pytest.mark.parametrize("pad,scan", [("right", False), ("left", False), ("left", True)])
def test_prefill_plus_steps_equals_full_forward(pad, scan):
  cfg, params, full, step = _setup(scan)
  toks, mask = _prompts(pad, cfg.vocab_size)
  b = toks.shape[0]
  gen = np.random.default_rng(1).integers(3, cfg.vocab_size, (b, N_STEPS)).astype(np.int32)

  cache = init_cache(cfg, b, T_PROMPT + N_STEPS + 2)
  logits_p, cache = step(params, toks, mask, cache)
  step_logits = []
  for j in range(N_STEPS):
    lj, cache = step(params, gen[:, j:j + 1], np.ones((b, 1), np.int32), cache)
    step_logits.append(np.asarray(lj[:, 0]))
  assert int(cache.index) == T_PROMPT + N_STEPS
  np.testing.assert_array_equal(np.asarray(cache.next_pos), mask.sum(1) + N_STEPS)

  all_toks = np.concatenate([toks, gen], 1)
  all_mask = np.concatenate([mask, np.ones_like(gen)], 1)
  ref = np.asarray(full(params, all_toks, all_mask))
  real = mask.astype(bool)
  err_p = np.abs(np.asarray(logits_p)[real] - ref[:, :T_PROMPT][real]).max()
  err_s = np.abs(np.stack(step_logits, 1) - ref[:, T_PROMPT:]).max()
  assert err_p <= TOL and err_s <= TOL, (err_p, err_s)
  assert np.abs(ref).max() > 0.5


def test_padding_is_invisible():
  """A row's logits do not depend on how much padding surrounds it."""
  cfg, params, full, step = _setup(False)
  toks, mask = _prompts("left", cfg.vocab_size)
  r = np.asarray(full(params, toks, mask))
  n = int(mask[1].sum())
  alone = np.asarray(full(params, toks[1:2, -n:], mask[1:2, -n:]))
  np.testing.assert_allclose(r[1, -n:], alone[0], atol=TOL)


def test_chunked_prefill_and_reorder():
  cfg, params, full, step = _setup(True)
  toks, mask = _prompts("right", cfg.vocab_size)
  b = toks.shape[0]
  # Prefill in two chunks equals one chunk.
  c1 = init_cache(cfg, b, 12)
  _, c1 = step(params, toks, mask, c1)
  c2 = init_cache(cfg, b, 12)
  _, c2 = step(params, toks[:, :2], mask[:, :2], c2)
  _, c2 = step(params, toks[:, 2:], mask[:, 2:], c2)
  np.testing.assert_array_equal(np.asarray(c1.mask), np.asarray(c2.mask))
  np.testing.assert_array_equal(np.asarray(c1.next_pos), np.asarray(c2.next_pos))
  valid = np.asarray(c1.mask)  # pad slots hold junk that no query attends to
  for a, bb in ((c1.k, c2.k), (c1.v, c2.v)):
    np.testing.assert_allclose(np.asarray(a)[:, valid], np.asarray(bb)[:, valid], atol=TOL)
  # Reorder (and grow the batch, as a beam search does): row i of the new cache is
  # row idx[i] of the old one, then one step equals a full forward of those rows.
  idx = np.array([2, 0, 0, 1, 2])
  c3 = reorder_cache(c1, jnp.asarray(idx))
  nxt = np.arange(5, dtype=np.int32)[:, None] + 7
  l3, c3 = step(params, nxt, np.ones((5, 1), np.int32), c3)
  assert c3.k.shape[1] == 5
  ref = np.asarray(full(params, np.concatenate([toks[idx], nxt], 1),
                        np.concatenate([mask[idx], np.ones((5, 1), np.int32)], 1)))
  np.testing.assert_allclose(np.asarray(l3[:, 0]), ref[:, -1], atol=TOL)


def test_decode_loop_under_jit():
  """Greedy decoding inside lax.fori_loop with static shapes equals step-by-step calls."""
  cfg, params, full, step = _setup(True)
  m = model_lib.Llama(cfg)
  toks, mask = _prompts("left", cfg.vocab_size)
  b = toks.shape[0]

  @jax.jit
  def greedy(p, toks, mask):
    cache = init_cache(cfg, b, T_PROMPT + N_STEPS)
    logits, cache = m.apply({"params": p}, toks, attention_mask=mask, cache=cache)
    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    out = jnp.zeros((b, N_STEPS), jnp.int32).at[:, 0].set(first)

    def body(j, carry):
      out, cache = carry
      prev = jax.lax.dynamic_slice_in_dim(out, j - 1, 1, axis=1)
      lg, cache = m.apply({"params": p}, prev, cache=cache)
      return out.at[:, j].set(jnp.argmax(lg[:, 0], -1).astype(jnp.int32)), cache

    out, _ = jax.lax.fori_loop(1, N_STEPS, body, (out, cache))
    return out

  out = np.asarray(greedy(params, toks, mask))
  # Reference: greedy by repeated full forwards.
  seq, msk = toks, mask
  for j in range(N_STEPS):
    nxt = np.asarray(full(params, seq, msk))[:, -1].argmax(-1).astype(np.int32)
    assert (nxt == out[:, j]).all()
    seq = np.concatenate([seq, nxt[:, None]], 1)
    msk = np.concatenate([msk, np.ones((b, 1), np.int32)], 1)


@pytest.mark.parametrize("scan", [False, True])
def test_split_beam_cache_steps_equal_full_forward(scan):
  """Prompt once per user + per-beam slots, with beam reorders, equals full forwards."""
  cfg, params, full, step = _setup(scan)
  toks, mask = _prompts("left", cfg.vocab_size)       # 3 users, 6 / 4 / 1 real tokens
  b, w = toks.shape[0], 3
  cache = init_cache(cfg, b, T_PROMPT)
  _, cache = step(params, toks, mask, cache)
  cache = split_beam_cache(cache, w, N_STEPS)
  assert cache.k.shape[1] == b * w and cache.prompt_k.shape[1] == b and cache.num_beams == w
  rng = np.random.default_rng(2)
  seqs = np.zeros((b * w, 0), np.int32)                 # each beam row's fed tokens so far
  for j in range(N_STEPS):
    nxt = rng.integers(3, cfg.vocab_size, (b * w, 1)).astype(np.int32)
    lj, cache = step(params, nxt, np.ones((b * w, 1), np.int32), cache)
    seqs = np.concatenate([seqs, nxt], 1)
    user = np.repeat(np.arange(b), w)
    ref = np.asarray(full(params, np.concatenate([toks[user], seqs], 1),
                          np.concatenate([mask[user], np.ones_like(seqs)], 1)))
    np.testing.assert_allclose(np.asarray(lj[:, 0]), ref[:, -1], atol=TOL)
    # Reorder within each user's beams (a permutation with repeats), as a beam search does.
    parents = rng.integers(0, w, (b, w)) + np.arange(b)[:, None] * w
    cache = reorder_beam_kv(cache, jnp.asarray(parents.reshape(-1)))
    seqs = seqs[parents.reshape(-1)]
  assert int(cache.index) == N_STEPS
  np.testing.assert_array_equal(np.asarray(cache.next_pos), np.repeat(mask.sum(1), w) + N_STEPS)


def test_layer_views_are_typed():
  """Each layout hands its layers a NamedTuple of its own; a bare tuple is refused."""
  cfg = tiny(vocab=61, layers=2, heads=4, kv_heads=2)
  cache = init_cache(cfg, 2, 5)
  view = cache.layers()
  assert type(view) is LayerKV and view.k is cache.k and view.v is cache.v
  beam = split_beam_cache(cache, 3, 4).layers()
  assert type(beam) is BeamLayerKV and beam.k.shape[1] == 6 and beam.prompt_k.shape[1] == 2
  layer = jax.tree.map(lambda a: a[0], beam)  # what an unscanned layer gets
  assert type(layer) is BeamLayerKV and layer.k.shape == (6, 4, 2, cfg.head_dim)
  attn = model_lib.Attention(cfg)
  x = jnp.zeros((2, 1, cfg.hidden_size))
  ctx = dict(cos=jnp.ones((2, 1, cfg.head_dim)), sin=jnp.zeros((2, 1, cfg.head_dim)),
             allowed=jnp.ones((2, 1, 5), bool), index=jnp.zeros((), jnp.int32),
             lora_scale=jnp.zeros(()))
  v = attn.init(jax.random.PRNGKey(0), x, ctx, LayerKV(cache.k[0], cache.v[0]), None)
  _, new = attn.apply(v, x, ctx, LayerKV(cache.k[0], cache.v[0]), None)
  assert type(new) is LayerKV
  with pytest.raises(TypeError, match="LayerKV"):
    attn.apply(v, x, ctx, (cache.k[0], cache.v[0]), None)
