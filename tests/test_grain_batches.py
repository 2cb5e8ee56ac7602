"""Grain over the array_record examples: the in-memory batcher's batches, bit for bit.

Covers example_records (write, reuse, reopen without the examples) and grain_batches
(identity with batching.Batcher over seeds/epochs/history loss/fillers, per-process rows,
resume at any step, the train stage's examples directory, and a trainer crash + resume
fed by grain).
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from lcrec_jax.pipeline import workdir as workdir_lib
from lcrec_jax.tasks import batching, example_records, grain_batches
from lcrec_jax.tasks.builders import Example

BUCKETS = (24, 32, 48)
CODE = re.compile(r"<([a-c])_(\d)>")


class WordTokenizer:
  """Word-level toy tokenizer, ids < 256: code tokens 200-223, other words 3-199."""

  eos_id, pad_id = 1, 0

  def encode(self, text: str) -> list[int]:
    ids = []
    for w in re.findall(r"<[a-c]_\d>|[^\s<]+", text):
      m = CODE.fullmatch(w)
      ids.append(200 + 8 * "abc".index(m[1]) + int(m[2]) if m else
                 3 + sum(w.encode()) % 197)
    return ids


CODE_IDS = np.arange(200, 224)


def _examples(n: int = 61, seed: int = 0) -> list[Example]:
  rng = np.random.default_rng(seed)
  out = []
  for k in range(n):
    task = ("seqrec", "item2index", "itemsearch")[k % 3]
    hist = " ".join(f"<a_{rng.integers(8)}><b_{rng.integers(8)}>" for _ in range(rng.integers(1, 9)))
    words = " ".join(f"w{rng.integers(50)}" for _ in range(rng.integers(0, 12)))
    out.append(Example(task, f"{words} {hist}", f"<a_{k % 8}><c_{rng.integers(8)}>"))
  return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  tok = WordTokenizer()
  train = batching.tokenize_examples(_examples(), tok, BUCKETS)
  valid = batching.tokenize_examples(_examples(9, seed=1), tok, BUCKETS)
  assert len(set(train.bucket.tolist())) == 3  # every bucket used
  splits = {"train": train, "validation": valid}
  builder = example_records.write_examples(splits, str(tmp_path_factory.mktemp("records")))
  return splits, builder.data_dir


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("batch_size,drop,history", [(4, False, True), (5, False, False),
                                                     (4, True, True)])
def test_grain_batches_equal_the_batcher(written, batch_size, drop, history):
  splits, data_dir = written
  kw = dict(batch_size=batch_size, drop_remainder=drop,
            prompt_label_ids=CODE_IDS if history else None,
            prompt_label_tasks=("seqrec",) if history else ())
  ref = batching.Batcher(splits["train"], **kw)
  new = grain_batches.GrainBatcher(data_dir, "train", **kw)
  assert new.steps_per_epoch == ref.steps_per_epoch and new.shapes == ref.shapes
  assert len(new) == len(splits["train"])
  for seed, epoch in ((0, 0), (0, 1), (7, 3)):
    e = list(ref.batches(seed, epoch))
    _same(e, list(new.batches(seed, epoch)))
    # filler rows (no loss) exist unless the remainders are dropped
    assert any((b["labels"] == batching.IGNORE).all(axis=1).any() for b in e) != drop
  if history:  # the history loss really labels prompt codes of seqrec rows
    assert any((np.isin(b["labels"], CODE_IDS).sum(1) > 2).any() for b in e)


def test_validation_split_and_no_threads(written):
  splits, data_dir = written
  ref = batching.Batcher(splits["validation"], batch_size=4)
  for threads in (0, 1, 3):
    new = grain_batches.GrainBatcher(data_dir, "validation", batch_size=4, num_threads=threads)
    _same(list(ref.batches(2, 0)), list(new.batches(2, 0)))


def test_per_process_rows_and_resume(written):
  _, data_dir = written
  g = grain_batches.GrainBatcher(data_dir, batch_size=4, prompt_label_ids=CODE_IDS,
                                 prompt_label_tasks=("seqrec",))
  full = list(g.batches(3, 1))
  for k in (0, 1, 5, g.steps_per_epoch - 1, g.steps_per_epoch):
    _same(list(g.batches(3, 1, start_step=k)), full[k:])
  for count in (2, 4):
    parts = [list(g.batches(3, 1, process_index=p, process_count=count))
             for p in range(count)]
    for p in parts:
      assert all(b["tokens"].shape[0] == 4 // count for b in p)
    _same([{k: np.concatenate([part[s][k] for part in parts]) for k in full[s]}
           for s in range(len(full))], full)
    # a process resumed mid-epoch reads its rows of the same remaining batches
    _same(list(g.batches(3, 1, start_step=3, process_index=1, process_count=count)),
          parts[1][3:])
  with pytest.raises(ValueError, match="start_step"):
    g.batches(3, 1, start_step=g.steps_per_epoch + 1)
  with pytest.raises(ValueError, match="split evenly"):
    g.batches(3, 1, process_index=0, process_count=3)
  # grain's own iterator state counts the steps taken
  it = iter(g.dataset(3, 1).to_iter_dataset())
  for _ in range(3):
    next(it)
  assert it.get_state() == {"next_index": 3}


def test_records_reuse_reopen_and_errors(written, tmp_path):
  splits, data_dir = written
  b = example_records.open_examples(data_dir)  # no examples, no tokenizer
  src = b.as_data_source("train")
  tasks = b.info.metadata["task_names"]
  for i in (0, 17, len(src) - 1):
    np.testing.assert_array_equal(src[i]["prompt"], splits["train"].prompts[i])
    np.testing.assert_array_equal(src[i]["response"], splits["train"].responses[i])
    assert tasks[src[i]["task"]] == splits["train"].tasks[i]
  # the same examples are found, not rewritten; other examples get another directory
  root = data_dir.split("/lcrec_examples/")[0]
  assert example_records.write_examples(splits, root).data_dir == data_dir
  other = dict(splits, validation=batching.tokenize_examples(
      _examples(9, seed=2), WordTokenizer(), BUCKETS))
  assert example_records.LcrecExamples(other, data_dir=root).data_dir != data_dir
  with pytest.raises(ValueError, match="no split 'test'"):
    grain_batches.GrainBatcher(data_dir, "test", batch_size=2)
  with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset"):
    grain_batches.GrainBatcher(str(tmp_path), batch_size=2)
  with pytest.raises(ValueError, match="prompt_label_ids"):
    grain_batches.GrainBatcher(data_dir, batch_size=2, prompt_label_tasks=("seqrec",))
  assert "tensorflow" not in sys.modules


def test_examples_dir_layout(tmp_path):
  assert workdir_lib.examples_dir(str(tmp_path)) == str(tmp_path / "train" / "examples")
  a = workdir_lib.examples_dir("gs://b/run", 0)
  assert a.endswith("/p0") and not a.startswith("gs://")
  assert workdir_lib.examples_dir("gs://b/run/", 1) == a[:-1] + "1"
  assert workdir_lib.examples_dir("gs://b/other", 0) != a


@pytest.mark.slow
def test_trainer_resume_with_grain_batches(tmp_path):
  """A run fed by grain that crashes at step 3 and resumes from its step-2 checkpoint
  (mid epoch 0; steps 3..5 cross into epoch 1) ends with the same losses and params (one
  bucket, so one compiled shape)."""
  import jax  # pylint: disable=g-import-not-at-top
  from tests import test_train_resume as tr  # pylint: disable=g-import-not-at-top

  data = batching.tokenize_examples(_examples(21, seed=3), WordTokenizer(), (48,))
  data_dir = example_records.write_examples({"train": data}, str(tmp_path / "rec")).data_dir
  g = grain_batches.GrainBatcher(data_dir, batch_size=tr.B, prompt_label_ids=CODE_IDS,
                                 prompt_label_tasks=("seqrec",), num_threads=1)
  assert g.steps_per_epoch == 3
  model, params = tr.tiny_model_and_params()

  def run(wd, **kw):
    return tr.trainer_lib.train(
        tr.make_config(num_steps=5, checkpoint_every=2, eval_every=0), str(wd), model,
        params, lambda e, s: g.batches(0, e, s), g.steps_per_epoch, **kw)

  full = run(tmp_path / "full")

  def crash(step, _):
    if step == 3:
      raise tr.Crash()

  with pytest.raises(tr.Crash):
    run(tmp_path / "crash", step_hook=crash)
  res = run(tmp_path / "crash")
  assert res.resumed_from == 2 and [h["step"] for h in res.history] == [3, 4, 5]
  assert [h["loss"] for h in res.history] == [h["loss"] for h in full.history[2:]]
  tr._assert_same_params(res.state.params, full.state.params)  # pylint: disable=protected-access
  assert jax.device_get(res.state.step) == 5
