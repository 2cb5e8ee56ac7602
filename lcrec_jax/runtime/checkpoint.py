"""Orbax checkpoints of the train state plus the data position, with preemption saves.

Layout: `<workdir>/checkpoints/<step>/{state, data}`: `state` is the whole
`TrainState` (params, optimizer state, step, RNG) as an orbax PyTree, `data` a small
JSON with the data position (epoch, step within the epoch) and anything else the
trainer wants back. Orbax writes into a temporary directory and renames it at the
end, so a killed save never looks like a finished checkpoint. The directory is an
`epath.Path`, so it may be `gs://...`: orbax handles directories through epath and
writes array data with TensorStore's own GCS driver.

Fallback: :func:`restore_newest` (used by :meth:`Checkpointer.restore_latest` and the
RQ-VAE trainer) tries the checkpoints newest first. One that fails to load (a truncated
or zeroed array file, deleted metadata, a missing item, non-finite values) is moved
aside to ``<step>.corrupt-<n>`` (renamed, never deleted), a warning names it and why,
and the next older one is used. When none loads, a :class:`WorkdirError` says so and
nothing is moved.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from lcrec_jax import fs
from lcrec_jax.errors import UserError, WorkdirError


def _reason(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  text = lines[0] if lines else ""
  return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def set_aside(directory: epath.Path, step: int, why: str = "corrupt") -> epath.Path:
  """Renames ``directory/<step>`` to the first free ``directory/<step>.<why>-<n>``."""
  directory = epath.Path(directory)
  n = 1
  while (directory / f"{step}.{why}-{n}").exists():
    n += 1
  dest = directory / f"{step}.{why}-{n}"
  if fs.is_primary():
    (directory / str(step)).rename(dest)
  fs.barrier(f"checkpoint_set_aside_{step}_{why}_{n}")
  return dest


def restore_newest(manager: ocp.CheckpointManager, directory: str | os.PathLike,
                   restore_fn: Callable[[int], Any], what: str,
                   is_finite: Callable[[Any], bool] | None = None) -> tuple[int | None, Any]:
  """Restores the newest checkpoint of ``manager`` that loads, moving broken ones aside.

  Args:
    manager: the orbax manager over ``directory``.
    directory: its root (step directories ``<step>/`` inside).
    restore_fn: ``step -> restored`` (raises on a broken checkpoint; a
      :class:`UserError` it raises, such as a config mismatch, is passed on as it is).
    what: how messages name the checkpoints, e.g. ``"train"``.
    is_finite: ``restored -> bool``; a checkpoint with NaN/inf values counts as broken.

  Returns:
    ``(step, restored)``, or ``(None, None)`` when there is no checkpoint at all.

  Raises:
    WorkdirError: there are checkpoints but none loads (none is moved then).
  """
  directory = epath.Path(directory)
  steps = sorted(manager.all_steps(), reverse=True)
  failed: list[tuple[int, str]] = []
  for step in steps:
    try:
      out = restore_fn(step)
      if is_finite is not None and not is_finite(out):
        raise FloatingPointError("holds NaN/inf values")
    except UserError:  # e.g. a checkpoint of another config: not a broken one
      raise
    except Exception as e:  # orbax/TensorStore errors have no common base class
      failed.append((step, _reason(e)))
      continue
    for bad, why in failed:
      dest = set_aside(directory, bad)
      logging.warning("%s: checkpoint %s does not load (%s); moved it to %s and resumed from "
                      "step %d", what, directory / str(bad), why, dest, step)
    if failed:
      manager.reload()
    return step, out
  if failed:
    listed = "; ".join(f"step {s}: {why}" for s, why in failed)
    raise WorkdirError(f"{what}: no checkpoint under {directory} loads ({listed})",
                       hint=f"delete {directory} to start this stage over")
  return None, None


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for `TrainState` + data position.

  Saves every `save_every` steps (async by default), keeps the newest `keep`,
  and saves off-schedule when a preemption notice arrives (orbax's multi-host
  preemption sync point, or SIGTERM on a single host).
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int = 100, keep: int = 2,
               async_save: bool = True):
    """Opens (or creates) the checkpoint directory.

    Args:
      directory: where step directories go.
      save_every: steps between scheduled saves (`train.checkpoint_every`).
      keep: newest checkpoints kept (`train.keep_checkpoints`); <= 0 keeps all.
      async_save: write in a background thread after the device-to-host copy.
    """
    self.directory = epath.Path(directory)
    self.save_every = max(int(save_every), 1)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=self.save_every,
        max_to_keep=keep if keep and keep > 0 else None,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"))
    self._sigterm = threading.Event()
    self._old_handler: Any = None

  # -- preemption ---------------------------------------------------------------------

  def install_sigterm_handler(self) -> None:
    """On SIGTERM, ask the loop to save and stop (single host; orbax handles pods)."""
    if threading.current_thread() is not threading.main_thread():
      return
    self._old_handler = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: self._sigterm.set())

  def uninstall_sigterm_handler(self) -> None:
    """Restores the SIGTERM handler that was there before `install_sigterm_handler`."""
    if self._old_handler is not None:
      signal.signal(signal.SIGTERM, self._old_handler)
      self._old_handler = None

  def request_stop(self) -> None:
    """Same as receiving SIGTERM: the loop saves at the next step and returns."""
    self._sigterm.set()

  def reached_preemption(self, step: int) -> bool:
    """True when the run should save now and stop (preemption notice or SIGTERM)."""
    if self._sigterm.is_set() and jax.process_count() == 1:
      return True
    return bool(self._manager.reached_preemption(step))

  # -- save / restore -----------------------------------------------------------------

  def reload(self) -> None:
    """Re-reads the step directories (after some were moved aside)."""
    self._manager.reload()

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all finished checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether the schedule (every `save_every` steps) asks for a save at `step`."""
    return step % self.save_every == 0

  def save(self, step: int, state: Any, data: dict[str, Any], force: bool = False) -> bool:
    """Saves `state` and the JSON-able `data` at `step` (scheduled, or always if `force`).

    Returns:
      Whether a save was started.
    """
    if not force and not self.should_save(step):
      return False
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data)),
        force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores the state into the shardings of `abstract_state`, and the data dict.

    Args:
      abstract_state: tree of `jax.ShapeDtypeStruct` with `.sharding` set (see
        `state.abstract_state`); arrays are read straight into those shardings.
      step: which checkpoint (default: the latest).

    Returns:
      (state, data).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"checkpoint: no finished checkpoint under {self.directory}")
    out = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return out["state"], dict(out["data"])

  def restore_latest(self, abstract_state: Any) -> tuple[int | None, Any, dict[str, Any]]:
    """The newest checkpoint that loads and is finite: ``(step, state, data)``.

    Broken newer ones are moved aside (see :func:`restore_newest`); ``(None, None, None)``
    when there is none.

    Raises:
      WorkdirError: checkpoints exist but none loads.
    """
    from lcrec_jax.runtime import finite  # pylint: disable=g-import-not-at-top
    check = jax.jit(finite.all_finite)

    def load(step: int) -> tuple[Any, dict[str, Any]]:
      state, data = self.restore(abstract_state, step)
      for key in ("epoch", "step_in_epoch"):
        int(data[key])  # a data position that lacks a field does not load
      return state, data

    step, out = restore_newest(self._manager, self.directory, load, "train",
                               is_finite=lambda o: bool(check(o[0])))
    if step is None:
      return None, None, None
    return step, out[0], out[1]

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for saves and releases the manager's threads."""
    self.uninstall_sigterm_handler()
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
