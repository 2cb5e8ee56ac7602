"""Shared test set-up.

* Eight simulated CPU devices so mesh/sharding tests run on one host; must be set before
  jax is imported anywhere.
* One persistent JAX compilation cache for the whole test run (``JAX_COMPILATION_CACHE_DIR``
  in the environment, so the pytest-xdist workers and every subprocess a test starts share
  it): the same jitted function is compiled once per run, not once per test or process.
  The directory is a fresh temporary one, made by the first process of the run (the xdist
  controller) and removed when that process ends; never the user's home or a shared path.
  ``LCREC_TEST_CC=0`` turns the cache off (to measure what it saves).
"""

import os
import shutil
import signal
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_CC_OWNER = "LCREC_TEST_CC_OWNER"  # pid of the process that made the cache directory
if os.environ.get("LCREC_TEST_CC", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lcrec-jax-test-cc-")
  os.environ[_CC_OWNER] = str(os.getpid())
  # Cache every program: the tests' programs are small, and most compile in well under
  # JAX's default 1 s threshold, yet together they are most of the suite's time.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  """The process that made the cache directory removes it at the end of the run."""
  del config
  if os.environ.get(_CC_OWNER) == str(os.getpid()):
    shutil.rmtree(os.environ.get("JAX_COMPILATION_CACHE_DIR", ""), ignore_errors=True)



@pytest.fixture(autouse=True)
def _signal_state():
  """Each test starts and ends with the process's own SIGINT/SIGTERM handlers and no
  recorded Ctrl-C (lcrec_jax.interrupt): a request or handler left by one test would stop
  a later one in the same process (an xdist worker runs many test modules)."""
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  yield
  for s, h in saved.items():
    if signal.getsignal(s) is not h and h is not None:
      signal.signal(s, h)
  from lcrec_jax import interrupt  # pylint: disable=g-import-not-at-top
  interrupt.clear()
