"""One training-loop skeleton: the step loop over (epoch, position) and its periodic actions.

    loop = Loop(train_step, batches, state, num_steps=600, steps_per_epoch=200,
                on_step=log_metrics, step_actions=[Periodic(save, every=100, at_end=True)],
                preempted=ckpt.reached_preemption, on_preempt=save, progress=bar)
    outcome = loop.run()   # loop.state: the state after the last step

Every trainer (LLM, RQ-VAE, sequential baselines) keeps only its model, loss, step
function and data; this skeleton owns the rest, in the manner of the Flax examples' train
loops and clu's periodic actions:

* the state: `state, metrics = step_fn(state, batch)` every step, `loop.state` the
  newest (actions and callbacks read it there);
* the walk over epochs and positions: `batches(epoch, pos)` is asked for the rest of
  epoch `epoch` from position `pos` on (a resumed run starts mid-epoch), at most
  `steps_per_epoch - pos` batches are taken, and an epoch that yields none is an error;
* fetching metrics to the host (`fetch`): "late" reads step N's metrics only after step
  N+1 has been dispatched, so the host never waits on the device between two steps (as
  MaxText does); "sync" reads them right after their step; "epoch" reads all the metrics
  of an epoch in one transfer at its end;
* periodic actions (:class:`Periodic`): every `every` steps (or epochs) and/or at the
  last one, each run after the metrics of its own step (or epoch) were delivered and
  before the next step is dispatched: the loop synchronises on those steps only. An
  action that returns :data:`STOP` ends the loop (early stopping);
* preemption: `preempted(step)` is asked after every step; when it says so, the metrics
  still pending are delivered, the actions due run, then `on_preempt` (a checkpoint save),
  and the loop stops (at the last step it is a normal end);
* progress: one :class:`lcrec_jax.progress.Progress` unit per step (or per epoch when
  there are epoch callbacks); the loop closes it.

`on_step` sees every step's host metrics in order, exactly once, with the same values
whichever `fetch` is used. It may raise (a non-finite loss, a test's crash): with "late"
step N+1 has then been dispatched, but no action has seen it, so nothing of it is saved.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

from lcrec_jax import progress as progress_lib

STOP = "stop"  # returned by an action: end the loop after this step / epoch
FETCH = ("late", "sync", "epoch")


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a run stands: optimizer steps done, epoch (0-based), batches done in it."""
  step: int = 0
  epoch: int = 0
  pos: int = 0


@dataclasses.dataclass
class StepInfo:
  """One finished step, as `on_step` and step actions see it.

  Attributes:
    step: optimizer steps done after it (1-based count).
    epoch: its epoch (0-based).
    pos: batches of that epoch done after it.
    metrics: its metrics on the host, `{name: float}`.
    time_s: host seconds between this step's metrics and the previous one's.
  """
  step: int
  epoch: int
  pos: int
  metrics: dict[str, float]
  time_s: float
  steps_per_epoch: int = 0

  def data_position(self) -> dict[str, int]:
    """The data position to resume after this step: `{"epoch", "step_in_epoch"}`."""
    if self.pos >= self.steps_per_epoch:
      return {"epoch": self.epoch + 1, "step_in_epoch": 0}
    return {"epoch": self.epoch, "step_in_epoch": self.pos}


@dataclasses.dataclass
class EpochInfo:
  """One finished epoch: `number` = epoch + 1, its steps' infos, when it started."""
  epoch: int
  step: int
  steps: list[StepInfo]
  started: float  # time.perf_counter() before its batches were asked for

  @property
  def number(self) -> int:
    return self.epoch + 1

  def elapsed_s(self) -> float:
    """Seconds since the epoch started (its actions so far included)."""
    return time.perf_counter() - self.started

  def mean(self, key: str, weights: Sequence[float] | None = None) -> float:
    """Mean of metric `key` over the epoch's steps (weighted: sum(w * m) / sum(w))."""
    w = [1.0] * len(self.steps) if weights is None else weights
    return float(sum(s.metrics[key] * x for s, x in zip(self.steps, w))) / sum(w)


@dataclasses.dataclass(frozen=True)
class Periodic:
  """An action run at every `every`-th step (or epoch; 0 = never) and/or at the last one.

  `fn(info)` gets the :class:`StepInfo` (or :class:`EpochInfo`); returning :data:`STOP`
  ends the loop.
  """
  fn: Callable[[Any], Any]
  every: int = 0
  at_end: bool = False

  def due(self, n: int, last: bool) -> bool:
    return (self.every > 0 and n % self.every == 0) or (self.at_end and last)


@dataclasses.dataclass
class Outcome:
  """How `Loop.run` ended: `reason` is "done", "preempted" or "stopped" (an action's STOP)."""
  step: int
  epoch: int
  steps_run: int
  reason: str


class Loop:
  """The step loop of a trainer (see the module docstring).

  Args:
    step_fn: `(state, batch) -> (state, metrics)`, metrics a dict of device scalars.
    batches: `(epoch, pos) -> iterable` of batches of `epoch` from `pos` on.
    state: the state before the first step (kept in `loop.state`).
    num_steps: total optimizer steps of the run (including steps before `start`).
    steps_per_epoch: batches per epoch (> 0).
    start: where a resumed run starts.
    fetch: "late" | "sync" | "epoch" (when the host reads the metrics).
    on_step: `StepInfo -> None`, every step in order.
    step_actions: periodic actions counted in steps.
    on_epoch: `EpochInfo -> None` at the end of every epoch (its steps' metrics read).
    epoch_actions: periodic actions counted in epochs (1-based), after `on_epoch`.
    preempted: `step -> bool`, asked after every step.
    on_preempt: `StepInfo -> None` run when `preempted` says so (before the last step).
    progress: advanced by one per step, or per epoch when `on_epoch` or
      `epoch_actions` are given; closed when the loop ends.
    name: how error messages name the loop.
  """

  def __init__(self, step_fn: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]],
               batches: Callable[[int, int], Iterable[Any]], state: Any, *, num_steps: int,
               steps_per_epoch: int, start: Position = Position(), fetch: str = "late",
               on_step: Callable[[StepInfo], None] | None = None,
               step_actions: Sequence[Periodic] = (),
               on_epoch: Callable[[EpochInfo], None] | None = None,
               epoch_actions: Sequence[Periodic] = (),
               preempted: Callable[[int], bool] | None = None,
               on_preempt: Callable[[StepInfo], None] | None = None,
               progress: progress_lib.Progress | None = None, name: str = "train"):
    if steps_per_epoch <= 0:
      raise ValueError(f"{name}: steps_per_epoch must be positive, got {steps_per_epoch}")
    if fetch not in FETCH:
      raise ValueError(f"{name}: fetch must be one of {FETCH}, got {fetch!r}")
    self.step_fn, self.batches, self.state = step_fn, batches, state
    self.step = start.step  # steps done so far
    self.num_steps, self.steps_per_epoch = int(num_steps), int(steps_per_epoch)
    self.start, self.fetch, self.name = start, fetch, name
    self.on_step, self.step_actions = on_step, tuple(step_actions)
    self.on_epoch, self.epoch_actions = on_epoch, tuple(epoch_actions)
    self.preempted, self.on_preempt = preempted, on_preempt
    self.progress = progress
    self._per_epoch = on_epoch is not None or bool(self.epoch_actions)
    self._pending: list[tuple[StepInfo, Any]] = []
    self._done: list[StepInfo] = []
    self._t_last = 0.0

  # -- metrics ---------------------------------------------------------------------------

  def _deliver(self, upto: int) -> None:
    """Reads the metrics of every pending step up to `upto` (one transfer) and reports them."""
    ready = [p for p in self._pending if p[0].step <= upto]
    if not ready:
      return
    self._pending = self._pending[len(ready):]
    host = jax.device_get([m for _, m in ready])
    now = time.perf_counter()
    n = len(ready)
    for (info, _), m in zip(ready, host):
      info.metrics = {key: float(v) for key, v in m.items()}
      if self.fetch == "epoch":  # one read for many steps: spread its time over them
        info.time_s = (now - self._t_last) / n
      else:
        info.time_s = now - self._t_last
      if self._per_epoch:
        self._done.append(info)
      if self.on_step is not None:
        self.on_step(info)
      if self.progress is not None and not self._per_epoch:
        self.progress.update(1)
    self._t_last = now

  # -- the loop --------------------------------------------------------------------------

  def run(self) -> Outcome:
    """Runs steps from `start` to `num_steps` (or until preempted / stopped)."""
    step, epoch, pos = self.start.step, self.start.epoch, self.start.pos
    steps_run, reason = 0, "done"
    self._t_last = time.perf_counter()
    try:
      while step < self.num_steps and reason == "done":
        t_epoch = time.perf_counter()
        source = itertools.islice(iter(self.batches(epoch, pos)), self.steps_per_epoch - pos)
        ran_in_epoch, broke = 0, False
        for batch in source:
          self.state, metrics = self.step_fn(self.state, batch)
          step, pos, steps_run, ran_in_epoch = step + 1, pos + 1, steps_run + 1, ran_in_epoch + 1
          self.step = step
          info = StepInfo(step, epoch, pos, {}, 0.0, self.steps_per_epoch)
          self._pending.append((info, metrics))
          if self.fetch == "sync":
            self._deliver(step)
          elif self.fetch == "late":
            self._deliver(step - 1)  # step N-1, while step N runs
          last = step >= self.num_steps
          due = [a for a in self.step_actions if a.due(step, last)]
          preempt = bool(self.preempted(step)) if self.preempted is not None else False
          if due or last or preempt:
            self._deliver(step)
          for a in due:
            if a.fn(info) is STOP:
              reason = "stopped"
          if last or reason != "done":
            broke = True
            break
          if preempt:
            if self.on_preempt is not None:
              self.on_preempt(info)
            reason, broke = "preempted", True
            break
        if ran_in_epoch == 0 and pos == 0:
          raise ValueError(f"{self.name}: batches({epoch}, 0) yielded no batch")
        # an epoch ends when its batches ran out (or reached steps_per_epoch) or the run did
        if self._per_epoch and (not broke or pos >= self.steps_per_epoch
                                or step >= self.num_steps):
          self._deliver(step)
          e_info = EpochInfo(epoch, step, self._done, t_epoch)
          self._done = []
          if self.on_epoch is not None:
            self.on_epoch(e_info)
          last = step >= self.num_steps
          for a in self.epoch_actions:
            if a.due(e_info.number, last) and a.fn(e_info) is STOP:
              reason = "stopped"
          if self.progress is not None:
            self.progress.update(1)
        if reason == "done" and step < self.num_steps:
          epoch, pos = epoch + 1, 0
      self._deliver(step)
    finally:
      if self.progress is not None:
        self.progress.close()
    return Outcome(step=step, epoch=epoch, steps_run=steps_run, reason=reason)
