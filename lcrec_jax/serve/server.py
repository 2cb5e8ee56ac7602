"""The ``serve`` command: flags, the run, uvicorn on a socket bound before start-up.

  python -m lcrec_jax.serve --workdir=runs/ml100k --port=8080
  python -m lcrec_jax.serve --workdir=runs/ml100k --host=0.0.0.0 --api_key_file=key.txt

Start-up: the run is loaded as ``recommend`` loads it (the eval stage's params from the
checkpoint, sharded on the recipe's mesh; ``--params=export``: the HF export on one device;
the log names which; a bad workdir or a missing checkpoint is one line and exit 2, before
anything listens), the socket is bound (``--port=0``: an ephemeral one) and announced as
``serve: listening on http://HOST:PORT`` on stdout, then the beam search is compiled in
the background: ``/healthz`` answers at once, ``/readyz`` and the ``/v1`` routes once it is
compiled. SIGTERM stops accepting connections, answers every request already accepted,
and exits 0.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import time
from typing import Sequence

from absl import app as absl_app, flags

from lcrec_jax.errors import ConfigError

# Flag holders, set by define_flags.
_WORKDIR = _HOST = _PORT = _MAX_BATCH = _BATCH_SIZES = _MAX_WAIT = _QUEUE = None
_DEADLINE = _MAX_BODY = _MAX_HISTORY = _KEY_FILE = _ACCESS_LOG = _PARAMS = None


def define_flags(fv: flags.FlagValues = flags.FLAGS,
                 argv: list[str] | None = None) -> flags.FlagValues:
  """Defines the command's flags on ``fv``; importing the module defines none, so it
  imports next to ``lcrec_jax.recommend`` and ``main`` (see
  :func:`lcrec_jax.main.define_flags`)."""
  del argv  # no config flag
  global _WORKDIR, _HOST, _PORT, _MAX_BATCH, _BATCH_SIZES, _MAX_WAIT  # pylint: disable=global-statement
  global _QUEUE, _DEADLINE, _MAX_BODY, _MAX_HISTORY, _KEY_FILE, _ACCESS_LOG, _PARAMS  # pylint: disable=global-statement
  from lcrec_jax.recommend import define_params_flag  # pylint: disable=g-import-not-at-top
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished run directory (lcrec_jax.main).",
                                 flag_values=fv)
  _HOST = flags.DEFINE_string("host", "127.0.0.1",
                              "Address to bind; other than loopback needs --api_key_file.",
                              flag_values=fv)
  _PORT = flags.DEFINE_integer("port", 8080, "TCP port (0 = an ephemeral one, printed).",
                               flag_values=fv)
  _MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Most queries per beam-search call.",
                                    flag_values=fv)
  _BATCH_SIZES = flags.DEFINE_list("batch_sizes", None, "Compiled batch sizes (default: powers "
                                   "of two below --max_batch, and --max_batch).", flag_values=fv)
  _MAX_WAIT = flags.DEFINE_float("max_wait_ms", 5.0, "How long the oldest queued query waits "
                                 "for others to share its beam-search call.", flag_values=fv)
  _QUEUE = flags.DEFINE_integer("queue_size", 256, "Queries waiting; past it 503 + Retry-After.",
                                flag_values=fv)
  _DEADLINE = flags.DEFINE_float("deadline_ms", 10000.0, "Per request (queue + decode); past "
                                 "it 503 + Retry-After.", flag_values=fv)
  _MAX_BODY = flags.DEFINE_integer("max_body_bytes", 65536, "Largest request body (422 past it).",
                                   flag_values=fv)
  _MAX_HISTORY = flags.DEFINE_integer("max_history", 200, "Most history entries per query.",
                                      flag_values=fv)
  _KEY_FILE = flags.DEFINE_string("api_key_file", None, "File holding the bearer token every "
                                  "request but /healthz and /readyz must send.", flag_values=fv)
  _ACCESS_LOG = flags.DEFINE_bool("access_log", False, "Log every request (uvicorn).",
                                  flag_values=fv)
  _PARAMS = define_params_flag(fv)
  return fv


LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
  """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
  if host in LOOPBACK_NAMES:
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    return False


def read_api_key(path: str | None, host: str) -> str | None:
  """The bearer token in ``path`` (stripped); required off loopback.

  Raises:
    ConfigError: no ``--api_key_file`` for a non-loopback ``--host``, or the file is
      missing or empty.
  """
  if not path:
    if not is_loopback(host):
      raise ConfigError(f"--host={host} is not a loopback address: give --api_key_file "
                        "(a file holding the bearer token clients must send)")
    return None
  try:
    with open(path, encoding="utf-8") as f:
      key = f.read().strip()
  except OSError as e:
    raise ConfigError(f"--api_key_file={path}: cannot read it ({e.strerror})") from None
  if not key:
    raise ConfigError(f"--api_key_file={path} is empty")
  return key


def settings_from_flags(api_key: str | None):
  from lcrec_jax.serve.app import Settings  # pylint: disable=g-import-not-at-top
  for name, flag, low in (("--max_batch", _MAX_BATCH, 1), ("--queue_size", _QUEUE, 1),
                          ("--max_body_bytes", _MAX_BODY, 64), ("--max_history", _MAX_HISTORY, 1)):
    if flag.value < low:
      raise ConfigError(f"{name}={flag.value}: must be >= {low}")
  for name, flag in (("--max_wait_ms", _MAX_WAIT), ("--deadline_ms", _DEADLINE)):
    if not flag.value >= 0:
      raise ConfigError(f"{name}={flag.value}: must be >= 0")
  return Settings(max_batch=_MAX_BATCH.value, max_wait_ms=_MAX_WAIT.value,
                  queue_size=_QUEUE.value, deadline_ms=_DEADLINE.value,
                  max_body_bytes=_MAX_BODY.value, max_history=_MAX_HISTORY.value,
                  api_key=api_key)


def batch_sizes_from_flags(max_batch: int) -> tuple[int, ...]:
  from lcrec_jax.serve.engine import default_batch_sizes  # pylint: disable=g-import-not-at-top
  if not _BATCH_SIZES.value:
    return default_batch_sizes(max_batch)
  try:
    sizes = sorted({int(s) for s in _BATCH_SIZES.value})
  except ValueError:
    raise ConfigError(f"--batch_sizes={','.join(_BATCH_SIZES.value)}: give integers") from None
  if sizes[0] < 1 or sizes[-1] != max_batch:
    raise ConfigError(f"--batch_sizes={','.join(map(str, sizes))}: each >= 1 and the largest "
                      f"equal to --max_batch={max_batch}")
  return tuple(sizes)


def bind(host: str, port: int) -> socket.socket:
  """A listening TCP socket (IPv6 for a ``:`` address); a busy port is a ConfigError."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host.strip("[]"), port))
  except OSError as e:
    sock.close()
    raise ConfigError(f"--host={host} --port={port}: cannot bind ({e.strerror})") from None
  sock.listen(2048)
  sock.set_inheritable(True)
  return sock


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise absl_app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise absl_app.UsageError("--workdir is required")
  api_key = read_api_key(_KEY_FILE.value, _HOST.value)
  settings = settings_from_flags(api_key)
  sizes = batch_sizes_from_flags(settings.max_batch)
  import uvicorn  # pylint: disable=g-import-not-at-top
  from lcrec_jax import recommend as rec  # pylint: disable=g-import-not-at-top
  from lcrec_jax.serve.app import create_app  # pylint: disable=g-import-not-at-top
  from lcrec_jax.serve.engine import Engine  # pylint: disable=g-import-not-at-top

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  t0 = time.perf_counter()
  run = rec.load_finished_run(_WORKDIR.value, _PARAMS.value)
  logging.getLogger("lcrec_jax.serve").info("params: %s (%.1f s)", rec.describe_params(run),
                                            time.perf_counter() - t0)
  engine = Engine(run, sizes)
  sock = bind(_HOST.value, _PORT.value)
  host, port = sock.getsockname()[:2]
  shown = f"[{host}]" if ":" in host else host
  print(f"serve: listening on http://{shown}:{port} (compiling; GET /readyz)", flush=True)
  config = uvicorn.Config(create_app(engine, settings), log_level="info",
                          access_log=_ACCESS_LOG.value, lifespan="on",
                          timeout_graceful_shutdown=int(settings.deadline_ms / 1000) + 5)
  server = uvicorn.Server(config)
  # uvicorn re-raises the signal that stopped it once it has drained; a handler that
  # ignores it keeps a SIGTERM drain an exit with status 0.
  signal.signal(signal.SIGTERM, lambda *_: None)
  server.run(sockets=[sock])
  print("serve: stopped", flush=True)
