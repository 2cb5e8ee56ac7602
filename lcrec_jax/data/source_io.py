"""Strict reading of the loaders' source files: UTF-8 text lines and json.

Both readers fail loudly: a missing file raises :class:`MissingFileError`, a byte
sequence that is not UTF-8 raises :class:`DataError` with the line number, and invalid
json raises :class:`DataError` with json's own line number. A UTF-8 byte order mark at
the start of a file is accepted and dropped; ``\\r\\n`` line ends are accepted.
"""

from __future__ import annotations

import json
import os
import re

from lcrec_jax.data.errors import DataError, MissingFileError

_BOM = b"\xef\xbb\xbf"


def _read_bytes(path: str, what: str) -> bytes:
  if not os.path.isfile(path):
    raise MissingFileError(path, what)
  with open(path, "rb") as f:
    data = f.read()
  return data[len(_BOM):] if data.startswith(_BOM) else data


def _decode(path: str, data: bytes) -> str:
  """Decode UTF-8, naming the line of the first invalid byte."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise DataError(path, f"not valid UTF-8 (byte {data[e.start:e.start + 1]!r} at "
                    f"column {col}: {e.reason})", line=line) from None


def read_text_lines(path: str, what: str = "file") -> list[str]:
  """Lines of a UTF-8 text file without their line ends.

  Args:
    path: file to read.
    what: how errors name the file's role, e.g. ``"interaction file (.inter)"``.

  Returns:
    ``lines[k]`` is line ``k + 1`` of the file. A final line end does not add an
    empty last line.
  """
  text = _decode(path, _read_bytes(path, what))
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return [l[:-1] if l.endswith("\r") else l for l in lines]


class _BareConstant(ValueError):
  pass


def _reject_constant(name: str) -> object:
  raise _BareConstant(name)


# A json string (skipped) or a bare NaN / Infinity / -Infinity outside strings.
_BARE_CONSTANT = re.compile(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)')


def read_json_and_text(path: str, what: str = "json file") -> tuple[object, str]:
  """Parse a UTF-8 json file and return it with its text; errors name file and line.

  Bare ``NaN`` / ``Infinity`` (Python's json accepts them, the json standard does not)
  are refused, so they never become the text ``"nan"``.
  """
  text = _decode(path, _read_bytes(path, what))
  try:
    return json.loads(text, parse_constant=_reject_constant), text
  except json.JSONDecodeError as e:
    raise DataError(path, f"not valid json: {e.msg} (column {e.colno})", line=e.lineno) from None
  except _BareConstant as e:
    bare = next((m for m in _BARE_CONSTANT.finditer(text) if m.group(1)), None)
    line = text.count("\n", 0, bare.start()) + 1 if bare else None
    raise DataError(path, f"not valid json: bare {e} (json has no NaN or Infinity; write "
                    "null or a string)", line=line) from None


def read_json(path: str, what: str = "json file") -> object:
  """Parse a UTF-8 json file; errors name the file and line."""
  return read_json_and_text(path, what)[0]
