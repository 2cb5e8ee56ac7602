"""Reads TensorBoard event files back for tests, without TensorBoard or TensorFlow.

The TFRecord framing is checked with tensorboardX's own masked CRC-32C and each record
is parsed with tensorboardX's `Event` protocol buffer. `scalars` then does what
TensorBoard does with a directory: it reads the event files sorted by name and, on a
`SessionLog.START` event at step S (tensorboardX's `purge_step`), drops the points at
steps >= S read so far.
"""

import struct

from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from lcrec_jax import fs


def read_events(path: str) -> list[event_pb2.Event]:
  """The `Event`s of one event file (local or `gs://`), CRC-checked."""
  data, pos, out = fs.read_bytes(path), 0, []
  while pos < len(data):
    header = data[pos:pos + 8]
    (n,) = struct.unpack("<Q", header)
    (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert hcrc == masked_crc32c(header), f"{path}: bad length CRC at byte {pos}"
    payload = data[pos + 12:pos + 12 + n]
    (pcrc,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
    assert pcrc == masked_crc32c(payload), f"{path}: bad payload CRC at byte {pos}"
    out.append(event_pb2.Event.FromString(payload))
    pos += 16 + n
  return out


def scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """`{tag: [(step, value), ...]}` as TensorBoard shows `logdir` (purges applied)."""
  points: dict[str, list[tuple[int, float]]] = {}
  for name in fs.listdir(logdir):  # sorted by name, as TensorBoard reads them
    if ".tfevents." not in name:
      continue
    for ev in read_events(fs.join(logdir, name)):
      if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
        points = {t: [p for p in ps if p[0] < ev.step] for t, ps in points.items()}
      for v in ev.summary.value:
        points.setdefault(v.tag, []).append((ev.step, v.simple_value))
  return points
