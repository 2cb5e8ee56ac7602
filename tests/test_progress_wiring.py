"""Long phases report through lcrec_jax.progress when stderr is not a terminal (as under
pytest): MiniLM encoding, the task build, tokenisation and evaluation's user loop each log
'done/total' lines (LCREC_PROGRESS_S=0: a line at every update)."""

import re

import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax import progress
from lcrec_jax.data import synthetic
from lcrec_jax.data.loaders import load_dataset
from lcrec_jax.encoders import minilm
from lcrec_jax.eval import evaluate as ev
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm.bpe import train_bpe
from lcrec_jax.tasks import batching, builders, prompts
from lcrec_jax.tasks.builders import seqrec_eval_examples
from tests.test_evaluate import setup  # noqa: F401  (the tiny model fixture)


@pytest.fixture
def lines(monkeypatch):
  monkeypatch.setenv("LCREC_PROGRESS_S", "0")
  out = []
  monkeypatch.setattr(progress.logging, "info", lambda fmt, *a: out.append(fmt % a))
  assert not progress.stderr_is_terminal()
  return out


def _last(lines, desc):
  mine = [l for l in lines if l.startswith(desc + ":")]
  assert mine, (desc, lines[:5])
  return mine[-1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synth"))
  synthetic.write(synthetic.SyntheticSpec(users=30, items=40, interactions=300,
                                          text_chars=120), out, "S")
  ds = load_dataset(spec.section_settings("data", {"format": "lcrec", "path": out, "name": "S"}))
  rng = np.random.default_rng(0)
  codes = np.stack([rng.permutation(64)[:ds.num_items] for _ in range(3)], 1)
  return ds, ItemIndex(tuple(it.item_id for it in ds.items), codes.astype(np.int32), (64,) * 3)


def test_task_build_and_tokenisation_report(synth, lines):
  ds, index = synth
  ex = builders.build_train_examples(ds, index, prompts.TASK_NAMES, show_progress=True)
  assert re.match(r"task build: 6/6 tasks \(100%\), .* elapsed, .*task preferenceobtain, "
                  rf"examples {len(ex)}$", _last(lines, "task build"))
  tok = train_bpe([e.instruction + e.response for e in ex], 400)
  batching.tokenize_examples(ex, tok, (512,), show_progress=True)
  assert _last(lines, "tokenize prompts").startswith(f"tokenize prompts: {len(ex)}/{len(ex)} "
                                                     "texts (100%)")
  assert _last(lines, "tokenize responses").startswith(f"tokenize responses: {len(ex)}/")
  n = len(lines)
  builders.build_train_examples(ds, index, prompts.TASK_NAMES)  # show_progress=False
  assert len(lines) == n


def test_minilm_reports_texts(synth, lines):
  ds, _ = synth
  texts = ds.item_texts()[:10]
  minilm.shared_encoder().encode(texts, batch_size=4, max_length=16)
  assert _last(lines, "MiniLM item text").startswith("MiniLM item text: 10/10 texts (100%)")
  n = len(lines)
  minilm.shared_encoder().encode(texts, batch_size=4, max_length=16, progress=False)
  assert len(lines) == n


def test_eval_reports_users(setup, lines):  # noqa: F811
  dataset, index, tok, model, params, tasks = setup
  dec = ev.Decoder(model, tok, index, tasks.buckets)
  exs = seqrec_eval_examples(dataset, index, "test", 0, 20)
  ids = [ev.eval_prompt_ids(tok, e.instruction, tasks, index.num_levels) for e in exs]
  ids = [i for i in ids if dec.bucket_of(len(i)) == dec.buckets[-1]]  # one compile
  assert len(ids) >= 3
  dec.rank(params, ids, num_beams=2, mode="trie", batch_size=2, progress=True,
           desc="eval test")
  users = [l for l in lines if l.startswith("eval test:")]
  assert users[-1].startswith(f"eval test: {len(ids)}/{len(ids)} users (100%)")
  assert len(users) >= 2  # one line per batch of 2 at LCREC_PROGRESS_S=0
