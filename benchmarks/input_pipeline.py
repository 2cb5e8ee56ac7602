"""Training input pipeline: in-memory batcher vs grain over array_record, quick recipe.

  python benchmarks/input_pipeline.py --passes=5 --steps=300 --step_ms=50

Builds the quick recipe's training examples (``configs/ml100k_quick.py``: MovieLens-100K,
its task mix, ``max_history``, text budget, buckets, batch size and history loss) over a
random conflict-free index of the recipe's shape (4 x 256 codes; the codes' values do not
change the work), tokenizes them with a byte-level BPE of ``model.tokenizer_vocab`` tokens
trained on them (as ``model.tokenizer = "trained"`` does), then measures in one process:

* ``write``: the one-time cost of writing the tokenized examples as array_record
  (:func:`lcrec_jax.tasks.example_records.write_examples`, into a fresh directory);
* ``open``: opening the written dataset (:class:`GrainBatcher` construction);
* batches/s over the first ``--steps`` batches of an epoch, median of ``--passes`` passes
  (a different epoch each pass) for: ``batcher`` (the in-memory
  :class:`lcrec_jax.tasks.batching.Batcher`), ``grain, no threads`` (read + collate in the
  consuming thread) and ``grain, N thread(s)`` (grain's prefetching iterator, default
  read-ahead of 4 batches; the train stage uses 1 thread).

Every pass also checks that grain's batches equal the batcher's bit for bit. Tokenization
is shared by both paths and reported once. ``--step_ms=N`` also reports how long a consumer
that spends N ms per batch elsewhere (sleeping, i.e. without the GIL, as a jitted step
runs) waits for each batch: what the trainer would see of the reader.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import ml100k_quick  # noqa: E402
from lcrec_jax.data.loaders import load_dataset  # noqa: E402
from lcrec_jax.index.item_index import ItemIndex  # noqa: E402
from lcrec_jax.llm import bpe  # noqa: E402
from lcrec_jax.tasks import batching, example_records, grain_batches  # noqa: E402
from lcrec_jax.pipeline.stages import train as stage  # noqa: E402

_PASSES = flags.DEFINE_integer("passes", 5, "passes per reader (median reported)")
_STEPS = flags.DEFINE_integer("steps", 300, "batches per pass (0 = a whole epoch)")
_THREADS = flags.DEFINE_list("threads", ["1", "2"], "grain reader thread counts to time")
_STEP_MS = flags.DEFINE_float(
    "step_ms", 0.0, "> 0: also time a consumer that sleeps this long per batch (a training "
    "step releases the GIL as sleep does) and report how long it waits for each batch")


def _random_index(item_ids: tuple[str, ...], levels: int, size: int, seed: int = 0
                  ) -> ItemIndex:
  """Distinct random codes for ``item_ids``, ``levels`` x ``size``."""
  rng = np.random.default_rng(seed)
  flat = rng.choice(size ** levels, len(item_ids), replace=False)
  codes = np.stack([(flat // size ** lv) % size for lv in range(levels)], 1).astype(np.int32)
  return ItemIndex(item_ids, codes, (size,) * levels)


def _time_pass(it, steps: int, check=None) -> float:
  t = time.perf_counter()
  n = 0
  for batch in it:
    if check is not None:
      check(n, batch)
    n += 1
    if n == steps:
      break
  return n / (time.perf_counter() - t)


def _stall_ms(it, steps: int, step_s: float) -> float:
  """Mean ms per batch the consumer waits in ``next`` when each step takes ``step_s``."""
  waited = 0.0
  for _ in range(steps):
    t = time.perf_counter()
    next(it)
    waited += time.perf_counter() - t
    time.sleep(step_s)
  return 1e3 * waited / steps


def main(argv):
  del argv
  config = ml100k_quick.get_config()
  dataset = load_dataset(config.data)
  index = _random_index(tuple(it.item_id for it in dataset.items), config.rqvae.num_levels,
                        config.rqvae.codebook_size)
  t = time.perf_counter()
  examples = stage._examples(config, dataset, index)  # pylint: disable=protected-access
  print(f"examples: {len(examples)} built in {time.perf_counter() - t:.1f}s")
  t = time.perf_counter()
  tok = bpe.train_bpe(stage._corpus(examples), config.model.tokenizer_vocab)  # pylint: disable=protected-access
  tok.add_code_tokens(index.all_tokens())
  print(f"tokenizer: trained in {time.perf_counter() - t:.1f}s")
  t = time.perf_counter()
  data = batching.tokenize_examples(examples, tok, config.tasks.buckets,
                                    add_bos=config.tasks.add_bos)
  print(f"tokenize: {len(data)} examples in {time.perf_counter() - t:.1f}s")
  kw = dict(batch_size=config.train.batch_size,
            prompt_label_ids=tok.code_token_ids(index).ravel(),
            prompt_label_tasks=tuple(config.tasks.history_loss_tasks))
  batcher = batching.Batcher(data, **kw)
  steps = _STEPS.value or batcher.steps_per_epoch
  print(f"batch {config.train.batch_size}, {batcher.steps_per_epoch} steps per epoch, "
        f"timing {steps} per pass, {_PASSES.value} passes")

  with tempfile.TemporaryDirectory(prefix="lcrec-bench-") as tmp:
    t = time.perf_counter()
    builder = example_records.write_examples({"train": data}, tmp)
    write_s = time.perf_counter() - t
    size = sum(os.path.getsize(os.path.join(builder.data_dir, f))
               for f in os.listdir(builder.data_dir))
    print(f"write: {write_s:.2f}s, {size / 2**20:.1f} MiB")
    t = time.perf_counter()
    readers = {"grain, no threads": grain_batches.GrainBatcher(builder.data_dir, num_threads=0,
                                                                **kw)}
    print(f"open: {time.perf_counter() - t:.3f}s")
    for n in _THREADS.value:
      readers[f"grain, {n} thread(s)"] = grain_batches.GrainBatcher(  # default prefetch
          builder.data_dir, num_threads=int(n), **kw)
    rates: dict[str, list[float]] = {"batcher": []}
    rates.update({name: [] for name in readers})
    for p in range(_PASSES.value):
      ref = list(batcher.batches(config.seed, p))[:steps]

      def check(k, batch, ref=ref):
        for key, v in ref[k].items():
          if not np.array_equal(v, batch[key]):
            raise AssertionError(f"batch {k} differs in {key}")

      rates["batcher"].append(_time_pass(batcher.batches(config.seed, p), steps))
      for name, reader in readers.items():
        _time_pass(reader.batches(config.seed, p), steps, check)  # also warms the reader
        rates[name].append(_time_pass(reader.batches(config.seed, p), steps))
    for name, r in rates.items():
      med = statistics.median(r)
      print(f"{name:>20}: median {med:7.1f} batches/s ({1e3 / med:6.2f} ms/batch), "
            f"passes {', '.join(f'{x:.0f}' for x in r)}")
    if _STEP_MS.value > 0:
      n = min(steps, 100)
      print(f"with a {_STEP_MS.value:.0f} ms step after each batch ({n} batches, epoch 0):")
      its = {"batcher": lambda: batcher.batches(config.seed, 0)}
      its.update({name: (lambda r=r: r.batches(config.seed, 0)) for name, r in readers.items()})
      for name, make in its.items():
        it = iter(make())
        print(f"{name:>20}: waits {_stall_ms(it, n, _STEP_MS.value / 1e3):6.2f} ms per batch")


if __name__ == "__main__":
  app.run(main)
