"""Item text budget (tasks.text_budget): long descriptions are cut before prompts are built,
so every example of every task fits the quick recipe's largest bucket."""

import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.data import synthetic
from lcrec_jax.data.loaders import load_dataset
from lcrec_jax.errors import ConfigError
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm import build
from lcrec_jax.llm.bpe import train_bpe
from lcrec_jax.llm.tokenizer import LCRecTokenizer
from lcrec_jax.recipes import sibling
from lcrec_jax.tasks import batching, builders, text_budget

QUICK = sibling(__file__, "../configs/ml100k_quick.py").get_config()
BUDGET = text_budget.TextBudget.from_config(QUICK.tasks.text_budget)


def test_cut_text_bytes_words_and_utf8():
  text = "alpha beta gamma delta epsilon"
  assert text_budget.cut_text(text, 0) == text
  assert text_budget.cut_text(text, 100) == text
  assert text_budget.cut_text(text, 17) == "alpha beta gamma"  # at a word boundary
  assert text_budget.cut_text("x" * 50, 10) == "x" * 10      # one long word: inside it
  cut = text_budget.cut_text("é" * 20, 9)                     # 2 bytes per character
  assert cut == "é" * 4 and len(cut.encode()) <= 9
  for n in range(1, 40):
    assert len(text_budget.cut_text("naïve café, über straße " * 3, n).encode()) <= n


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError, match=r"tasks.text_budget has unknown field.*'titel'"):
    text_budget.TextBudget.from_config({"titel": 3})
  with pytest.raises(ConfigError, match=r"tasks.text_budget.description=-1"):
    text_budget.TextBudget.from_config({"description": -1})
  assert not text_budget.TextBudget.from_config(None)


def test_quick_budget_leaves_movielens_alone():
  """The recipe's budget cuts nothing on ML-100K, so its measured results stand."""
  ds = load_dataset(QUICK.data)
  out, cut = text_budget.apply_text_budget(ds, BUDGET)
  assert out is ds and cut == {"title": 0, "description": 0, "other": 0}


@pytest.fixture(scope="module")
def long_text(tmp_path_factory):
  """Descriptions of 3,000 characters on average (up to ~4x that), 40 users."""
  out = str(tmp_path_factory.mktemp("long"))
  synthetic.write(synthetic.SyntheticSpec(users=40, items=60, interactions=400,
                                          text_chars=3000, seed=1), out, "Long")
  ds = load_dataset(spec.section_settings("data", {"format": "lcrec", "path": out, "name": "Long"}))
  rng = np.random.default_rng(0)
  codes = np.stack([rng.permutation(256)[:ds.num_items] for _ in range(4)], 1)
  index = ItemIndex(tuple(it.item_id for it in ds.items), codes.astype(np.int32), (256,) * 4)
  return ds, index


def _examples(ds, index, budget):
  return builders.build_train_examples(ds, index, QUICK.tasks.names, seed=0,
                                       max_history=QUICK.tasks.max_history, text_budget=budget)


def test_every_example_fits_the_largest_bucket(long_text, caplog):
  ds, index = long_text
  buckets = tuple(QUICK.tasks.buckets)
  uncut = _examples(ds, index, None)
  with caplog.at_level("INFO"):
    cut = _examples(ds, index, BUDGET)
  assert f"cut 0 titles to 96, {ds.num_items} descriptions to 224" in caplog.text
  assert len(cut) == len(uncut)
  trained = train_bpe([batching.format_prompt(e.instruction) + e.response for e in cut],
                      QUICK.model.tokenizer_vocab)
  smollm2 = LCRecTokenizer.from_gguf(build.default_gguf_path())
  for tok in (trained, smollm2):
    before = batching.tokenize_examples(uncut, tok, buckets)
    assert before.num_skipped > 0  # whole descriptions as responses do not fit 384 tokens
    after = batching.tokenize_examples(cut, tok, buckets)
    assert after.num_skipped == 0 and len(after) == len(cut)
    assert int(after.lengths.max()) <= buckets[-1]
    # the budget is a bound on tokens: no response is longer than its text's bytes + EOS
    for ex, resp in zip(cut, after.responses):
      assert len(resp) <= len(ex.response.encode()) + 1
    index2item = [len(r) for r, t in zip(after.responses, after.tasks) if t == "index2item"]
    assert max(index2item) <= BUDGET.title + 1 + BUDGET.description + 1
