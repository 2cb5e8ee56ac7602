"""Tokenized, bucketed, deterministic training batches of task examples.

Frame. Every example becomes ``PROMPT_HEAD + instruction + PROMPT_TAIL`` followed by the
response and EOS (an Alpaca-style instruction frame, worded here). The prompt ends with
``"### Response:\\n"`` and the response follows directly, so generation at evaluation
starts right after that newline; :func:`encode_prompt` gives evaluation exactly the
prompt ids training used.

Tokenization. The tokenizer is any object with ``encode(text) -> list[int]``, ``eos_id``
and ``pad_id`` (``bos_id`` when a BOS is added), e.g.
:class:`lcrec_jax.llm.tokenizer.LCRecTokenizer`. Special tokens are placed here, never by
the tokenizer (``add_special_tokens=False`` is passed when ``encode`` accepts it). A BOS
starts every sequence when ``add_bos`` is true, or when it is None (the default) and the
tokenizer's ``add_bos_token`` is true (LLaMA-1/2 style; SmolLM2 has none). The head, the
instruction, the tail and the response are encoded separately and concatenated, so the
prompt/response boundary is exact: ``labels`` are ``-100`` on BOS, the prompt and padding,
and equal to ``tokens`` on the response and its EOS (labels are aligned with ``tokens``,
not shifted: logits at ``t - 1`` predict ``labels[t]``).

History loss (optional, off in LC-Rec). With ``prompt_label_ids`` and
``prompt_label_tasks`` given, examples of those tasks (e.g. ``seqrec``) also get labels on
every prompt token whose id is in ``prompt_label_ids`` (the item-code tokens): the
history is in time order, so each history item's code is a next-item target given the
items before it. One forward pass then trains ~``max_history`` next-item predictions
instead of one, as SASRec-style models train every position of a sequence.

Lengths. Sequences go into the smallest configured bucket length that holds them, so only
``len(buckets)`` shapes ever reach ``jit``. A sequence longer than the largest bucket
loses instruction tokens from the left (the oldest history; the frame is kept); the
response is never cut: an example whose frame + response alone exceed the largest bucket
is skipped and counted (``overflow="skip"``, logged) or raises (``overflow="error"``).

Order. Batches have a fixed size. For epoch ``e`` a generator seeded by ``(seed, e)``
permutes the examples of each bucket, cuts them into batches, and permutes the batch
order. The plan depends only on ``(seed, epoch)`` and the examples, so a run resumed at
``start_step`` sees exactly the batches an uninterrupted run would have. A bucket's last
partial batch is filled up with copies of its examples whose labels are all ``-100``
(no loss, no NaN from all-padding rows), or dropped with ``drop_remainder=True``.

Packing (optional, ``pack_length`` > 0; not in LC-Rec). Several examples share a row:
:func:`pack_examples` fills rows of ``pack_length`` tokens greedily, first fit, visiting the
examples in an order seeded by ``seed`` alone (the packing is the same every epoch, so the
number of rows and of steps per epoch is fixed); with ``pack_rows="bucket"`` a row holds
only up to the bucket length of the example that opened it (shorter examples fill the
padding, rows never grow: attention cost, quadratic in the row length, does not rise).
Each row then goes into the smallest bucket (or ``pack_length``) that holds its tokens, and the epoch plan shuffles and batches
rows exactly as it does examples. :func:`collate_packed` adds ``segment_ids`` (1, 2, ...
per example of a row, 0 on padding) and restarts ``positions`` at 0 for every example;
the model attends only within a segment and the train step drops targets that cross a
segment boundary, so a packed batch has the loss sums of its examples unpacked
(``tests/test_packing.py``). A step then costs what its real tokens cost, not the
padding up to the example's bucket.

Readers. :class:`Batcher` holds the tokenized examples in memory and builds each batch
with :func:`collate`. The train stage instead writes them once as array_record
(:mod:`lcrec_jax.tasks.example_records`) and reads them with grain
(:class:`lcrec_jax.tasks.grain_batches.GrainBatcher`): the same :func:`epoch_plan`, the same
:func:`collate`, so bit-for-bit the same batches; :class:`Batcher` stays as their reference
and for in-memory use.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

from absl import logging
import numpy as np

from lcrec_jax import progress
from lcrec_jax.tasks.builders import Example

IGNORE = -100  # label of a position with no loss (prompt, padding); train.step reads it
PROMPT_HEAD = ("The instruction below describes a recommendation task. Answer it with a "
               "fitting response.\n\n### Instruction:\n")
PROMPT_TAIL = "\n\n### Response:\n"


class TokenizerLike(Protocol):
  """What batching needs from a tokenizer."""

  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    ...


def format_prompt(instruction: str) -> str:
  """The framed prompt text: ``PROMPT_HEAD + instruction + PROMPT_TAIL``."""
  return PROMPT_HEAD + instruction + PROMPT_TAIL


def _encoder(tokenizer: TokenizerLike) -> Callable[[str], list[int]]:
  """``text -> ids`` without special tokens (passes ``add_special_tokens=False`` when the
  tokenizer's ``encode`` takes it, as :class:`lcrec_jax.llm.tokenizer.LCRecTokenizer`
  does; BOS/EOS are placed by batching itself)."""
  try:
    params = inspect.signature(tokenizer.encode).parameters
  except (TypeError, ValueError):
    params = {}
  if "add_special_tokens" in params:
    return lambda text: tokenizer.encode(text, add_special_tokens=False)
  return tokenizer.encode


def _ids(tokenizer: TokenizerLike, text: str) -> np.ndarray:
  return np.asarray(_encoder(tokenizer)(text), np.int32).reshape(-1)


def _encode_many(tokenizer: TokenizerLike, texts: Sequence[str], desc: str,
                 show_progress: bool, chunk: int = 4096) -> list[np.ndarray]:
  """Ids of many texts: ``encode_batch`` in chunks when the tokenizer has it."""
  batch_fn = getattr(tokenizer, "encode_batch", None)
  out: list[np.ndarray] = []
  with progress.Progress(len(texts), desc, "text", enabled=show_progress) as p:
    if batch_fn is not None and "add_special_tokens" in inspect.signature(batch_fn).parameters:
      for start in range(0, len(texts), chunk):
        ids = batch_fn(list(texts[start:start + chunk]), add_special_tokens=False)
        out.extend(np.asarray(x, np.int32).reshape(-1) for x in ids)
        p.update(len(ids))
      return out
    enc = _encoder(tokenizer)
    for t in texts:
      out.append(np.asarray(enc(t), np.int32).reshape(-1))
      p.update(1)
  return out


def _add_bos(tokenizer: TokenizerLike, add_bos: bool | None) -> bool:
  """``add_bos`` or, when None, the tokenizer's own ``add_bos_token`` (default False)."""
  return bool(getattr(tokenizer, "add_bos_token", False)) if add_bos is None else add_bos


def _bos(tokenizer: TokenizerLike, add_bos: bool | None) -> np.ndarray:
  if not _add_bos(tokenizer, add_bos):
    return np.zeros((0,), np.int32)
  bos = getattr(tokenizer, "bos_id", None)
  if bos is None:
    raise ValueError("add_bos is set but the tokenizer has no bos_id")
  return np.asarray([bos], np.int32)


def encode_prompt(tokenizer: TokenizerLike, instruction: str, max_len: int | None = None,
                  add_bos: bool | None = None) -> np.ndarray:
  """Prompt ids ``[len]`` int32 as training builds them (BOS?, head, instruction, tail).

  If ``max_len`` is given and the prompt is longer, instruction tokens are dropped from
  the left; raises ValueError when even the frame does not fit.
  """
  head = np.concatenate([_bos(tokenizer, add_bos), _ids(tokenizer, PROMPT_HEAD)])
  tail = _ids(tokenizer, PROMPT_TAIL)
  instr = _ids(tokenizer, instruction)
  if max_len is not None:
    room = max_len - len(head) - len(tail)
    if room < 0:
      raise ValueError(f"max_len={max_len} is shorter than the prompt frame "
                       f"({len(head) + len(tail)} tokens)")
    instr = instr[len(instr) - room:] if len(instr) > room else instr
  return np.concatenate([head, instr, tail]).astype(np.int32)


def _check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
  b = tuple(int(x) for x in buckets)
  if not b or any(x <= 0 for x in b) or list(b) != sorted(set(b)):
    raise ValueError(f"buckets must be distinct positive increasing lengths, got {buckets}")
  return b


@dataclasses.dataclass(frozen=True)
class TokenizedExamples:
  """Examples as token ids, each already fitted into a bucket.

  Attributes:
    prompts: per example, ``[p]`` int32 prompt ids (BOS?, head, instruction, tail).
    responses: per example, ``[r]`` int32 response ids followed by EOS.
    lengths: ``[N]`` int32 ``p + r``.
    bucket: ``[N]`` int32 bucket length of each example.
    tasks: task name per example.
    buckets: the configured bucket lengths.
    pad_id: padding token id.
    num_truncated: examples whose instruction was cut from the left.
    num_skipped: examples dropped because frame + response exceed the largest bucket.
  """

  prompts: tuple[np.ndarray, ...]
  responses: tuple[np.ndarray, ...]
  lengths: np.ndarray
  bucket: np.ndarray
  tasks: tuple[str, ...]
  buckets: tuple[int, ...]
  pad_id: int
  num_truncated: int
  num_skipped: int

  def __len__(self) -> int:
    return len(self.prompts)


def tokenize_examples(examples: Sequence[Example], tokenizer: TokenizerLike,
                      buckets: Sequence[int], *, add_bos: bool | None = None,
                      overflow: str = "skip", show_progress: bool = False
                      ) -> TokenizedExamples:
  """Tokenize and bucket ``examples`` (see the module docstring for the rules)."""
  buckets = _check_buckets(buckets)
  if overflow not in ("skip", "error"):
    raise ValueError(f"overflow must be 'skip' or 'error', got {overflow!r}")
  if getattr(tokenizer, "eos_id", None) is None or getattr(tokenizer, "pad_id", None) is None:
    raise ValueError("the tokenizer needs eos_id and pad_id for batching")
  max_len = buckets[-1]
  head = np.concatenate([_bos(tokenizer, add_bos), _ids(tokenizer, PROMPT_HEAD)])
  tail = _ids(tokenizer, PROMPT_TAIL)
  eos = np.asarray([tokenizer.eos_id], np.int32)
  instrs = _encode_many(tokenizer, [ex.instruction for ex in examples], "tokenize prompts",
                        show_progress)
  resps = _encode_many(tokenizer, [ex.response for ex in examples], "tokenize responses",
                       show_progress)
  prompts, responses, tasks = [], [], []
  truncated = skipped = 0
  for n, (ex, instr, resp) in enumerate(zip(examples, instrs, resps)):
    resp = np.concatenate([resp, eos])
    excess = len(head) + len(instr) + len(tail) + len(resp) - max_len
    if excess > 0:
      if excess > len(instr):
        msg = (f"example {n} (task {ex.task!r}): response of {len(resp)} tokens plus the "
               f"{len(head) + len(tail)}-token frame exceed the largest bucket {max_len}")
        if overflow == "error":
          raise ValueError(msg + "; raise the largest bucket (config tasks.buckets)")
        skipped += 1
        continue
      instr = instr[excess:]
      truncated += 1
    prompts.append(np.concatenate([head, instr, tail]).astype(np.int32))
    responses.append(resp)
    tasks.append(ex.task)
  if skipped:
    logging.warning("batching: skipped %d of %d examples whose response does not fit in %d "
                    "tokens", skipped, len(examples), max_len)
  if truncated:
    logging.info("batching: cut the instruction of %d of %d examples from the left to fit "
                 "%d tokens", truncated, len(examples), max_len)
  lengths = np.asarray([len(p) + len(r) for p, r in zip(prompts, responses)], np.int32)
  bucket_arr = np.asarray(buckets, np.int32)
  bucket = bucket_arr[np.searchsorted(bucket_arr, lengths, side="left")] if len(lengths) else (
      np.zeros((0,), np.int32))
  return TokenizedExamples(tuple(prompts), tuple(responses), lengths,
                           np.asarray(bucket, np.int32), tuple(tasks), buckets,
                           int(tokenizer.pad_id), truncated, skipped)


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
  """One batch of an epoch plan: its length, example indices ``[B]``, real rows."""

  length: int
  indices: np.ndarray
  num_real: int


def epoch_plan(bucket: np.ndarray, batch_size: int, seed: int, epoch: int,
               drop_remainder: bool = False) -> list[PlannedBatch]:
  """The batches of one epoch, in order; depends only on its arguments.

  Args:
    bucket: ``[N]`` bucket length of each example.
    batch_size: rows per batch.
    seed, epoch: seed the shuffle (``np.random.default_rng([seed, epoch])``).
    drop_remainder: drop each bucket's last partial batch instead of filling it.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  rng = np.random.default_rng([int(seed), int(epoch)])
  planned = []
  for length in np.unique(bucket):
    members = rng.permutation(np.flatnonzero(bucket == length))
    for start in range(0, len(members), batch_size):
      chunk = members[start:start + batch_size]
      n = len(chunk)
      if n < batch_size:
        if drop_remainder:
          continue
        chunk = np.concatenate([chunk, np.resize(members, batch_size - n)])
      planned.append(PlannedBatch(int(length), chunk.astype(np.int64), n))
  order = rng.permutation(len(planned))
  return [planned[int(i)] for i in order]


def collate(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray],
            label_prompt: Sequence[bool], real: Sequence[bool], length: int, pad_id: int,
            prompt_label_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Pad ``B`` examples into one batch of length ``T = length``.

  Args:
    prompts, responses: per row, ``[p]`` prompt ids and ``[r]`` response ids (+ EOS).
    label_prompt: per row, whether its prompt's ``prompt_label_ids`` tokens are labels
      (the history loss, module docstring).
    real: per row, False for a filler row (labels all ``-100``).
    length: ``T``; pad_id: padding token id.

  Returns:
    ``tokens``, ``labels`` (-100 = no loss), ``attention_mask`` (1 = real token) and
    ``positions``, each ``[B, T]`` int32.
  """
  b, t = len(prompts), length
  tokens = np.full((b, t), pad_id, np.int32)
  labels = np.full((b, t), IGNORE, np.int32)
  mask = np.zeros((b, t), np.int32)
  for r, (p, resp) in enumerate(zip(prompts, responses)):
    n = len(p) + len(resp)
    tokens[r, :len(p)] = p
    tokens[r, len(p):n] = resp
    mask[r, :n] = 1
    if real[r]:
      labels[r, len(p):n] = resp
      if prompt_label_ids is not None and label_prompt[r]:
        keep = np.isin(p, prompt_label_ids)
        labels[r, :len(p)][keep] = p[keep]
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  return {"tokens": tokens, "labels": labels, "attention_mask": mask, "positions": positions}


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """Examples packed into rows (:func:`pack_examples`).

  Attributes:
    rows: per row, ``[k]`` int64 indices of its examples, in row order.
    bucket: ``[R]`` int32 length of each row (a bucket, or ``pack_length``).
    pack_length: the row capacity in tokens.
  """

  rows: tuple[np.ndarray, ...]
  bucket: np.ndarray
  pack_length: int

  def __len__(self) -> int:
    return len(self.rows)


PACK_SALT = 0x5041434B  # seeds the packing order apart from the epoch shuffles


PACK_ROWS = ("fixed", "bucket")


def pack_examples(lengths: np.ndarray, buckets: Sequence[int], pack_length: int,
                  seed: int, rows: str = "fixed") -> PackedRows:
  """Greedy first-fit packing of examples into rows of at most ``pack_length`` tokens.

  Args:
    lengths: ``[N]`` tokens of each example (each <= ``pack_length``).
    buckets: bucket lengths; a row's length is the smallest of ``buckets`` and
      ``pack_length`` that holds its tokens.
    pack_length: row capacity, >= the largest bucket.
    seed: seeds the order examples are visited in (``[seed, PACK_SALT]``).
    rows: ``"fixed"``: every row holds up to ``pack_length`` tokens; ``"bucket"``: a row
      holds up to the bucket length of the example that opened it, so rows are never
      longer than unpacked ones and later, shorter examples fill their padding.

  Returns:
    :class:`PackedRows`; every example is in exactly one row.
  """
  if rows not in PACK_ROWS:
    raise ValueError(f"pack rows must be one of {PACK_ROWS}, got {rows!r} (tasks.pack_rows)")
  lengths = np.asarray(lengths, np.int64)
  buckets = _check_buckets(buckets)
  if pack_length < buckets[-1]:
    raise ValueError(f"pack_length={pack_length} is shorter than the largest bucket "
                     f"{buckets[-1]} (config tasks.pack_length)")
  if len(lengths) and lengths.max() > pack_length:
    raise ValueError(f"an example of {lengths.max()} tokens exceeds pack_length={pack_length}")
  order = np.random.default_rng([int(seed), PACK_SALT]).permutation(len(lengths))
  sizes = np.asarray(sorted(set(buckets) | {int(pack_length)}), np.int64)
  room = np.zeros(len(lengths), np.int64)  # free tokens of each open row
  capacity = np.zeros(len(lengths), np.int64)
  members: list[list[int]] = []
  for i in order:
    n = lengths[i]
    fits = room[:len(members)] >= n
    r = int(np.argmax(fits)) if fits.any() else len(members)
    if r == len(members):
      members.append([])
      capacity[r] = (pack_length if rows == "fixed" else
                     sizes[np.searchsorted(sizes, n, side="left")])
      room[r] = capacity[r]
    members[r].append(int(i))
    room[r] -= n
  used = capacity[:len(members)] - room[:len(members)]
  bucket = sizes[np.searchsorted(sizes, used, side="left")].astype(np.int32)
  return PackedRows(tuple(np.asarray(m, np.int64) for m in members), bucket, int(pack_length))


def collate_packed(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray, bool]]],
                   real: Sequence[bool], length: int, pad_id: int,
                   prompt_label_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Packs each row's examples one after another into ``[B, T = length]`` arrays.

  Args:
    rows: per row, its examples as ``(prompt ids, response ids + EOS, label_prompt)``.
    real: per row, False for a filler row (labels all ``-100``).
    length, pad_id, prompt_label_ids: as :func:`collate`.

  Returns:
    :func:`collate`'s arrays, ``positions`` restarting at 0 for every example, plus
    ``segment_ids`` ``[B, T]`` int32: k for the k-th example of a row (1-based), 0 on
    padding. One example per row gives :func:`collate`'s arrays (and ``segment_ids``).
  """
  b, t = len(rows), length
  tokens = np.full((b, t), pad_id, np.int32)
  labels = np.full((b, t), IGNORE, np.int32)
  mask = np.zeros((b, t), np.int32)
  positions = np.zeros((b, t), np.int32)
  segments = np.zeros((b, t), np.int32)
  for r, row in enumerate(rows):
    start = 0
    for k, (p, resp, label_prompt) in enumerate(row, start=1):
      n = len(p) + len(resp)
      if start + n > t:
        raise ValueError(f"collate_packed: row {r} holds {start + n} tokens, more than {t}")
      sl = slice(start, start + n)
      tokens[r, sl] = np.concatenate([p, resp])
      mask[r, sl] = 1
      segments[r, sl] = k
      positions[r, sl] = np.arange(n, dtype=np.int32)
      if real[r]:
        labels[r, start + len(p):start + n] = resp
        if prompt_label_ids is not None and label_prompt:
          keep = np.isin(p, prompt_label_ids)
          labels[r, start:start + len(p)][keep] = p[keep]
      start += n
    positions[r, start:] = np.arange(start, t, dtype=np.int32)  # padding: as collate
  return {"tokens": tokens, "labels": labels, "attention_mask": mask, "positions": positions,
          "segment_ids": segments}


def make_packed_batch(data: TokenizedExamples, packed: PackedRows, planned: PlannedBatch,
                      rows: slice = slice(None), prompt_label_ids: np.ndarray | None = None,
                      prompt_label_tasks: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Arrays of one planned batch of packed rows (``planned.indices`` are row ids)."""
  real = (np.arange(len(planned.indices)) < planned.num_real)[rows]
  members = [[(data.prompts[i], data.responses[i], data.tasks[i] in prompt_label_tasks)
              for i in packed.rows[int(r)]] for r in planned.indices[rows]]
  return collate_packed(members, real, planned.length, data.pad_id, prompt_label_ids)


def make_batch(data: TokenizedExamples, planned: PlannedBatch, rows: slice = slice(None),
               prompt_label_ids: np.ndarray | None = None,
               prompt_label_tasks: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Arrays of one planned batch (``rows`` selects a host's share), see :func:`collate`.

  ``prompt_label_ids`` / ``prompt_label_tasks``: the history loss (module docstring).
  """
  idx = [int(i) for i in planned.indices[rows]]
  real = (np.arange(len(planned.indices)) < planned.num_real)[rows]
  return collate([data.prompts[i] for i in idx], [data.responses[i] for i in idx],
                 [data.tasks[i] in prompt_label_tasks for i in idx], real, planned.length,
                 data.pad_id, prompt_label_ids)


def count_steps(bucket: np.ndarray, batch_size: int, drop_remainder: bool = False) -> int:
  """Batches per epoch of :func:`epoch_plan` (the same for every seed and epoch)."""
  counts = [int(np.sum(bucket == b)) for b in np.unique(bucket)]
  return int(sum((c // batch_size) if drop_remainder else -(-c // batch_size)
                 for c in counts))


def check_start(start_step: int, steps: int) -> None:
  """Raises ValueError unless ``0 <= start_step <= steps``."""
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step {start_step} outside 0..{steps}")


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """Rows ``[p * B / P, (p + 1) * B / P)`` of a global batch that process ``p`` of ``P``
  feeds (for ``jax.make_array_from_process_local_data``)."""
  if batch_size % process_count or not 0 <= process_index < process_count:
    raise ValueError(f"batch_size {batch_size} must split evenly over "
                     f"{process_count} processes (index {process_index})")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


@runtime_checkable
class BatchReader(Protocol):
  """What the trainers read batches through: the in-memory :class:`Batcher` (the
  reference) and :class:`lcrec_jax.tasks.grain_batches.GrainBatcher` (array_record with
  grain, what the train stage uses) both implement it, batch for batch identically."""

  @property
  def steps_per_epoch(self) -> int:
    """Optimizer steps of one epoch."""

  @property
  def shapes(self) -> set[tuple[int, int]]:
    """The ``(rows, length)`` shapes a batch can have (each compiles once)."""

  def plan(self, seed: int, epoch: int) -> list[PlannedBatch]:
    """The epoch's batches: which examples, in which bucket, in order."""

  def batches(self, seed: int, epoch: int, start_step: int = 0, process_index: int = 0,
              process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The epoch's batches from ``start_step`` on; this process's rows only."""


class Batcher:
  """Tokenizes once; yields the deterministic batches of any epoch.

  ``prompt_label_ids`` / ``prompt_label_tasks`` turn on the history loss for those tasks
  (module docstring). ``pack_length`` > 0 packs examples into rows of that many tokens
  (``pack_rows="bucket"``: of the opening example's bucket length), packed once with
  ``seed`` (module docstring); batches then carry ``segment_ids``.

  Example::

    batcher = Batcher(examples, tokenizer, batch_size=16, buckets=(128, 256, 512))
    for step, batch in enumerate(batcher.batches(seed, epoch, start_step=k), start=k):
      ...
  """

  def __init__(self, examples: Sequence[Example] | TokenizedExamples,
               tokenizer: TokenizerLike | None = None, *, batch_size: int,
               buckets: Sequence[int] = (128, 256, 512), add_bos: bool | None = None,
               drop_remainder: bool = False, overflow: str = "skip",
               show_progress: bool = False, prompt_label_ids: Sequence[int] | None = None,
               prompt_label_tasks: Sequence[str] = (), pack_length: int = 0, seed: int = 0,
               pack_rows: str = "fixed"):
    if prompt_label_tasks and prompt_label_ids is None:
      raise ValueError("prompt_label_tasks needs prompt_label_ids (the code token ids)")
    self.prompt_label_ids = (None if prompt_label_ids is None else
                             np.unique(np.asarray(prompt_label_ids, np.int32)))
    self.prompt_label_tasks = tuple(prompt_label_tasks)
    if isinstance(examples, TokenizedExamples):
      self.data = examples
    else:
      if tokenizer is None:
        raise ValueError("Batcher needs a tokenizer to tokenize examples")
      self.data = tokenize_examples(examples, tokenizer, buckets, add_bos=add_bos,
                                    overflow=overflow, show_progress=show_progress)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(self.data) == 0:
      raise ValueError("no examples to batch")
    self.batch_size = int(batch_size)
    self.drop_remainder = drop_remainder
    self.packed = (pack_examples(self.data.lengths, self.data.buckets, pack_length, seed,
                                 pack_rows) if pack_length > 0 else None)
    self._bucket = self.data.bucket if self.packed is None else self.packed.bucket
    self._steps = count_steps(self._bucket, self.batch_size, drop_remainder)

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch (the same for every seed and epoch)."""
    return self._steps

  @property
  def shapes(self) -> set[tuple[int, int]]:
    """Every ``[B, T]`` a batch can have."""
    return {(self.batch_size, int(b)) for b in np.unique(self._bucket)}

  def plan(self, seed: int, epoch: int) -> list[PlannedBatch]:
    """The epoch's batches; with packing their ``indices`` are row ids of ``self.packed``."""
    return epoch_plan(self._bucket, self.batch_size, seed, epoch, self.drop_remainder)

  def batches(self, seed: int, epoch: int, start_step: int = 0, process_index: int = 0,
              process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``start_step ..`` of ``epoch``; with several processes, this one's rows.

    Each process gets rows ``[process_index * B / process_count, ...)`` of every global
    batch, for ``jax.make_array_from_process_local_data``.
    """
    check_start(start_step, self._steps)
    rows = process_rows(self.batch_size, process_index, process_count)
    plan = self.plan(seed, epoch)[start_step:]
    if self.packed is not None:
      return (make_packed_batch(self.data, self.packed, planned, rows, self.prompt_label_ids,
                                self.prompt_label_tasks) for planned in plan)
    return (make_batch(self.data, planned, rows, self.prompt_label_ids,
                       self.prompt_label_tasks) for planned in plan)


def batches(examples: Sequence[Example] | TokenizedExamples, tokenizer: TokenizerLike | None,
            batch_size: int, buckets: Sequence[int], seed: int, epoch: int,
            start_step: int = 0, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """Deterministic batches of one epoch (tokenizes on every call; reuse a :class:`Batcher`).

  Yields dicts of ``tokens``, ``labels``, ``attention_mask``, ``positions``: ``[B, T]``
  int32 with ``T`` one of ``buckets``.
  """
  return Batcher(examples, tokenizer, batch_size=batch_size, buckets=buckets,
                 **kwargs).batches(seed, epoch, start_step)


def steps_per_epoch(examples: Sequence[Example] | TokenizedExamples,
                    tokenizer: TokenizerLike | None, batch_size: int,
                    buckets: Sequence[int], **kwargs) -> int:
  """Number of batches :func:`batches` yields per epoch."""
  return Batcher(examples, tokenizer, batch_size=batch_size, buckets=buckets,
                 **kwargs).steps_per_epoch
