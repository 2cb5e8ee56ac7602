"""One progress helper for every long phase (embedding, task build, RQ-VAE, training,
evaluation, baselines).

On a terminal it draws a tqdm bar. Otherwise (a pod worker, ``nohup``, a notebook's
subprocess, CI) a bar would either be invisible or spam carriage returns into a log
file, so it logs a line every ``every_s`` seconds through absl logging instead::

    rqvae: 120/300 epochs (40%), 3.1 epochs/s, 39 s elapsed, 58 s left, loss 0.0123

Usage::

    with progress.Progress(total=len(batches), desc="MiniLM", unit="batch") as p:
      for b in batches:
        ...
        p.update(1, loss=0.12)        # optional postfix values

    for x in progress.track(items, desc="tasks", unit="record"):
      ...

The first update is left out of the rate (it usually includes JIT compilation), so the
time left is not skewed by compile time. Only process 0 reports (``jax.process_index``
when JAX is already imported; other processes stay quiet).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from absl import logging

T = TypeVar("T")

DEFAULT_EVERY_S = 30.0


def _is_primary() -> bool:
  jax = sys.modules.get("jax")
  if jax is None:
    return True
  try:
    return jax.process_index() == 0
  except Exception:  # backend not initialised yet: treat as the only process
    return True


def stderr_is_terminal() -> bool:
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):
    return False


def _fmt_s(s: float) -> str:
  s = max(0.0, s)
  if s < 90:
    return f"{s:.0f} s"
  if s < 5400:
    return f"{int(s // 60)} min {int(s % 60):02d} s"
  return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _fmt_v(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


class Progress:
  """Progress of ``total`` units of work: a tqdm bar on a terminal, else log lines.

  Args:
    total: units of work expected (``None`` or 0: unknown, no percentage or time left).
    desc: what runs, e.g. ``"rqvae"``; starts every line.
    unit: the unit's name (``"epoch"``, ``"batch"``, ``"user"``).
    initial: units already done (a resumed run).
    every_s: seconds between log lines when no bar is drawn (``LCREC_PROGRESS_S``
      overrides the default).
    bar: ``True`` bar, ``False`` log lines, ``None`` bar only on a terminal.
    enabled: ``False`` reports nothing at all.
  """

  def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0,
               every_s: float | None = None, bar: bool | None = None, enabled: bool = True):
    self.total = int(total) if total else 0
    self.desc, self.unit = desc, unit
    self.n = int(initial)
    if every_s is None:
      every_s = float(os.environ.get("LCREC_PROGRESS_S", DEFAULT_EVERY_S))
    self.every_s = float(every_s)
    self.enabled = bool(enabled) and _is_primary()
    use_bar = stderr_is_terminal() if bar is None else bar
    self._bar = None
    if self.enabled and use_bar:
      import tqdm
      self._bar = tqdm.tqdm(total=self.total or None, initial=self.n, desc=desc, unit=unit,
                            leave=False, file=sys.stderr)
    self._t0 = time.perf_counter()
    self._t_last_log = self._t0
    self._t_rate = None  # time and count after the first update (compile excluded)
    self._n_rate = self.n
    self._postfix: dict[str, Any] = {}
    self.lines_logged = 0

  # -- reporting -------------------------------------------------------------------------
  def rate(self) -> float | None:
    """Units per second since the first update, or None before two updates."""
    if self._t_rate is None:
      return None
    dt = time.perf_counter() - self._t_rate
    done = self.n - self._n_rate
    return done / dt if dt > 0 and done > 0 else None

  def line(self) -> str:
    """The log line for the current state."""
    parts = [f"{self.desc}: {self.n}"]
    if self.total:
      parts[0] += f"/{self.total} {self.unit}s ({100.0 * self.n / self.total:.0f}%)"
    else:
      parts[0] += f" {self.unit}s"
    r = self.rate()
    if r is not None:
      parts.append(f"{r:.3g} {self.unit}s/s" if r >= 1 else f"{1 / r:.3g} s/{self.unit}")
    parts.append(f"{_fmt_s(time.perf_counter() - self._t0)} elapsed")
    if r is not None and self.total:
      parts.append(f"{_fmt_s((self.total - self.n) / r)} left")
    parts += [f"{k} {_fmt_v(v)}" for k, v in self._postfix.items()]
    return ", ".join(parts)

  def update(self, n: int = 1, **postfix: Any) -> None:
    """Marks ``n`` more units done; keyword values are shown after the counts."""
    self.n += int(n)
    if postfix:
      self._postfix.update(postfix)
    if not self.enabled:
      return
    now = time.perf_counter()
    if self._t_rate is None:  # leave the first (compiling) update out of the rate
      self._t_rate, self._n_rate = now, self.n
    if self._bar is not None:
      self._bar.update(int(n))
      if postfix:
        self._bar.set_postfix({k: _fmt_v(v) for k, v in self._postfix.items()}, refresh=False)
      return
    if now - self._t_last_log >= self.every_s:
      self._log()

  def set_postfix(self, **postfix: Any) -> None:
    self._postfix.update(postfix)
    if self._bar is not None:
      self._bar.set_postfix({k: _fmt_v(v) for k, v in self._postfix.items()}, refresh=False)

  def _log(self) -> None:
    logging.info("%s", self.line())
    self._t_last_log = time.perf_counter()
    self.lines_logged += 1

  def close(self) -> None:
    """Ends the bar; without a bar, logs a final line if the phase ran over ``every_s``."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif time.perf_counter() - self._t0 >= self.every_s and self.lines_logged:
      self._log()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def track(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
          **kwargs: Any) -> Iterator[T]:
  """Yields ``items`` while reporting progress (``total`` defaults to ``len(items)``)."""
  if total is None:
    try:
      total = len(items)  # type: ignore[arg-type]
    except TypeError:
      total = None
  with Progress(total, desc, unit, **kwargs) as p:
    for x in items:
      yield x
      p.update(1)
