"""Flax MiniLM item encoder: parity with PyTorch transformers, bucketing, cache, npy input."""

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest

from lcrec_jax.encoders import item_embeddings as ie
from lcrec_jax.encoders import minilm
from lcrec_jax.encoders.bert import BertConfig

# Real MovieLens-100K items in the shape the loaders produce, plus edge cases: a one-word
# title, an empty text, non-ASCII, and a long text that max_length=16 truncates.
TEXTS = [
    "Toy Story. year: 1995. genres: Animation, Children's, Comedy",
    "GoldenEye",
    "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb. year: 1963. "
    "genres: Sci-Fi, War",
    "",
    "Belle de jour. year: 1967. genres: Drama",
    "Türkisch für Anfänger — a café in Zürich",
    "Wallace & Gromit: The Best of Aardman Animation. year: 1996. genres: Animation",
]


@pytest.fixture(scope="module")
def model_dir():
  return minilm.default_model_dir()


@pytest.fixture(scope="module")
def encoder(model_dir):
  return minilm.shared_encoder(model_dir)  # the instance item_embeddings reuses


@pytest.fixture(scope="module")
def torch_ref(model_dir):
  """PyTorch transformers BertModel + tokenizer on the same files."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True).eval()

  def run(texts, max_length):
    batch = tok(list(texts), padding=True, truncation=True, max_length=max_length,
                return_tensors="pt")
    with torch.no_grad():
      hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(mean, p=2, dim=-1)
    return batch["input_ids"].numpy(), hidden.numpy(), emb.numpy()

  return run


@pytest.mark.slow
@pytest.mark.parametrize("max_length", [128, 16])
def test_parity_with_transformers(encoder, torch_ref, max_length):
  ref_ids, ref_hidden, ref_emb = torch_ref(TEXTS, max_length)
  # Same tokens (including [CLS]/[SEP], truncation).
  ids, _ = encoder.tokenize(TEXTS, max_length)
  for i, row in enumerate(ids):
    np.testing.assert_array_equal(row, ref_ids[i, :len(row)], err_msg=f"text {i}")
    assert (ref_ids[i, len(row):] == 0).all()
  if max_length == 16:
    assert max(len(r) for r in ids) == 16  # truncation really happened
  # Last hidden state on real tokens.
  hidden, mask = encoder.hidden_states(TEXTS, max_length)
  assert hidden.shape == ref_hidden.shape
  real = mask.astype(bool)
  assert np.abs(hidden - ref_hidden)[real].max() <= 1e-4
  # Pooled, normalised sentence embeddings through the bucketed encode path.
  emb = encoder.encode(TEXTS, batch_size=4, max_length=max_length, progress=False)
  assert emb.shape == (len(TEXTS), 384) and emb.dtype == np.float32
  assert np.abs(emb - ref_emb).max() <= 1e-4
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_padding_bucketing_and_order_do_not_change_embeddings(encoder):
  alone = encoder.encode([TEXTS[1]], progress=False)  # [1, 8] shape
  long_text = " ".join(["a very long movie title"] * 8)  # 42 tokens -> bucket 64
  mixed = encoder.encode([long_text, TEXTS[1], TEXTS[0]], progress=False)
  assert np.abs(mixed[1] - alone[0]).max() <= 1e-5
  # Order restored after the length sort, and batch size does not matter.
  full = encoder.encode(TEXTS, batch_size=64, progress=False)
  perm = np.random.default_rng(0).permutation(len(TEXTS))
  shuffled = encoder.encode([TEXTS[i] for i in perm], batch_size=4, progress=False)
  assert np.abs(shuffled - full[perm]).max() <= 1e-5
  # Different texts really give different rows (not a broadcast of one row).
  assert np.abs(full[0] - full[1]).max() > 1e-2


def test_encode_empty_and_bad_input(encoder):
  assert encoder.encode([], progress=False).shape == (0, 384)
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    encoder.encode(["ok", None], progress=False)
  with pytest.raises(ValueError, match="max_length"):
    encoder.encode(["ok"], max_length=1000, progress=False)


def test_mean_pool_normalize_matches_float64_numpy():
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.int32)
  got = np.asarray(minilm.mean_pool_normalize(hidden, mask))
  h = hidden.astype(np.float64)
  for b in range(2):
    m = h[b][mask[b] == 1].mean(0)
    np.testing.assert_allclose(got[b], m / np.linalg.norm(m), atol=1e-6)
  np.testing.assert_array_equal(got[2], 0.0)  # no NaN for an all-padding row


def test_bucket_length():
  assert [minilm.bucket_length(n, 128) for n in (1, 8, 9, 33, 128, 200)] == [
      8, 8, 16, 64, 128, 128]
  assert minilm.bucket_length(100, 100) == 100


def test_weight_loading_errors(model_dir, tmp_path):
  weights = os.path.join(model_dir, minilm.WEIGHTS_FILE)
  cfg = BertConfig.from_json(os.path.join(model_dir, minilm.CONFIG_FILE))
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    minilm.load_bert_params(str(tmp_path / "nope.safetensors"), cfg)
  with pytest.raises(ValueError, match=r"missing tensor 'encoder.layer.6"):
    minilm.load_bert_params(weights, dataclasses.replace(cfg, num_hidden_layers=7))
  with pytest.raises(ValueError, match=r"unexpected tensors \['encoder.layer.5"):
    minilm.load_bert_params(weights, dataclasses.replace(cfg, num_hidden_layers=5))
  with pytest.raises(ValueError, match=r"word_embeddings.weight' has shape \(30522, 384\)"):
    minilm.load_bert_params(weights, dataclasses.replace(cfg, vocab_size=30000))
  with pytest.raises(FileNotFoundError, match="lacks config.json"):
    minilm.resolve_model_dir(str(tmp_path))
  bad = tmp_path / "config.json"
  bad.write_text(json.dumps({"model_type": "bert", "hidden_act": "swish"}))
  with pytest.raises(ValueError, match="hidden_act"):
    BertConfig.from_json(str(bad))


def _embed_cfg(**kw):
  cfg = {"encoder": "minilm", "model_dir": "", "npy_path": "", "batch_size": 64,
         "max_length": 32}
  cfg.update(kw)
  return cfg


def test_cache_hit_and_miss(tmp_path):
  texts = TEXTS[:3]
  cache = str(tmp_path / "cache")
  first = ie.item_embeddings(_embed_cfg(), texts, cache)
  files = os.listdir(cache)
  assert len(files) == 1 and files[0].endswith(".npy")
  path = os.path.join(cache, files[0])
  np.testing.assert_array_equal(np.load(path), first)
  # A hit reads the file: plant a sentinel and get it back bit for bit.
  sentinel = np.arange(first.size, dtype=np.float32).reshape(first.shape)
  np.save(path, sentinel)
  np.testing.assert_array_equal(ie.item_embeddings(_embed_cfg(), texts, cache), sentinel)
  # A changed text, or a changed max_length, misses and writes a new entry.
  changed = ie.item_embeddings(_embed_cfg(), [texts[0], texts[1] + "!", texts[2]], cache)
  assert len(os.listdir(cache)) == 2
  assert np.abs(changed[0] - first[0]).max() <= 1e-5
  ie.item_embeddings(_embed_cfg(max_length=16), texts, cache)
  assert len(os.listdir(cache)) == 3
  assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]


def test_cache_key_properties():
  fp = "f" * 64
  base = ie.cache_key(["ab", "c"], fp, 128)
  assert base == ie.cache_key(["ab", "c"], fp, 128)
  assert base != ie.cache_key(["a", "bc"], fp, 128)
  assert base != ie.cache_key(["ab", "c"], "e" * 64, 128)
  assert base != ie.cache_key(["ab", "c"], fp, 64)


def test_npy_encoder(tmp_path):
  good = np.random.default_rng(0).normal(size=(3, 8))
  path = tmp_path / "emb.npy"
  np.save(path, good)
  out = ie.item_embeddings(_embed_cfg(encoder="npy", npy_path=str(path)), ["a", "b", "c"],
                           str(tmp_path))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, good, rtol=1e-6)
  with pytest.raises(ValueError, match=r"emb.npy: 3 rows but the dataset has 4 items"):
    ie.item_embeddings(_embed_cfg(encoder="npy", npy_path=str(path)), list("abcd"), None)
  with pytest.raises(FileNotFoundError, match="missing.npy"):
    ie.item_embeddings(_embed_cfg(encoder="npy", npy_path=str(tmp_path / "missing.npy")),
                       ["a"], None)
  with pytest.raises(ValueError, match="needs embed.npy_path"):
    ie.item_embeddings(_embed_cfg(encoder="npy"), ["a"], None)
  flat = tmp_path / "flat.npy"
  np.save(flat, np.zeros(3))
  with pytest.raises(ValueError, match=r"flat.npy: expected \[num_items, dim\]"):
    ie.item_embeddings(_embed_cfg(encoder="npy", npy_path=str(flat)), list("abc"), None)
  nan = tmp_path / "nan.npy"
  bad = good.copy()
  bad[1, 2] = np.nan
  np.save(nan, bad)
  with pytest.raises(ValueError, match="first row 1"):
    ie.item_embeddings(_embed_cfg(encoder="npy", npy_path=str(nan)), list("abc"), None)
  # The real config section works as cfg.
  spec = importlib.util.spec_from_file_location(
      "ml100k_quick", os.path.join(os.path.dirname(__file__), "..", "configs", "ml100k_quick.py"))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  embed_cfg = recipe.get_config().embed
  embed_cfg.encoder, embed_cfg.npy_path = "npy", str(path)
  np.testing.assert_allclose(ie.item_embeddings(embed_cfg, list("abc"), None), good, rtol=1e-6)
  with pytest.raises(ValueError, match="embed.encoder='bert'"):
    ie.item_embeddings(_embed_cfg(encoder="bert"), ["a"], None)
