"""Expected errors: what a user can fix (a bad flag, config value, input file, workdir).

Every entry point (``lcrec_jax.main``, ``recommend``, ``generate``) reports a
:class:`UserError` as one line on stderr (plus an optional hint line) and exits with
status 2; the traceback goes to the run's log file only. Anything else is a bug and
keeps its traceback.

Subclasses name the part of the input at fault:

* :class:`ConfigError` a config field (``train.lr``) or a command-line flag.
* :class:`lcrec_jax.data.errors.DataError` an input data file (and line).
* :class:`WorkdirError` the run directory or an artifact in it (missing stage, a
  workdir that is a file, an artifact built from other inputs, a workdir another run
  holds, a full disk).
* :class:`Interrupted` Ctrl-C: ``main: interrupted; the next run resumes from step N``,
  exit status 130.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class UserError(Exception):
  """An error the user can fix; reported as one line and exit status 2.

  Attributes:
    hint: an optional second line: what to do about it.
    exit_code: the process's exit status (2).
    prefix: what precedes the message on its line (``"error: "``).
  """

  exit_code = EXIT_USER_ERROR
  prefix = "error: "

  def __init__(self, message: str, hint: str | None = None):
    super().__init__(message)
    self.hint = hint


class ConfigError(UserError, ValueError):
  """A config field or command-line flag with a bad name, type or value."""


class WorkdirError(UserError):
  """The workdir, or an artifact in it, cannot be used as asked."""


class Interrupted(UserError):
  """Ctrl-C (SIGINT): one line saying where the next run resumes, exit status 130."""

  exit_code = EXIT_INTERRUPTED
  prefix = ""
