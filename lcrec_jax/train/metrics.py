"""Training metrics: JSONL log, TensorBoard event files, FLOPs and MFU estimates.

TensorBoard: neither `tensorboard` nor TensorFlow is installed here (and
`flax.metrics.tensorboard` imports TensorFlow), so scalars are written directly in
the event-file format TensorBoard reads: a TFRecord stream (length, masked CRC-32C,
payload, masked CRC-32C) of `Event` protocol buffers, encoded by hand below
(Event{wall_time=1, step=2, file_version=3, summary=5}, Summary{value=1},
Summary.Value{tag=1, simple_value=2}).

Files go through :mod:`lcrec_jax.fs`, so `logdir` may be a `gs://` path (object stores
cannot append: there the files are rewritten whole, throttled, see `fs.AppendLog`).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from lcrec_jax import fs

# --- CRC-32C (Castagnoli), as TFRecord framing needs --------------------------------

_CRC32C_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC32C_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (crc32c(b'123456789') == 0xE3069283)."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 and add a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- minimal protobuf encoding -------------------------------------------------------


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field_bytes(num: int, payload: bytes) -> bytes:
  return _varint((num << 3) | 2) + _varint(len(payload)) + payload


def _scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
  value_msg = _field_bytes(1, tag.encode()) + bytes([(2 << 3) | 5]) + struct.pack("<f", value)
  summary = _field_bytes(1, value_msg)
  return (bytes([(1 << 3) | 1]) + struct.pack("<d", wall_time)
          + _varint((2 << 3) | 0) + _varint(int(step)) + _field_bytes(5, summary))


def _version_event(wall_time: float) -> bytes:
  return bytes([(1 << 3) | 1]) + struct.pack("<d", wall_time) + _field_bytes(3, b"brain.Event:2")


def tfrecord_frame(payload: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of it, payload, masked CRC of payload."""
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", masked_crc32c(header)) + payload
          + struct.pack("<I", masked_crc32c(payload)))


def read_tfrecords(path: str | os.PathLike) -> list[bytes]:
  """Reads and CRC-checks a TFRecord file (for tests); returns the payloads."""
  out = []
  data = fs.read_bytes(path)
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (n,) = struct.unpack("<Q", header)
    (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    if hcrc != masked_crc32c(header):
      raise ValueError(f"{path}: bad length CRC at byte {pos}")
    payload = data[pos + 12:pos + 12 + n]
    (pcrc,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
    if pcrc != masked_crc32c(payload):
      raise ValueError(f"{path}: bad payload CRC at byte {pos}")
    out.append(payload)
    pos += 16 + n
  return out


class TensorBoardWriter:
  """Appends scalar summaries to a TensorBoard event file in `logdir`."""

  def __init__(self, logdir: str | os.PathLike):
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self.path = fs.join(logdir, name)
    # The caller decides which process writes (MetricsWriter: process 0 only).
    self._f = fs.AppendLog(self.path, binary=True, all_processes=True)
    self._f.write(tfrecord_frame(_version_event(now)))
    self._f.flush(force=True)

  def scalar(self, tag: str, value: float, step: int) -> None:
    """Writes one scalar summary."""
    self._f.write(tfrecord_frame(_scalar_event(tag, float(value), step, time.time())))

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()


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
        an interrupted run did after its last checkpoint, which are about to be redone).
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
        self._tb = TensorBoardWriter(fs.join(logdir, "tb"))

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
          self._tb.scalar(k, v, step)
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
