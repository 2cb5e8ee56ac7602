"""Training summaries: the JSONL log, TensorBoard event files, FLOPs and MFU estimates.

`MetricsWriter` writes every logged step to `<logdir>/metrics.jsonl` (one JSON object a
line, read back by `read_jsonl`) and its scalars to TensorBoard event files in
`<logdir>/tb`, written by `tensorboardX` (the event-file format, TFRecord framing and
CRC-32C are its job). Why tensorboardX: it needs only numpy, packaging and protobuf,
all installed anyway; `flax.metrics.tensorboard` and clu's TensorBoard writer need
TensorFlow (and clu's last release is from 2024). tensorboardX is imported when the
first TensorBoard writer opens, with torch hidden from it (`_import_tensorboardx`): its
writer module imports torch when torch is installed (6-10 s on the 2-core CPU) only to
accept torch tensors, and every value written here is a Python or numpy number.

Files go through :mod:`lcrec_jax.fs`, so `logdir` may be a `gs://` path: for remote
paths tensorboardX is given `fs.AppendLog` objects as its event files (registered as
its writer factory for the `fs` remote schemes, which replaces tensorboardX's own
google-cloud-storage / boto3 writers in this process). Object stores cannot append:
there the files are rewritten whole, throttled (see `fs.AppendLog`).

Resume: `drop_after_step=N` drops the JSONL rows after step N, and the new TensorBoard
file starts with tensorboardX's `purge_step=N + 1` marker (a `SessionLog.START` event at
that step), on which TensorBoard discards the points at steps >= N + 1 that it read
from the older files of the same directory.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from lcrec_jax import fs

_TB_ILLEGAL = re.compile(r"[^-/\w\.]")


def tb_tag(name: str) -> str:
  """``valid/HR@10`` -> ``valid/HR_10``: the tag tensorboardX would use, renamed here so it
  does not log a line per illegal name on every write (metrics.jsonl keeps the name)."""
  return _TB_ILLEGAL.sub("_", name)

# --- TensorBoard (tensorboardX) -----------------------------------------------------


class _FsEventFiles:
  """tensorboardX writer factory: event files at remote paths are `fs.AppendLog`s."""

  def open(self, path: str) -> fs.AppendLog:
    # The caller decides which process writes (MetricsWriter: process 0 only).
    return fs.AppendLog(path, binary=True, all_processes=True)

  def directory_check(self, path: str) -> None:
    fs.makedirs(path)


_FACTORY_REGISTERED = False


def _import_tensorboardx():
  """``import tensorboardX`` without its optional ``import torch``.

  A ``None`` entry in ``sys.modules`` makes ``import torch`` raise ImportError, which
  tensorboardX's writer catches (it then accepts numpy arrays only, all we write). The
  entry is removed right after, so a later ``import torch`` in the process works; a torch
  already imported is left alone.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    if hide and sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return tensorboardX


def summary_writer(logdir: str | os.PathLike, purge_step: int | None = None):
  """A `tensorboardX.SummaryWriter` for `logdir` (local or remote, through `fs`).

  Args:
    logdir: directory of the event files.
    purge_step: on resume, the first step the new run logs again; TensorBoard then
      hides the points at steps >= `purge_step` from this directory's older files.

  Returns:
    The writer; its file is `events.out.tfevents.<s>.<host>.<ns>.<pid>`. The nanosecond
    clock in the name keeps files of one host in creation order even within a second
    (TensorBoard reads them sorted by name, and a purge marker must come after the
    points it hides).
  """
  global _FACTORY_REGISTERED
  tensorboardX = _import_tensorboardx()
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  if not _FACTORY_REGISTERED:
    for prefix in fs._REMOTE_PREFIXES:  # pylint: disable=protected-access
      record_writer.register_writer_factory(prefix.split(":")[0], _FsEventFiles())
    _FACTORY_REGISTERED = True
  suffix = f".{time.time_ns():020d}.{os.getpid()}"
  return tensorboardX.SummaryWriter(os.fspath(logdir), purge_step=purge_step,
                                    flush_secs=10, filename_suffix=suffix)


class MetricsWriter:
  """Writes metrics to `<logdir>/metrics.jsonl` and TensorBoard events in `<logdir>/tb`.

  Only process 0 writes (the others get a no-op writer) so pod runs don't clash.
  """

  def __init__(self, logdir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
               drop_after_step: int | None = None):
    """Opens the writers.

    Args:
      logdir: output directory.
      enabled: False gives a no-op writer (non-zero processes).
      tensorboard: also write TensorBoard events.
      drop_after_step: on resume, drop JSONL records with a step beyond this one (steps
        an interrupted run did after its last checkpoint, which are about to be redone),
        and have TensorBoard discard its points beyond it (`purge_step`).
    """
    self.enabled = enabled
    self.jsonl_path = fs.join(logdir, "metrics.jsonl")
    self._jsonl = None
    self._tb = None
    if enabled:
      fs.makedirs(logdir)
      if drop_after_step is not None and fs.exists(self.jsonl_path):
        kept = [r for r in read_jsonl(self.jsonl_path) if r.get("step", 0) <= drop_after_step]
        fs.write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in kept),
                      all_processes=True)
      self._jsonl = fs.AppendLog(self.jsonl_path, all_processes=True)
      if tensorboard:
        purge = None if drop_after_step is None else int(drop_after_step) + 1
        self._tb = summary_writer(fs.join(logdir, "tb"), purge_step=purge)

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
    """Appends one JSON line `{"step": step, **metrics}` and each scalar to TensorBoard."""
    if not self.enabled:
      return
    clean = {}
    for k, v in metrics.items():
      v = np.asarray(v)
      clean[prefix + k] = v.item() if v.ndim == 0 else v.tolist()
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and np.isfinite(v):
          self._tb.add_scalar(tb_tag(k), float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """All records of a metrics.jsonl file (local or `gs://`)."""
  return [json.loads(line) for line in fs.read_text(path).splitlines() if line.strip()]


# --- FLOPs / MFU ----------------------------------------------------------------------


def train_flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
  """Training FLOPs per token: 6 N (matmuls, fwd + bwd) + 12 L d T (attention scores).

  The attention term is PaLM's estimate (forward QK^T and AV, times 3 for backward)
  for a full causal sequence of length `seq_len`. With logits at label positions only
  and frozen (LoRA) weights the true count is lower; this is the usual upper estimate.
  """
  return 6.0 * num_params + 12.0 * num_layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float,
        num_devices: int) -> float | None:
  """Model FLOPs utilisation in [0, 1]; None without a peak figure."""
  if not peak_flops_per_device or peak_flops_per_device <= 0:
    return None
  return tokens_per_s * flops_per_token / (peak_flops_per_device * num_devices)
