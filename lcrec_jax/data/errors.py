"""Errors raised by the dataset loaders.

Every error names the file and, where the input has lines, the 1-based line number, so a
bad row can be found with ``sed -n <line>p <file>``.
"""

from __future__ import annotations

from lcrec_jax.errors import UserError


class DataError(UserError, ValueError):
  """Input data that the loaders refuse to interpret (malformed row, bad encoding, ...).

  Attributes:
    path: the offending file.
    line: 1-based line number in ``path``, or ``None`` when the problem is not a line
      (a json key, a missing column).
  """

  def __init__(self, path: str, message: str, line: int | None = None):
    self.path = str(path)
    self.line = line
    where = f"{self.path}:{line}" if line is not None else self.path
    super().__init__(f"{where}: {message}")


class MissingFileError(DataError, FileNotFoundError):
  """A dataset file that must exist does not; also a :class:`FileNotFoundError`."""

  def __init__(self, path: str, what: str):
    super().__init__(path, f"{what} not found")
