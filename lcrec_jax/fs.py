"""One file-system layer for every output of a run: local paths and ``gs://`` alike.

Every stage reads and writes its workdir through this module, so ``--workdir`` may be a
local directory or a bucket path such as ``gs://bucket/runs/ml100k``. Paths become
``etils.epath.Path`` objects: local paths use the OS, ``gs://`` (and ``s3://``) paths
use TensorFlow's gfile when TensorFlow is importable, else fsspec, which needs the
``gcsfs`` package for ``gs://``. Orbax accepts the same ``epath.Path`` objects (its
array data goes through TensorStore's own GCS driver).

Writes are atomic: the bytes go to a temporary sibling (``.tmp-<name>-<random>``) that
is then renamed over the final name, so a reader (or a resumed run) never sees a
half-written file under the final name. On a local disk the rename is atomic; on GCS a
"rename" is a copy and a delete, which is not atomic as a whole but still only exposes
the final name once the complete copy exists.

Object stores cannot append. :class:`AppendLog` (``metrics.jsonl``, TensorBoard event
files) appends on local disks and, for remote paths, keeps the content in memory and
rewrites the whole object, at most every ``remote_flush_s`` seconds and on close.

Multi-host runs share one workdir: only process 0 writes shared files. The write
functions here do nothing on other processes unless called with ``all_processes=True``
(for per-process files such as logs), and :func:`barrier` lets the other processes wait
until process 0 has written what they will read next.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from typing import Any, Iterator

import numpy as np
from etils import epath

PathLike = str | os.PathLike

_REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")


def path(p: PathLike) -> epath.Path:
  """``p`` as an ``epath.Path`` (``gs://bucket/x`` keeps its scheme)."""
  return p if isinstance(p, epath.Path) else epath.Path(p)


def is_remote(p: PathLike) -> bool:
  """Whether ``p`` names an object store (``gs://``, ``s3://``, ...) rather than a local path."""
  return os.fspath(p).startswith(_REMOTE_PREFIXES)


def join(p: PathLike, *parts: str) -> str:
  """``os.path.join`` that keeps a ``gs://`` prefix intact; returns a string."""
  base = os.fspath(p)
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def check_backend(p: PathLike) -> None:
  """Fails early, naming the package to install, when ``p`` is remote and unusable here.

  Raises:
    ImportError: ``p`` is a ``gs://`` path and neither TensorFlow nor gcsfs is installed.
  """
  s = os.fspath(p)
  if not s.startswith("gs://"):
    return
  import importlib.util  # pylint: disable=g-import-not-at-top
  from etils.epath import backend as backend_lib  # pylint: disable=g-import-not-at-top
  import fsspec  # pylint: disable=g-import-not-at-top
  if path(s)._backend is not backend_lib.fsspec_backend:  # pylint: disable=protected-access
    return  # TensorFlow's gfile handles gs:// itself
  registered = "gs" in fsspec.registry or "gcs" in fsspec.registry
  if not registered and importlib.util.find_spec("gcsfs") is None:
    raise ImportError(f"--workdir={s}: gs:// paths need the gcsfs package here (etils.epath "
                      "uses fsspec when TensorFlow is absent): pip install gcsfs")


# --- processes ---------------------------------------------------------------------------


def is_primary() -> bool:
  """True on process 0, the one that writes shared files (initialises JAX's backend)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches ``barrier(name)``; a no-op with one process."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _skip(all_processes: bool) -> bool:
  return not all_processes and not is_primary()


# --- queries -----------------------------------------------------------------------------


def exists(p: PathLike) -> bool:
  """Whether a file or directory exists at ``p``."""
  return path(p).exists()


def isfile(p: PathLike) -> bool:
  """Whether ``p`` is an existing file."""
  return path(p).is_file()


def isdir(p: PathLike) -> bool:
  """Whether ``p`` is an existing directory (on GCS: a prefix with objects under it)."""
  return path(p).is_dir()


def listdir(p: PathLike) -> list[str]:
  """Names (not paths) of the entries of directory ``p``, sorted."""
  return sorted(c.name for c in path(p).iterdir())


def makedirs(p: PathLike) -> None:
  """Creates directory ``p`` and its parents; fine if it exists (a no-op on GCS)."""
  path(p).mkdir(parents=True, exist_ok=True)


def remove(p: PathLike, *, all_processes: bool = False) -> None:
  """Deletes file ``p`` if it exists (process 0 only unless ``all_processes``)."""
  if _skip(all_processes):
    return
  p = path(p)
  if p.exists():
    p.unlink()


# --- reads -------------------------------------------------------------------------------


def read_bytes(p: PathLike) -> bytes:
  """The content of file ``p``."""
  return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  """The content of file ``p`` decoded as UTF-8."""
  return read_bytes(p).decode("utf-8")


def read_json(p: PathLike) -> Any:
  """``json.loads`` of file ``p`` (raises ``FileNotFoundError``, ``json.JSONDecodeError``)."""
  return json.loads(read_text(p))


def load_npy(p: PathLike) -> np.ndarray:
  """A ``.npy`` array from ``p`` (no pickles)."""
  if not is_remote(p):
    return np.load(os.fspath(p), allow_pickle=False)
  return np.load(io.BytesIO(read_bytes(p)), allow_pickle=False)


# --- atomic writes -----------------------------------------------------------------------


def _tmp_sibling(p: epath.Path) -> epath.Path:
  return p.parent / f".tmp-{p.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_bytes(p: PathLike, data: bytes, *, all_processes: bool = False) -> bool:
  """Writes ``data`` to ``p`` atomically: a temporary sibling, then a rename over ``p``.

  On failure the temporary file is removed and a previous ``p`` is left as it was. On GCS
  the rename is a copy plus a delete: ``p`` appears only once its full content exists.

  Args:
    p: target file; its directory is created if needed.
    data: the content.
    all_processes: write from every process (default: process 0 only, the rule for
      files of a shared workdir).

  Returns:
    Whether this process wrote the file.
  """
  if _skip(all_processes):
    return False
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_sibling(p)
  try:
    if is_remote(p):
      with tmp.open("wb") as f:
        f.write(data)
    else:
      with open(os.fspath(tmp), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(p)
  except BaseException:
    with contextlib.suppress(Exception):
      if tmp.exists():
        tmp.unlink()
    raise
  return True


def write_text(p: PathLike, text: str, *, all_processes: bool = False) -> bool:
  """:func:`write_bytes` of ``text`` encoded as UTF-8."""
  return write_bytes(p, text.encode("utf-8"), all_processes=all_processes)


def write_json(p: PathLike, obj: Any, *, indent: int | None = 2, all_processes: bool = False,
               **json_kwargs: Any) -> bool:
  """:func:`write_text` of ``json.dumps(obj, indent=indent, **json_kwargs)``.

  The object is serialised before anything is written, so an unserialisable ``obj``
  leaves a previous file untouched.
  """
  text = json.dumps(obj, indent=indent, **json_kwargs)
  return write_text(p, text, all_processes=all_processes)


def save_npy(p: PathLike, array: np.ndarray, *, all_processes: bool = False) -> bool:
  """:func:`write_bytes` of ``array`` in ``.npy`` format."""
  buf = io.BytesIO()
  np.save(buf, np.asarray(array), allow_pickle=False)
  return write_bytes(p, buf.getvalue(), all_processes=all_processes)


def copy_file(src: PathLike, dst: PathLike, *, all_processes: bool = False) -> bool:
  """Copies file ``src`` to ``dst`` (either may be remote), atomically at ``dst``."""
  return write_bytes(dst, read_bytes(src), all_processes=all_processes)


def copy_tree(src: PathLike, dst: PathLike, *, all_processes: bool = False) -> list[str]:
  """Copies every file under directory ``src`` to the same relative path under ``dst``.

  Returns:
    The destination paths written, as strings (empty on processes that skip the write).
  """
  if _skip(all_processes):
    return []
  out = []
  for name in listdir(src):
    child = path(src) / name
    if child.is_dir():
      out += copy_tree(child, join(dst, name), all_processes=True)
    else:
      copy_file(child, join(dst, name), all_processes=True)
      out.append(join(dst, name))
  return out


def upload_local_files(local_dir: str, dst: PathLike, *, all_processes: bool = False
                       ) -> list[str]:
  """Copies the plain files of local directory ``local_dir`` (not symlinks, not
  subdirectories) into ``dst``; returns the destination paths."""
  if _skip(all_processes):
    return []
  out = []
  for name in sorted(os.listdir(local_dir)):
    src = os.path.join(local_dir, name)
    if os.path.isfile(src) and not os.path.islink(src):
      copy_file(src, join(dst, name), all_processes=True)
      out.append(join(dst, name))
  return out


# --- staging for libraries that need local files -----------------------------------------


@contextlib.contextmanager
def local_dir_for_write(dst: PathLike) -> Iterator[str]:
  """A local directory whose files end up in ``dst`` (for writers that need local paths).

  A local ``dst`` is created and yielded as is. A remote ``dst`` yields a fresh local
  temporary directory; when the block ends without an exception its files are copied
  to ``dst`` (each atomically) and the temporary directory is removed.
  """
  if not is_remote(dst):
    os.makedirs(os.fspath(dst), exist_ok=True)
    yield os.fspath(dst)
    return
  tmp = tempfile.mkdtemp(prefix="lcrec-stage-")
  try:
    yield tmp
    copy_tree(tmp, dst, all_processes=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_copy(src: PathLike) -> Iterator[str]:
  """A local directory with the files of ``src`` (for readers that need local paths).

  A local ``src`` is yielded as is; a remote one is downloaded into a temporary
  directory that is removed when the block ends.
  """
  if not is_remote(src):
    yield os.fspath(src)
    return
  tmp = tempfile.mkdtemp(prefix="lcrec-copy-")
  try:
    copy_tree(src, tmp, all_processes=True)
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# --- growing files -----------------------------------------------------------------------


class AppendLog:
  """A file that only grows by appended records (``metrics.jsonl``, TensorBoard events).

  Local paths are opened in append mode and :meth:`flush` pushes to the OS. Object
  stores cannot append, so for a remote path the whole content is kept in memory and
  the object is rewritten atomically by :meth:`flush`, at most once every
  ``remote_flush_s`` seconds (``flush(force=True)`` and :meth:`close` always write).
  Records appended since the last remote write are lost if the process dies; the
  trainers redo those steps on resume anyway. On processes other than 0 (unless
  ``all_processes``) the log is a no-op sink.
  """

  def __init__(self, p: PathLike, *, binary: bool = False, truncate: bool = False,
               remote_flush_s: float = 10.0, all_processes: bool = False):
    """Opens (creating) the file.

    Args:
      p: the file.
      binary: records are ``bytes`` (else ``str``).
      truncate: start empty instead of after the existing content.
      remote_flush_s: least seconds between two rewrites of a remote object.
      all_processes: write from every process (default: process 0 only).
    """
    self.path = path(p)
    self.binary = binary
    self.remote = is_remote(p)
    self.remote_flush_s = float(remote_flush_s)
    self.enabled = not _skip(all_processes)
    self._last_upload: float | None = None  # never: the first flush writes
    self._dirty = False
    self._f = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.remote:
      old = b"" if truncate or not self.path.exists() else self.path.read_bytes()
      self._buf = bytearray(old)
      self._f = None
      self._dirty = True  # like open(): the file exists after close() even if empty
    else:
      mode = ("wb" if truncate else "ab") if binary else ("w" if truncate else "a")
      self._f = open(os.fspath(self.path), mode, **({} if binary else {"encoding": "utf-8"}))

  def write(self, data: str | bytes) -> None:
    """Appends ``data`` (``bytes`` if ``binary`` else ``str``)."""
    if not self.enabled:
      return
    if self._f is not None:
      self._f.write(data)
      return
    self._buf += data if self.binary else data.encode("utf-8")
    self._dirty = True

  def flush(self, force: bool = False) -> None:
    """Makes the appended data visible (remote: rewrite, throttled unless ``force``)."""
    if not self.enabled:
      return
    if self._f is not None:
      self._f.flush()
      return
    now = time.monotonic()
    if self._dirty and (force or self._last_upload is None
                        or now - self._last_upload >= self.remote_flush_s):
      write_bytes(self.path, bytes(self._buf), all_processes=True)
      self._last_upload, self._dirty = now, False

  def close(self) -> None:
    """Flushes everything and closes the file."""
    if not self.enabled:
      return
    if self._f is not None:
      self._f.close()
      self._f = None
    elif self._dirty:
      self.flush(force=True)

  def __enter__(self) -> AppendLog:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
