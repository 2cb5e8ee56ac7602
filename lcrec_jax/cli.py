"""The entry boundary of every command (``main``, ``recommend``, ``generate``).

    if __name__ == "__main__":
      cli.run(main, "recommend")

Expected errors (:class:`lcrec_jax.errors.UserError`, ``absl.app.UsageError``, a bad flag,
a ``--config`` file that is missing, does not parse or has no ``get_config``, an unknown
``--config.x.y`` field) are printed as one line ``<prog>: error: ...`` (plus
``hint: ...`` where there is one) on stderr, and the process exits with status 2. Their
traceback goes to the run's absl log file only, when one is open. Anything else is a bug
and keeps its traceback. Ctrl-C is one line, ``<prog>: interrupted ...``, and exit status 130.
JAX's backend probe line (``Unable to initialize backend 'tpu'``) is silenced.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging

from lcrec_jax.errors import EXIT_USER_ERROR, ConfigError, UserError, WorkdirError


def fail(prog: str, message: str, hint: str | None = None, *, code: int = EXIT_USER_ERROR,
         prefix: str = "error: ") -> NoReturn:
  """Prints ``<prog>: error: message`` (and ``hint: ...``) on stderr; exits with ``code``."""
  first, *rest = str(message).strip().splitlines() or [""]
  print(f"{prog}: {prefix}{first}", file=sys.stderr)
  if hint or rest:
    print(f"hint: {hint or ' '.join(r.strip() for r in rest)}", file=sys.stderr)
  sys.stderr.flush()
  sys.exit(code)


def quiet_backend_probe() -> None:
  """Silences JAX's INFO line ``Unable to initialize backend 'tpu': ...`` (and the other
  platforms' probes): on a CPU host it precedes every command's own output or one-line
  error. Real backend failures are raised, not logged, so nothing is lost."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)


def _log_file_stream() -> Any:
  """The absl log file's stream, or None when absl logs to stderr only."""
  handler = getattr(logging.get_absl_handler(), "python_handler", None)
  stream = getattr(handler, "stream", None)
  if stream is None or stream in (sys.stderr, sys.__stderr__, sys.stdout, sys.__stdout__):
    return None
  return stream


def _log_traceback(prog: str) -> None:
  stream = _log_file_stream()
  if stream is None:
    return
  try:
    stream.write(f"{prog}: error (traceback):\n{traceback.format_exc()}")
    stream.flush()
  except (OSError, ValueError):  # a closed log file must not hide the error itself
    pass


def _load_config_file(spec: str) -> Any:
  """``get_config()`` of a recipe file (``path`` or ``path:arg``)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_lcrec_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _config_roots(argv: Sequence[str], fv: flags.FlagValues | None = None) -> dict[str, Any]:
  """Config flags (name -> loaded ConfigDict) among the flags defined on ``fv``."""
  fv = flags.FLAGS if fv is None else fv
  out = {}
  for arg in argv:
    if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
      continue
    name = arg[2:].split("=", 1)[0].split(".", 1)[0]
    if name in fv and name not in out:
      value = None
      try:  # the flag's value applies the overrides, so it fails on the bad one
        value = fv[name].value
      except Exception:  # pylint: disable=broad-except
        pass
      if value is None:  # load the config file as it is, without the overrides
        try:
          path = next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))
          value = _load_config_file(path)
        except Exception:  # pylint: disable=broad-except
          continue
      if value is not None and hasattr(value, "keys"):
        out[name] = value
  return out


def unknown_config_field(argv: Sequence[str],
                         fv: flags.FlagValues | None = None) -> ConfigError | None:
  """The error for the first ``--config.a.b=...`` naming a field the config lacks.

  It names the closest valid fields (difflib) and, as a hint, all fields at that level.
  """
  roots = _config_roots(argv, fv)
  for arg in argv:
    key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
    name, _, path = key.partition(".")
    if name not in roots or not path:
      continue
    node, walked = roots[name], name
    for part in path.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part in keys:
        node, walked = node[part], f"{walked}.{part}"
        continue
      if not keys:
        return ConfigError(f"--{key}: {walked} is a value, not a section with fields")
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
      near = (" (closest: " + ", ".join(f"{walked}.{c}" for c in close) + ")") if close else ""
      return ConfigError(f"--{key}: {walked} has no field {part!r}{near}",
                         hint=f"fields of {walked}: {', '.join(sorted(keys))}")
  return None


def _config_file_args(argv: Sequence[str],
                      fv: flags.FlagValues | None = None) -> list[tuple[str, str]]:
  """``(flag name, file spec)`` of every config-file flag (``--config=path[:arg]``) in argv."""
  fv = flags.FLAGS if fv is None else fv
  out = []
  for i, arg in enumerate(argv):
    if not arg.startswith("--") or "." in arg.split("=", 1)[0]:
      continue
    name, eq, value = arg[2:].partition("=")
    if name not in fv:
      continue
    if type(fv[name].parser).__name__ != "ConfigFileFlagParser":
      continue
    if not eq:
      if i + 1 >= len(argv):
        continue
      value = argv[i + 1]
    out.append((name, value))
  return out


def config_file_error(argv: Sequence[str],
                      fv: flags.FlagValues | None = None) -> ConfigError | None:
  """The error for a ``--config`` file that is missing, does not parse or lacks
  ``get_config``, naming the file (and line); None when the files look usable."""
  import ast  # pylint: disable=g-import-not-at-top
  for name, value in _config_file_args(argv, fv):
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      return ConfigError(f"--{name}={value}: no such file",
                         hint="give a recipe file, e.g. --config=configs/ml100k_quick.py")
    try:
      with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    except SyntaxError as e:
      return ConfigError(f"--{name}={value}: line {e.lineno}: syntax error: {e.msg}")
    except (OSError, ValueError) as e:
      return ConfigError(f"--{name}={value}: cannot be read ({e})")
    defined = set()
    for node in tree.body:  # a def, an assignment or an import of get_config
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        defined.add(node.name)
      elif isinstance(node, (ast.Import, ast.ImportFrom)):
        defined.update((a.asname or a.name).split(".")[0] for a in node.names)
      elif isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        defined.update(t.id for t in targets if isinstance(t, ast.Name))
    if "get_config" not in defined and "*" not in defined:
      return ConfigError(f"--{name}={value}: the file defines no get_config()",
                         hint="a recipe file defines def get_config() -> ConfigDict")
  return None


def parse_flags(argv: Sequence[str], prog: str,
                fv: flags.FlagValues | None = None) -> list[str]:
  """absl's flag parsing (on ``fv``, default absl's FLAGS), with flag, config-file and
  config-field errors as one line and exit 2."""
  fv = flags.FLAGS if fv is None else fv
  err = config_file_error(argv, fv)  # before absl: ml_collections loads the file lazily
  if err is not None:
    fail(prog, str(err), err.hint)
  try:
    return fv(list(argv))
  except flags.Error as e:
    fail(prog, str(e), hint=f"python -m lcrec_jax.{prog} --helpshort lists the flags")
  except (AttributeError, KeyError):  # ml_collections: an override of a missing field
    err = unknown_config_field(argv, fv)
    if err is None:
      raise
    fail(prog, str(err), err.hint)
  raise AssertionError("unreachable")


def guarded(main: Callable[[list[str]], Any], prog: str) -> Callable[[list[str]], Any]:
  """``main`` with expected errors turned into one line on stderr and exit status 2."""

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> Any:
    try:
      return main(argv)
    except (UserError, app.UsageError) as e:
      _log_traceback(prog)
      fail(prog, str(e), getattr(e, "hint", None),
           code=getattr(e, "exit_code", EXIT_USER_ERROR),
           prefix=getattr(e, "prefix", "error: "))
    except KeyboardInterrupt:  # a command without its own resume message
      fail(prog, "interrupted", code=130, prefix="")

  return wrapped


def run(main: Callable[[list[str]], Any], prog: str,
        argv: Sequence[str] | None = None) -> None:
  """``absl.app.run(main)`` behind the one-line error boundary."""
  quiet_backend_probe()
  app.run(guarded(main, prog), argv=None if argv is None else list(argv),
          flags_parser=functools.partial(parse_flags, prog=prog))


def run_in_process(define_flags: Callable[[flags.FlagValues, list[str]], Any],
                   main: Callable[[list[str]], Any], prog: str, argv: Sequence[str]) -> int:
  """Runs a command in this process as ``python -m lcrec_jax.<prog> *argv`` would: its
  flags defined on a fresh ``FlagValues``, parsed and checked at the same boundary as
  :func:`run` (one line on stderr, status 2); returns the exit status.

  For tests and notebooks that check a command's behaviour without paying a new
  process (the JAX import, every compile) per call. ``define_flags`` is the entry module's
  (``lcrec_jax.main.define_flags``), which points the module's flag holders at the fresh
  values, so one command runs at a time per process.
  """
  fv, argv = flags.FlagValues(), [prog, *argv]
  define_flags(fv, argv)
  try:
    rest = parse_flags(argv, prog, fv)
    guarded(main, prog)(rest)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return 0


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
  """A local workdir must be (or become) a writable directory; gs:// is left to ``fs``.

  Raises:
    WorkdirError: it is a file, cannot be created, or is not writable.
  """
  if not workdir or "://" in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"{flag}={workdir} is a file, not a directory",
                       hint="give a directory (it is created if missing)")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"{flag}={workdir}: cannot create the directory ({e.strerror}: "
                       f"{e.filename or workdir})") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"{flag}={workdir}: the directory is not writable")
