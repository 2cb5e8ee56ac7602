"""The trained byte-level BPE (model.tokenizer = "trained") and its place in build."""

from __future__ import annotations

import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm import bpe, build
from lcrec_jax.tasks import batching

TITLES = ["Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Copycat", "Twelve Monkeys",
          "Babe", "Dead Man Walking", "Richard III", "Seven", "Usual Suspects, The"]


def corpus():
  rng = np.random.default_rng(0)
  out = []
  for n in range(300):
    hist = ", ".join(f"<a_{rng.integers(8)}><b_{rng.integers(8)}>" for _ in range(5))
    title = TITLES[n % len(TITLES)]
    out.append(batching.format_prompt(
        f"The user watched {hist} in order. Which movie comes next?") + f'"{title}"')
  return out


@pytest.fixture(scope="module")
def index():
  codes = np.array([[a, b] for a in range(8) for b in range(8)], np.int32)
  return ItemIndex(tuple(str(i) for i in range(64)), codes, (8, 8))


def test_training_is_deterministic_and_compact(index):
  texts = corpus()
  a, b = bpe.train_bpe(texts, 400), bpe.train_bpe(texts, 400)
  assert a.tokenizer.to_str() == b.tokenizer.to_str()
  assert a.vocab_size == 400 and a.bos_id is None and a.eos_id == 0 and a.pad_id == 1
  # The frame is learned: it takes a handful of tokens, not one per byte.
  head = a.encode(batching.PROMPT_HEAD, add_special_tokens=False)
  assert len(head) < len(batching.PROMPT_HEAD.encode()) / 3


def test_codes_are_single_ids_and_any_text_round_trips(index):
  tok = bpe.train_bpe(corpus(), 400)
  ids = tok.add_code_tokens(index.all_tokens())
  assert ids == list(range(400, 400 + 16))
  for text in ["<a_3><b_7>", "x <a_3>, <b_0>", "\n<a_1>", "Amélie (2001) <b_2>"]:
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc) == text  # byte-level: unseen characters still encode
    for code in ("<a_3>", "<b_7>", "<b_0>", "<a_1>", "<b_2>"):
      if code in text:
        assert tok.token_to_id(code) in enc


def test_too_small_vocab_is_an_error():
  with pytest.raises(ValueError, match="tokenizer_vocab"):
    bpe.train_bpe(["abc"], 100)


def _mc(**kw):
  mc = spec.section("model")  # the spec's defaults (dtypes, no LoRA, ...)
  mc.update(dict(init="random", preset="tiny", tokenizer="trained", tokenizer_vocab=400))
  mc.update(kw)
  return mc


def test_build_saves_then_reuses_the_trained_tokenizer(index, tmp_path):
  tdir = str(tmp_path / "tokenizer")
  _, params, tok = build.build_model(_mc(), index, 0, corpus=corpus, tokenizer_dir=tdir)
  assert tok.vocab_size == 416
  assert params["embed_tokens"]["embedding"].shape[0] == 416
  # A resumed run loads the saved file and never retrains (no corpus given).
  again = build.load_tokenizer(_mc(), corpus=None, tokenizer_dir=tdir)
  again.add_code_tokens(index.all_tokens())
  text = corpus()[5]
  assert again.encode(text) == tok.encode(text)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


def test_trained_tokenizer_needs_random_init(index):
  with pytest.raises(ValueError, match="model.init='random'"):
    build.load_tokenizer(_mc(init="pretrained"), corpus=corpus)
  with pytest.raises(ValueError, match="model.tokenizer"):
    build.load_tokenizer(_mc(tokenizer="mine"))
