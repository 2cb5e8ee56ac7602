"""Dynamic batching: one worker packs queued queries into one call of a batch function.

    batcher = Batcher(engine.run_batch, max_batch=16, max_wait_s=0.005, queue_size=256)
    await batcher.start()
    answers = await batcher.submit([query], timeout_s=10.0)   # in a request handler
    await batcher.stop()                                      # drains what was accepted

The queue is bounded: :meth:`Batcher.submit` takes all of its queries or none and raises
:class:`Overloaded` at once when they do not fit, so a burst gets fast refusals instead of
an unbounded backlog. The worker takes the oldest query, then more until ``max_batch`` or
until ``max_wait_s`` after the oldest was queued, and runs ``batch_fn`` on them in a
thread (the event loop keeps answering meanwhile). A query whose caller gave up
(:class:`DeadlineExceeded`) before its batch started is dropped, never computed; every
other accepted query is computed once and its caller gets its answer once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Sequence

log = logging.getLogger("lcrec_jax.serve")


class Overloaded(Exception):
  """The queue cannot take the queries; ``retry_after`` seconds is a fair wait."""

  def __init__(self, message: str, retry_after: int = 1):
    super().__init__(message)
    self.retry_after = retry_after


class DeadlineExceeded(Exception):
  """The answer did not come within the request's deadline."""


@dataclasses.dataclass
class _Pending:
  query: Any
  future: asyncio.Future
  queued: float  # time.monotonic() when queued


class Batcher:
  """See the module docstring.

  Args:
    batch_fn: ``list[query] -> list[answer]`` (same length, same order); blocking.
    max_batch: most queries per call.
    max_wait_s: how long the oldest query may wait for company.
    queue_size: most queries waiting (not counting the batch being computed).
    on_batch: optional ``(size, seconds)`` callback after each call (metrics).
  """

  def __init__(self, batch_fn: Callable[[list[Any]], Sequence[Any]], *, max_batch: int,
               max_wait_s: float, queue_size: int,
               on_batch: Callable[[int, float], None] | None = None):
    if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
      raise ValueError(f"max_batch={max_batch} and queue_size={queue_size} must be >= 1, "
                       f"max_wait_s={max_wait_s} >= 0")
    self.batch_fn = batch_fn
    self.max_batch = max_batch
    self.max_wait_s = max_wait_s
    self.queue_size = queue_size
    self.on_batch = on_batch
    self._queue: asyncio.Queue[_Pending] | None = None
    self._worker: asyncio.Task | None = None
    self._batch_s = 0.1  # running mean seconds per call (for Retry-After)
    self.batches = 0
    self.computed = 0

  def depth(self) -> int:
    """Queries waiting (not yet in a batch)."""
    return 0 if self._queue is None else self._queue.qsize()

  def full(self) -> bool:
    """No room for one more query."""
    return self._queue is not None and self._queue.full()

  async def start(self) -> None:
    self._queue = asyncio.Queue(maxsize=self.queue_size)
    self._worker = asyncio.create_task(self._run(), name="lcrec-serve-batcher")

  async def stop(self) -> None:
    """Finishes every accepted query, then stops the worker."""
    if self._worker is None:
      return
    await self._queue.join()
    self._worker.cancel()
    try:
      await self._worker
    except asyncio.CancelledError:
      pass
    self._worker = None

  def retry_after(self) -> int:
    """Whole seconds until the queue is likely to have room (at least 1)."""
    return max(1, math.ceil(self.depth() / self.max_batch * self._batch_s))

  async def submit(self, queries: Sequence[Any], timeout_s: float) -> list[Any]:
    """The answers of ``queries``, in order.

    Raises:
      Overloaded: the queue has no room for all of them (none is queued), or the
        batcher is not running.
      DeadlineExceeded: not answered within ``timeout_s`` (those not yet started are
        dropped).
      Exception: what ``batch_fn`` raised for their batch.
    """
    if self._queue is None or self._worker is None:
      raise Overloaded("the server is not accepting requests (starting or stopping)")
    if self._queue.maxsize - self._queue.qsize() < len(queries):
      raise Overloaded(f"the request queue is full ({self._queue.qsize()} waiting, "
                       f"at most {self.queue_size})", self.retry_after())
    loop = asyncio.get_running_loop()
    now = time.monotonic()
    pending = [_Pending(q, loop.create_future(), now) for q in queries]
    for p in pending:
      self._queue.put_nowait(p)
    try:
      return list(await asyncio.wait_for(asyncio.gather(*(p.future for p in pending)),
                                         timeout_s))
    except asyncio.TimeoutError:
      raise DeadlineExceeded(f"no answer within the {timeout_s:g} s deadline") from None

  async def _collect(self) -> list[_Pending]:
    """The next batch: the oldest live query and up to ``max_batch - 1`` more."""
    batch: list[_Pending] = []
    while not batch:
      first = await self._queue.get()
      if first.future.done():  # its caller gave up
        self._queue.task_done()
        continue
      batch.append(first)
    until = first.queued + self.max_wait_s
    while len(batch) < self.max_batch:
      try:
        if self._queue.empty():
          left = until - time.monotonic()
          if left <= 0:
            break
          p = await asyncio.wait_for(self._queue.get(), left)
        else:
          p = self._queue.get_nowait()
      except asyncio.TimeoutError:
        break
      if p.future.done():
        self._queue.task_done()
      else:
        batch.append(p)
    return batch

  async def _run(self) -> None:
    while True:
      batch = await self._collect()
      t0 = time.perf_counter()
      try:
        answers = await asyncio.to_thread(self.batch_fn, [p.query for p in batch])
        if len(answers) != len(batch):
          raise RuntimeError(f"batch_fn gave {len(answers)} answers for {len(batch)} queries")
      except Exception as e:  # pylint: disable=broad-except
        log.exception("batch of %d failed", len(batch))
        for p in batch:
          if not p.future.done():
            p.future.set_exception(e)
      else:
        for p, a in zip(batch, answers):
          if not p.future.done():
            p.future.set_result(a)
      finally:
        seconds = time.perf_counter() - t0
        self._batch_s = 0.8 * self._batch_s + 0.2 * seconds
        self.batches += 1
        self.computed += len(batch)
        for _ in batch:
          self._queue.task_done()
        if self.on_batch is not None:
          self.on_batch(len(batch), seconds)
