"""LoRA: zero-B identity, merged == on-the-fly, unmerge inverts merge, masks freeze the base;
`LoraTree` is a pytree with the leaf paths of the earlier dict tree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcrec_jax.llm import lora as lora_lib
from lcrec_jax.llm import model as model_lib
from lcrec_jax.llm.config import tiny

ALL = lora_lib.TARGETS
MERGE, UNMERGE = jax.jit(lora_lib.merge), jax.jit(lora_lib.unmerge)


def _setup(scan):
  cfg = tiny(vocab=53, initializer_range=0.1, scan_layers=scan)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  m = model_lib.Llama(cfg)
  fwd = jax.jit(lambda p, x, l: m.apply({"params": p}, x, lora=l)[0])
  base = jax.jit(lambda p, x: m.apply({"params": p}, x)[0])
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 53, (2, 7)), jnp.int32)
  return cfg, params, fwd, base, toks


def _randomise_b(lora, seed):
  """Every adapter leaf random (so B != 0), drawn on the host."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), lora)


@pytest.mark.parametrize("scan", [False, True])
def test_zero_b_is_base_and_merged_equals_unmerged(scan):
  cfg, params, fwd, base, toks = _setup(scan)
  lora = lora_lib.init_lora(jax.random.PRNGKey(1), params, cfg, rank=4, alpha=8.0, targets=ALL)
  assert lora.scale == 2.0
  ref = np.asarray(base(params, toks))
  np.testing.assert_array_equal(np.asarray(fwd(params, toks, lora)), ref)
  np.testing.assert_array_equal(np.asarray(base(MERGE(params, lora), toks)), ref)

  lora = _randomise_b(lora, 2)
  on_the_fly = np.asarray(fwd(params, toks, lora))
  merged = np.asarray(base(MERGE(params, lora), toks))
  assert np.abs(on_the_fly - ref).max() > 1e-2  # adapters do something
  np.testing.assert_allclose(on_the_fly, merged, atol=1e-5)

  back = UNMERGE(MERGE(params, lora), lora)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       atol=1e-6), params, back)


def test_merge_matches_numpy_float64():
  cfg, params, *_ = _setup(True)
  lora = _randomise_b(lora_lib.init_lora(jax.random.PRNGKey(1), params, cfg, rank=3,
                                         alpha=6.0, targets=("q_proj", "o_proj")),
                      3)
  merged = MERGE(params, lora)
  for name, flat_in in (("q_proj", cfg.hidden_size),
                        ("o_proj", cfg.num_attention_heads * cfg.head_dim)):
    w = np.asarray(params["layers"]["self_attn"][name]["kernel"], np.float64)
    ad = lora.adapters["layers"]["self_attn"][name]
    a = np.asarray(ad["lora_a"], np.float64)
    b = np.asarray(ad["lora_b"], np.float64)
    got_all = np.asarray(merged["layers"]["self_attn"][name]["kernel"])
    for layer in range(cfg.num_hidden_layers):
      want = (w[layer].reshape(flat_in, -1)
              + 2.0 * a[layer].reshape(flat_in, 3) @ b[layer].reshape(3, -1))
      got = got_all[layer].reshape(flat_in, -1)
      np.testing.assert_allclose(got, want, atol=1e-6)


def test_gradients_agree_and_mask_freezes_base():
  cfg, params, fwd, base, toks = _setup(False)
  m = model_lib.Llama(cfg)
  lora = _randomise_b(lora_lib.init_lora(jax.random.PRNGKey(1), params, cfg, rank=4,
                                         alpha=4.0, targets=("q_proj", "v_proj", "down_proj")),
                      4)

  def loss_fly(tree):
    logits = m.apply({"params": tree.params}, toks, lora=tree.lora)[0]
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 5])

  def loss_merge(tree):
    logits = m.apply({"params": lora_lib.merge(tree.params, tree.lora)}, toks)[0]
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 5])

  tree = lora_lib.LoraTree(params=params, lora=lora)
  g1 = jax.jit(jax.grad(loss_fly))(tree)
  g2 = jax.jit(jax.grad(loss_merge))(tree)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       atol=1e-5, rtol=1e-4), g1, g2)

  v0 = 40  # pretend rows >= 40 are new item-code tokens
  mask = lora_lib.trainable_mask(tree, train_embeddings_rows=True)
  assert mask.lora.adapters["layers_0"]["self_attn"]["q_proj"]["lora_a"]
  assert mask.params["embed_tokens"]["embedding"] and mask.params["lm_head"]["kernel"]
  assert not mask.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert not mask.params["norm"]["scale"]
  n = lora_lib.num_trainable(tree, mask)
  assert n == sum(x.size for x in jax.tree.leaves(lora)) + 2 * 53 * cfg.hidden_size

  opt = optax.chain(optax.masked(optax.adamw(1e-2), mask),
                    optax.masked(optax.set_to_zero(), jax.tree.map(lambda b: not b, mask)),
                    lora_lib.freeze_rows(v0))
  new = jax.jit(lambda g, t: optax.apply_updates(t, opt.update(g, opt.init(t), t)[0]))(g1, tree)
  same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))
  assert same(new.params["layers_1"]["mlp"]["down_proj"]["kernel"],
              params["layers_1"]["mlp"]["down_proj"]["kernel"])
  assert not same(new.lora.adapters["layers_1"]["mlp"]["down_proj"]["lora_b"],
                  lora.adapters["layers_1"]["mlp"]["down_proj"]["lora_b"])
  emb0, emb1 = params["embed_tokens"]["embedding"], new.params["embed_tokens"]["embedding"]
  assert same(emb0[:v0], emb1[:v0]) and not same(emb0[v0:], emb1[v0:])
  h0, h1 = params["lm_head"]["kernel"], new.params["lm_head"]["kernel"]
  assert same(h0[:, :v0], h1[:, :v0]) and not same(h0[:, v0:], h1[:, v0:])


def test_lora_tree_is_a_pytree_with_the_dict_trees_paths():
  """jit and tree.map keep the type; leaf paths are those of `{"params", "lora"}` (orbax
  stores leaves by path), so either kind of checkpoint restores into the other."""
  cfg, params, *_ = _setup(False)
  lora = lora_lib.init_lora(jax.random.PRNGKey(1), params, cfg, rank=2)
  tree = lora_lib.LoraTree(params=params, lora=lora)
  out = jax.jit(lambda t: jax.tree.map(lambda x: x * 2, t))(tree)
  assert isinstance(out, lora_lib.LoraTree) and isinstance(out.lora, lora_lib.LoraParams)
  assert out.lora.scale == lora.scale
  assert not isinstance(params, lora_lib.LoraTree)

  def names(t):
    return [tuple(getattr(k, "name", getattr(k, "key", None)) for k in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(t)]

  assert sorted(names(tree)) == sorted(names({"params": params, "lora": lora}))
  assert {n[:2] for n in names(tree)} >= {("lora", "adapters"), ("params", "embed_tokens")}


def test_errors():
  cfg, params, *_ = _setup(False)
  with pytest.raises(ValueError, match="targets"):
    lora_lib.init_lora(jax.random.PRNGKey(0), params, cfg, targets=("qkv",))
  with pytest.raises(ValueError, match="rank"):
    lora_lib.init_lora(jax.random.PRNGKey(0), params, cfg, rank=0)
