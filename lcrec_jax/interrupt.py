"""Ctrl-C (SIGINT) that is never lost.

Python turns SIGINT into a ``KeyboardInterrupt`` wherever the main thread happens to be.
Inside orbax that can be swallowed: ``CheckpointManager.wait_until_finished`` (run
before every save, to finish the previous async one) catches ``BaseException`` around
its thread join and only logs it, so a Ctrl-C sent while a checkpoint was being
finalised was ignored and training ran to its last step.

:func:`install` (``lcrec_jax.main``) replaces the SIGINT handler with one that first
records the request, then raises ``KeyboardInterrupt`` as usual. Code that can stop
cleanly asks :func:`requested` (the train loop saves a checkpoint at its next step and
stops, as on a preemption notice), and inside :func:`graceful` the first Ctrl-C only
records the request (a second one raises at once). :func:`raise_if_requested` turns a
request that something swallowed into the ``KeyboardInterrupt`` after all.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

_requested = threading.Event()
_graceful_depth = 0
_previous: Any = None


def _handler(signum: int, frame: Any) -> None:
  del signum, frame
  first = not _requested.is_set()
  _requested.set()
  if first and _graceful_depth > 0:
    return  # the loop saves at its next step and stops
  raise KeyboardInterrupt


def install() -> None:
  """Installs the recording SIGINT handler (main thread only; else a no-op)."""
  global _previous
  if threading.current_thread() is not threading.main_thread():
    return
  _requested.clear()
  _previous = signal.signal(signal.SIGINT, _handler)


def uninstall() -> None:
  """Restores the SIGINT handler that :func:`install` replaced."""
  global _previous
  if _previous is not None and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _previous)
    _previous = None


def requested() -> bool:
  """Whether Ctrl-C was pressed since :func:`install`."""
  return _requested.is_set()


def request() -> None:
  """As if Ctrl-C had been pressed (tests)."""
  _requested.set()


def clear() -> None:
  _requested.clear()


def raise_if_requested() -> None:
  """Raises ``KeyboardInterrupt`` when a Ctrl-C was recorded (and maybe swallowed)."""
  if _requested.is_set():
    raise KeyboardInterrupt


@contextlib.contextmanager
def graceful() -> Iterator[None]:
  """Within the block the first Ctrl-C only records the request (see the module doc)."""
  global _graceful_depth
  _graceful_depth += 1
  try:
    yield
  finally:
    _graceful_depth -= 1
