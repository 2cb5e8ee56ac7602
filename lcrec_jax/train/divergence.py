"""The way out of a divergence: resume from the newest checkpoint whose loss is no spike.

A non-finite step is never applied (:mod:`lcrec_jax.train.trainer`), so every checkpoint
is finite, but "finite" is not "healthy": at a far too high ``train.lr`` the checkpoints
just before the NaN already hold ruined params, and resuming from the newest one diverges
again at once. So:

* every train checkpoint carries its step's training loss (``loss`` in the data position,
  ``<workdir>/train/checkpoints/<step>/data/metadata``);
* a non-finite stop writes ``<workdir>/train/DIVERGED.json`` (``{"step", "loss",
  "checkpoint"}``);
* the next run (with a lower ``train.lr``, see ``workdir.RESUMABLE``) resumes from the
  newest checkpoint whose loss is at most ``SPIKE_FACTOR`` (3) times the best training
  loss seen up to the stop: the lowest of the checkpoints' losses and of the losses
  logged in ``train/metrics.jsonl``. Newer checkpoints are moved aside to
  ``<step>.spike-<n>`` (never deleted); when none qualifies, training starts over from
  step 0. The plan line and a warning say which. A checkpoint without a recorded loss
  (written before this rule) counts as healthy. The marker is removed once the choice is
  made; ``--force=train`` starts training over regardless.

Only file reads here (no JAX, no orbax), so the plan can say what the run will do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

from lcrec_jax import fs

MARKER = "DIVERGED.json"
SPIKE_FACTOR = 3.0


def marker_path(train_dir: str) -> str:
  return fs.join(train_dir, MARKER)


def write_marker(train_dir: str, step: int, loss: float, checkpoint: int | None) -> None:
  """Records a non-finite stop (process 0)."""
  fs.write_json(marker_path(train_dir), {
      "step": int(step), "loss": loss if math.isfinite(loss) else str(loss),
      "checkpoint": checkpoint, "time": time.strftime("%Y-%m-%d %H:%M:%S")})


def read_marker(train_dir: str) -> dict[str, Any] | None:
  p = marker_path(train_dir)
  if not fs.exists(p):
    return None
  try:
    m = fs.read_json(p)
  except (OSError, ValueError):
    return {"step": None}
  return m if isinstance(m, dict) else {"step": None}


def _finite(x: Any) -> float | None:
  try:
    v = float(x)
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def checkpoint_losses(ckpt_dir: str) -> dict[int, float | None]:
  """``{step: loss or None}`` of the finished checkpoints under ``ckpt_dir``."""
  if not fs.isdir(ckpt_dir):
    return {}
  out: dict[int, float | None] = {}
  for name in fs.listdir(ckpt_dir):
    if not name.isdigit():  # orbax temporaries, <step>.corrupt-<n>, <step>.spike-<n>
      continue
    meta = fs.join(ckpt_dir, name, "data", "metadata")
    loss = None
    try:
      loss = _finite(fs.read_json(meta).get("loss"))
    except (OSError, ValueError, AttributeError):
      pass
    out[int(name)] = loss
  return out


def _logged_losses(train_dir: str, upto: int | None) -> list[float]:
  p = fs.join(train_dir, "metrics.jsonl")
  if not fs.exists(p):
    return []
  out = []
  for line in fs.read_text(p).splitlines():
    try:
      r = json.loads(line)
    except ValueError:
      continue
    v = _finite(r.get("train/loss"))
    if v is not None and (upto is None or int(r.get("step", 0)) <= upto):
      out.append(v)
  return out


@dataclasses.dataclass(frozen=True)
class Choice:
  """Where a run after a non-finite stop resumes.

  Attributes:
    stopped_at: the step that was not finite.
    step: the checkpoint to resume from, or None (start over).
    loss: its loss (None: not recorded).
    best: the best training loss up to the stop (None: none known).
    spikes: ``[(step, loss)]`` of the newer checkpoints set aside, newest first.
  """
  stopped_at: int | None
  step: int | None
  loss: float | None
  best: float | None
  spikes: tuple[tuple[int, float], ...]

  def describe(self) -> str:
    """One clause for the plan line and the warning."""
    head = f"after the non-finite stop at step {self.stopped_at}"
    bad = ", ".join(f"{s} (loss {x:.4g})" for s, x in self.spikes)
    rule = (f" > {SPIKE_FACTOR:g}x the best loss {self.best:.4g}" if self.best is not None
            else "")
    aside = f"; checkpoint {bad}{rule}: a spike, set aside" if self.spikes else ""
    if self.step is None and not self.spikes:
      return f"{head} there is no checkpoint; training starts over"
    if self.step is None:
      return f"{head} no checkpoint is below the spike rule{aside}; training starts over"
    loss = f" (loss {self.loss:.4g})" if self.loss is not None else ""
    return f"{head} it resumes from checkpoint {self.step}{loss}{aside}"


def choose(train_dir: str) -> Choice | None:
  """The resume point after a non-finite stop, or None when the last run did not stop so
  (the ordinary newest-checkpoint resume applies)."""
  marker = read_marker(train_dir)
  if marker is None:
    return None
  stopped = marker.get("step")
  losses = checkpoint_losses(fs.join(train_dir, "checkpoints"))
  known = [x for x in losses.values() if x is not None]
  known += _logged_losses(train_dir, stopped)
  best = min(known) if known else None
  spikes = []
  for step in sorted(losses, reverse=True):
    loss = losses[step]
    if loss is None or best is None or loss <= SPIKE_FACTOR * best:
      return Choice(stopped, step, loss, best, tuple(spikes))
    spikes.append((step, loss))
  return Choice(stopped, None, None, best, tuple(spikes))
