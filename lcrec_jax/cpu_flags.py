"""Recommended XLA:CPU flags, appended to ``XLA_FLAGS`` before JAX starts.

Measured on the 2-core dev CPU (BENCHMARKS.md, "LLaMA"): with jaxlib 0.10.x, XLA:CPU
hands each matmul to YNNPACK on its own (fusion type ``individual_dot``, plus
``reduce``). Letting YNNPACK fuse a dot with its elementwise neighbours
(``--xla_cpu_experimental_ynn_fusion_type=dot,reduce``) makes the SmolLM2 training step faster
with unchanged numerics (same first loss to the last printed digit).

`apply_recommended()` must run before JAX creates its CPU client (in practice: before
the first computation; earliest is before ``import jax``). It only appends flags the
user has not set (a flag name already in ``XLA_FLAGS`` is left as the user wrote it),
does nothing when ``LCREC_CPU_XLA_FLAGS=0``, and does nothing for a jaxlib outside the
tested versions (XLA aborts the process on an unknown flag, and these flags are
experimental) or when the process targets an accelerator (``JAX_PLATFORMS`` without
``cpu`` first, or an installed TPU/GPU plugin): the flags only affect XLA:CPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

# name -> value; each was measured against the default on this jaxlib (BENCHMARKS.md).
RECOMMENDED: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "dot,reduce",
}
# (major, minor) of jaxlib releases the flags were checked with.
TESTED_JAXLIB: tuple[tuple[int, int], ...] = ((0, 10),)
OPT_OUT_ENV = "LCREC_CPU_XLA_FLAGS"
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin",
                        "jax_rocm60_plugin", "jax_rocm7_plugin")


def _jaxlib_version() -> tuple[int, int] | None:
  try:
    parts = importlib.metadata.version("jaxlib").split(".")
    return int(parts[0]), int(parts[1])
  except (importlib.metadata.PackageNotFoundError, ValueError, IndexError):
    return None


def _targets_cpu() -> bool:
  """True when JAX will run on the CPU (no accelerator requested or installed)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return not any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PLUGINS)


def recommended_flags(xla_flags: str = "") -> list[str]:
  """The recommended `--name=value` flags whose names are not already in `xla_flags`."""
  present = {tok.lstrip("-").split("=", 1)[0] for tok in xla_flags.split()}
  return [f"--{k}={v}" for k, v in RECOMMENDED.items() if k not in present]


def apply_recommended(force: bool = False) -> list[str]:
  """Appends the recommended XLA:CPU flags to ``os.environ["XLA_FLAGS"]``.

  Args:
    force: skip the jaxlib-version and CPU-target checks (the opt-out env var and
      the user's own flags are still honoured); benchmarks use it.

  Returns:
    The flags appended (empty when none were).
  """
  if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return []
  if not force and (_jaxlib_version() not in TESTED_JAXLIB or not _targets_cpu()):
    return []
  current = os.environ.get("XLA_FLAGS", "")
  added = recommended_flags(current)
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
  return added
