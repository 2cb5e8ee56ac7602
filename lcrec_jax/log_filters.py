"""Logging filters shared by the stages."""

from __future__ import annotations

import contextlib
import logging as logging_std


class _DropOrbaxInfo(logging_std.Filter):
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno > logging_std.INFO or "orbax" not in record.pathname


@contextlib.contextmanager
def quiet_orbax():
  """Within the block, orbax logs only warnings and errors."""
  filt = _DropOrbaxInfo()
  logger = logging_std.getLogger("absl")
  logger.addFilter(filt)
  try:
    yield
  finally:
    logger.removeFilter(filt)
