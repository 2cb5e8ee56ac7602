"""Parity of the Flax LLaMA with PyTorch `transformers` LlamaForCausalLM (float32).

A small random HF model is saved with `save_pretrained`, loaded through
`safetensors_io.load_hf_dir`, and both produce logits on the same padded batch.
All HF weights (norm scales included) are randomised so a swapped or transposed
tensor shows up.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lcrec_jax.llm import convert, model as model_lib, safetensors_io  # noqa: E402
from lcrec_jax.llm.config import LlamaConfig, tiny  # noqa: E402

TOL = 1e-4


def _hf_model(seed=0, **kw):
  """A random torch LlamaForCausalLM with non-trivial weights."""
  base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
              max_position_embeddings=256, tie_word_embeddings=False,
              attn_implementation="eager")
  base.update(kw)
  torch.manual_seed(seed)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return m


def _batch(vocab, b=3, t=12, pad="right", seed=0):
  """Tokens, mask (1 = real) and positions (count of real tokens - 1) of a padded batch."""
  rng = np.random.default_rng(seed)
  lens = np.array([t, t - 3, t - 7][:b])
  toks = rng.integers(3, vocab, size=(b, t))
  mask = np.zeros((b, t), np.int32)
  for i, n in enumerate(lens):
    if pad == "right":
      mask[i, :n] = 1
    else:
      mask[i, t - n:] = 1
  toks = np.where(mask == 1, toks, 0)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  return toks.astype(np.int32), mask, pos.astype(np.int32)


def _torch_logits(m, toks, mask, pos):
  with torch.no_grad():
    out = m(input_ids=torch.tensor(toks, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long))
  return out.logits.float().numpy()


def _check(hf_model, tmp_path, pad="right", t=12, **overrides):
  d = str(tmp_path / "hf")
  hf_model.save_pretrained(d)
  params, cfg = safetensors_io.load_hf_dir(d, **overrides)
  toks, mask, pos = _batch(cfg.vocab_size, t=t, pad=pad)
  ref = _torch_logits(hf_model, toks, mask, pos)
  fwd = jax.jit(lambda p, x, m: model_lib.Llama(cfg).apply({"params": p}, x, attention_mask=m))
  ours, _ = fwd(params, jnp.asarray(toks), jnp.asarray(mask))
  ours = np.asarray(ours)
  real = mask.astype(bool)
  err = np.abs(ours[real] - ref[real]).max()
  assert err <= TOL, f"max abs logit diff {err}"
  assert np.abs(ref[real]).max() > 1.0  # the comparison is not vacuous
  return params, cfg


@pytest.mark.slow
@pytest.mark.parametrize("pad", ["right", "left"])
def test_mha_untied_padded(tmp_path, pad):
  _check(_hf_model(0), tmp_path, pad=pad)


@pytest.mark.slow
def test_gqa_scanned_remat(tmp_path):
  _check(_hf_model(1, num_key_value_heads=2), tmp_path, pad="left",
         scan_layers=True, remat_policy="full")


@pytest.mark.slow
def test_tied_embeddings_and_head_dim(tmp_path):
  m = _hf_model(2, tie_word_embeddings=True, num_key_value_heads=1, head_dim=16)
  params, cfg = _check(m, tmp_path)
  assert cfg.tie_word_embeddings and "lm_head" not in params
  assert cfg.head_dim == 16


@pytest.mark.slow
def test_llama3_rope_scaling(tmp_path):
  rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
  m = _hf_model(3, num_key_value_heads=2, rope_parameters=rope)
  _, cfg = _check(m, tmp_path, t=40)
  assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3"
  # The scaling really changes the frequencies (else the test proves nothing).
  plain = model_lib.rope_inv_freq(cfg.replace(rope_scaling=None))
  assert not np.allclose(plain, model_lib.rope_inv_freq(cfg))


def test_return_hidden_and_logits_method(tmp_path):
  cfg = tiny(vocab=50)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  m = model_lib.Llama(cfg)
  toks = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
  logits, _ = jax.jit(m.apply)({"params": params}, toks)
  hidden, _ = jax.jit(lambda v, x: m.apply(v, x, return_hidden=True))({"params": params}, toks)
  assert hidden.shape == (2, 5, cfg.hidden_size)
  again = jax.jit(lambda v, h: m.apply(v, h, method=model_lib.Llama.logits))(
      {"params": params}, hidden[:, 2])
  np.testing.assert_allclose(np.asarray(again), np.asarray(logits[:, 2]), atol=1e-6)


def test_convert_round_trip_and_errors():
  for scan in (False, True):
    cfg = tiny(vocab=40, scan_layers=scan)
    params = model_lib.init_params(cfg, jax.random.PRNGKey(1))
    sd = convert.hf_from_params(params, cfg)
    back = convert.params_from_hf(sd, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)
  sd2 = dict(sd)
  del sd2["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
    convert.params_from_hf(sd2, cfg)
  sd3 = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((5, 64), np.float32)})
  with pytest.raises(ValueError, match="k_proj"):
    convert.params_from_hf(sd3, cfg)
  sd4 = dict(sd, **{"model.layers.2.mlp.up_proj.weight": sd["model.layers.1.mlp.up_proj.weight"]})
  with pytest.raises(KeyError, match="unexpected"):
    convert.params_from_hf(sd4, cfg)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    safetensors_io.load_hf_dir(str(tmp_path))
  d = tmp_path / "m"
  d.mkdir()
  cfg = tiny(vocab=40)
  hf = dict(cfg.to_hf_dict(), model_type="mistral")
  (d / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match="model_type"):
    safetensors_io.load_hf_dir(str(d))
  (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    safetensors_io.load_hf_dir(str(d))
  # Weights for a different width: shape error names file and key.
  other = tiny(vocab=40, hidden=32, heads=2, kv_heads=1)
  safetensors_io.save_hf_dir(model_lib.init_params(other, jax.random.PRNGKey(0)), other, str(d))
  (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
  with pytest.raises(ValueError, match="model.embed_tokens.weight"):
    safetensors_io.load_hf_dir(str(d))


def test_sharded_dir_into_shardings(tmp_path):
  """Sharded files + index json, loaded straight into a device mesh."""
  from jax.sharding import Mesh, PartitionSpec as P
  import flax.linen as nn
  cfg = tiny(vocab=64, scan_layers=True, layers=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(2))
  d = str(tmp_path / "sh")
  files = safetensors_io.save_hf_dir(params, cfg, d, max_shard_bytes=40_000)
  assert os.path.exists(os.path.join(d, safetensors_io.INDEX_FILE))
  assert sum(f.endswith(".safetensors") for f in files) > 2
  devs = np.array(jax.devices()[:4]).reshape(2, 2)
  mesh = Mesh(devs, ("fsdp", "tensor"))
  rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
           ("vocab", "tensor"), ("layers", None), ("norm", None), ("head_dim", None))
  shardings = nn.logical_to_mesh_sharding(model_lib.logical_axes(cfg), mesh, rules)
  loaded, cfg2 = safetensors_io.load_hf_dir(d, shardings=shardings, scan_layers=True)
  assert cfg2 == cfg
  q = loaded["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, loaded)


def test_config_json_round_trip():
  from lcrec_jax.llm import config as cfg_lib
  for c in (cfg_lib.llama2_7b(), cfg_lib.llama3_2_1b(), cfg_lib.smollm2_135m()):
    assert LlamaConfig.from_hf_dict(c.to_hf_dict()) == c
    hf = transformers.LlamaConfig(**{k: v for k, v in c.to_hf_dict().items()
                                     if k not in ("architectures", "model_type")})
    assert LlamaConfig.from_hf_dict(hf.to_dict()) == c
  with pytest.raises(ValueError, match="num_key_value_heads"):
    LlamaConfig(num_attention_heads=6, num_key_value_heads=4, hidden_size=48)
  with pytest.raises(ValueError, match="remat_policy"):
    tiny(remat_policy="bogus")
