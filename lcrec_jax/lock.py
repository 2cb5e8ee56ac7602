"""One run at a time per workdir: an OS file lock held for the whole ``main`` run.

    with WorkdirLock(workdir):
      ... every stage ...

The lock is ``fcntl.flock`` on ``<workdir>/.lock``, a file that also holds who has it
(``{"pid", "host", "started"}``) for the message a second run gets::

    main: error: /runs/x is in use by another run (pid 4242 on vm-1, started 2026-12-04 18:31:07)

The kernel releases a flock when its process dies (``kill -9``, a crash, a lost session),
so a lock left by a dead process is not a lock: the next run takes it over (and says
whose it was). The holder's details are read only for the message.

``gs://`` workdirs: an object store has no lock, so the lock file goes to the local
``$TMPDIR/lcrec-locks/<hash of the workdir>.lock``: it keeps two runs on this machine
apart, not two machines; a warning says so. In a multi-host run only process 0 takes it
(the other processes of the same run share the workdir by design).

Read-only commands (``recommend``, a server) take no lock: they never write the workdir.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from typing import Any

from absl import logging

from lcrec_jax import fs
from lcrec_jax.errors import WorkdirError

LOCK_NAME = ".lock"


def lock_path(workdir: str) -> str:
  """Where the lock file of ``workdir`` lives (local for a ``gs://`` workdir)."""
  if not fs.is_remote(workdir):
    return os.path.join(workdir, LOCK_NAME)
  key = hashlib.sha256(workdir.rstrip("/").encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "lcrec-locks", f"{key}.lock")


def _holder(fd: int) -> dict[str, Any]:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 4096).decode() or "{}")
  except (OSError, ValueError):
    return {}


def _describe(h: dict[str, Any]) -> str:
  if not h.get("pid"):
    return "pid unknown"
  return f"pid {h['pid']} on {h.get('host', '?')}, started {h.get('started', '?')}"


class WorkdirLock:
  """An exclusive, non-blocking lock on a workdir (see the module docstring)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = lock_path(workdir)
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    """Takes the lock.

    Raises:
      WorkdirError: another live process holds it (names its pid, host and start time).
    """
    if fs.is_remote(self.workdir):
      logging.warning("%s: an object store has no file lock; the lock is %s, which keeps "
                      "runs on this machine apart but not runs on other machines",
                      self.workdir, self.path)
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _holder(fd)
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(f"{self.path}: cannot lock the workdir ({e.strerror})") from None
      raise WorkdirError(f"{self.workdir} is in use by another run ({_describe(holder)})",
                         hint="wait for it to end, stop it, or use another --workdir"
                         ) from None
    old = _holder(fd)
    if old.get("pid"):  # its process died without unlocking: the kernel released it
      logging.warning("%s: taking over the lock of %s (that process is gone)", self.path,
                      _describe(old))
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode())
    self._fd = fd
    return self

  def release(self) -> None:
    """Empties the holder record and unlocks (closing the file releases the flock)."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc: Any) -> None:
    self.release()
