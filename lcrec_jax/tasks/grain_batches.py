"""Training batches read with grain from the array_record examples of a run.

The examples are tokenized once and written by :mod:`lcrec_jax.tasks.example_records`.
An epoch is the same plan as the in-memory :class:`lcrec_jax.tasks.batching.Batcher`
(:func:`~lcrec_jax.tasks.batching.epoch_plan`: per-``(seed, epoch)`` shuffle inside each
length bucket, fixed batch size, a bucket's last batch filled with no-loss copies, batch
order shuffled), and every batch is built by the same
:func:`~lcrec_jax.tasks.batching.collate`, so the two give bit-for-bit the same
``tokens`` / ``labels`` / ``attention_mask`` / ``positions`` for the same seed and epoch
(``tests/test_grain_batches.py``).

Pipeline of :meth:`GrainBatcher.dataset`::

  grain.MapDataset.source(plan)[start_step:]      # one element per batch: record indices
    .map(read this process's rows + collate)      # ArrayRecordDataSource.__getitems__
    .to_iter_dataset(ReadOptions(num_threads, prefetch_buffer_size))

* Sharding: process ``p`` of ``P`` reads only rows ``[p * B / P, (p + 1) * B / P)`` of
  each global batch (what ``jax.make_array_from_process_local_data`` expects).
* Resume: the iterator state is ``(epoch, step)``, which the trainer already checkpoints;
  the plan depends only on ``(seed, epoch)``, so ``batches(seed, epoch, start_step)``
  after a restart yields exactly the batches an uninterrupted run had not yet consumed.
  (grain's own ``get_state()`` of this iterator is the same step count.)
* Prefetch: ``num_threads`` threads read and collate the next ``prefetch`` batches while
  the trainer runs the current step.

Why grain rather than the in-memory batcher alone: each process reads only its rows, the
reader does not hold the examples in memory, reading overlaps the step, and a resumed run
reuses the written records. Cost, measured on the quick recipe's 17,000 examples
(``benchmarks/input_pipeline.py``, ``BENCHMARKS.md`` "Input pipeline", loaded 2-core CPU):
a one-time write of ~8 s per run; a batch of 16 takes ~6 ms to read and collate (tfds
decodes every record) against ~3 ms in memory, both ~1% of the ~0.6 s step, and with one
reader thread the step waits ~0.5 ms per batch instead of the batcher's synchronous ~2 ms.
Hence the train stage uses this path, with ``num_threads=1`` (a second thread gained little
on 2 cores).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import grain
import numpy as np

from lcrec_jax.tasks import batching
from lcrec_jax.tasks import example_records


class GrainBatcher:
  """Deterministic batches of one split of a prepared examples directory.

  Same interface as :class:`lcrec_jax.tasks.batching.Batcher` where the trainer uses it
  (``steps_per_epoch``, ``shapes``, ``plan``, ``batches``).

  Args:
    directory: a prepared examples dataset (``write_examples(...).data_dir``).
    split: ``"train"`` or ``"validation"``.
    batch_size: rows of a global batch.
    drop_remainder: drop each bucket's last partial batch instead of filling it.
    prompt_label_ids, prompt_label_tasks: the history loss (``batching`` module docstring).
    num_threads, prefetch: grain ``ReadOptions`` (reader threads, batches read ahead);
      ``num_threads=0`` reads in the consuming thread, without prefetch.
    pack_length, seed, pack_rows: > 0 packs the examples into rows of ``pack_length`` tokens (packed
      once with ``seed``; ``batching`` module docstring); batches then carry
      ``segment_ids``, exactly as :class:`~lcrec_jax.tasks.batching.Batcher`'s.
  """

  def __init__(self, directory: str, split: str = "train", *, batch_size: int,
               drop_remainder: bool = False, prompt_label_ids: Sequence[int] | None = None,
               prompt_label_tasks: Sequence[str] = (), num_threads: int = 1,
               prefetch: int = 4, pack_length: int = 0, seed: int = 0,
               pack_rows: str = "fixed"):
    if prompt_label_tasks and prompt_label_ids is None:
      raise ValueError("prompt_label_tasks needs prompt_label_ids (the code token ids)")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_threads < 0 or prefetch < 0:
      raise ValueError(f"num_threads and prefetch must be >= 0, got {num_threads}, {prefetch}")
    builder = example_records.open_examples(directory)
    meta = builder.info.metadata
    if split not in meta:
      raise ValueError(f"{directory}: no split {split!r} (has {sorted(builder.info.splits)})")
    self.source = builder.as_data_source(split)
    self.bucket = np.asarray(meta[split]["bucket"], np.int32)
    self.pad_id = int(meta[split]["pad_id"])
    if len(self.bucket) != len(self.source):
      raise ValueError(f"{directory}: split {split!r} has {len(self.source)} records but "
                       f"{len(self.bucket)} bucket lengths in its metadata")
    names = tuple(meta["task_names"])
    self._label_prompt = np.asarray([t in tuple(prompt_label_tasks) for t in names], bool)
    self.prompt_label_ids = (None if prompt_label_ids is None else
                             np.unique(np.asarray(prompt_label_ids, np.int32)))
    self.batch_size = int(batch_size)
    self.drop_remainder = drop_remainder
    self.num_threads, self.prefetch = int(num_threads), int(prefetch)
    self.packed = None
    if pack_length > 0:
      lengths = meta[split].get("lengths", None)
      if lengths is None:  # prepared before lengths were kept in the metadata
        lengths = [len(r["prompt"]) + len(r["response"])
                   for r in self.source.__getitems__(list(range(len(self.source))))]
      self.packed = batching.pack_examples(np.asarray(lengths, np.int64),
                                           tuple(meta[split]["buckets"]), pack_length, seed,
                                           pack_rows)
    self._plan_bucket = self.bucket if self.packed is None else self.packed.bucket
    self._steps = batching.count_steps(self._plan_bucket, self.batch_size, drop_remainder)

  def __len__(self) -> int:
    return len(self.source)

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch (the same for every seed and epoch)."""
    return self._steps

  @property
  def shapes(self) -> set[tuple[int, int]]:
    """Every ``[B, T]`` a batch can have."""
    return {(self.batch_size, int(b)) for b in np.unique(self._plan_bucket)}

  def plan(self, seed: int, epoch: int) -> list[batching.PlannedBatch]:
    """The epoch's batches; with packing their ``indices`` are row ids of ``self.packed``."""
    return batching.epoch_plan(self._plan_bucket, self.batch_size, seed, epoch,
                               self.drop_remainder)

  def _read_packed(self, planned: batching.PlannedBatch, rows: slice) -> dict[str, np.ndarray]:
    """This process's packed rows of one planned batch, read and collated."""
    row_ids = [int(r) for r in planned.indices[rows]]
    real = (np.arange(len(planned.indices)) < planned.num_real)[rows]
    members = [self.packed.rows[r] for r in row_ids]
    records = self.source.__getitems__([int(i) for m in members for i in m])
    it = iter(records)
    packed_rows = [[(np.asarray(rec["prompt"], np.int32), np.asarray(rec["response"], np.int32),
                     bool(self._label_prompt[int(rec["task"])]))
                    for rec in (next(it) for _ in m)] for m in members]
    return batching.collate_packed(packed_rows, real, planned.length, self.pad_id,
                                   self.prompt_label_ids)

  def _read(self, planned: batching.PlannedBatch, rows: slice) -> dict[str, np.ndarray]:
    """This process's rows of one planned batch, read from the records and collated."""
    if self.packed is not None:
      return self._read_packed(planned, rows)
    idx = [int(i) for i in planned.indices[rows]]
    real = (np.arange(len(planned.indices)) < planned.num_real)[rows]
    records = self.source.__getitems__(idx)
    return batching.collate(
        [np.asarray(r["prompt"], np.int32) for r in records],
        [np.asarray(r["response"], np.int32) for r in records],
        [bool(self._label_prompt[int(r["task"])]) for r in records], real, planned.length,
        self.pad_id, self.prompt_label_ids)

  def dataset(self, seed: int, epoch: int, start_step: int = 0, process_index: int = 0,
              process_count: int = 1) -> grain.MapDataset:
    """Batches ``start_step ..`` of ``epoch`` as a ``grain.MapDataset`` (this process's
    rows of each; element ``k`` is step ``start_step + k``)."""
    batching.check_start(start_step, self._steps)
    rows = batching.process_rows(self.batch_size, process_index, process_count)
    plan = self.plan(seed, epoch)[start_step:]
    return grain.MapDataset.source(plan).map(lambda planned: self._read(planned, rows))

  def batches(self, seed: int, epoch: int, start_step: int = 0, process_index: int = 0,
              process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``start_step ..`` of ``epoch``, read ahead by ``num_threads`` threads.

    Yields dicts of ``tokens``, ``labels``, ``attention_mask``, ``positions``:
    ``[B / process_count, T]`` int32, as :meth:`lcrec_jax.tasks.batching.Batcher.batches`.
    """
    ds = self.dataset(seed, epoch, start_step, process_index, process_count)
    if self.num_threads == 0:  # iter(ds) would prefetch with grain's default 16 threads
      return (ds[k] for k in range(len(ds)))
    return iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)))
