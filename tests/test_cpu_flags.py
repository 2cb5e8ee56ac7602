"""lcrec_jax.cpu_flags: user flags win, opt-out works, and this jaxlib accepts the flags."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lcrec_jax import cpu_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small MLP gradient: dots next to elementwise ops, the pattern the flags change.
_PROBE = """
import jax, jax.numpy as jnp, numpy as np
r = np.random.default_rng(0)
x = jnp.asarray(r.standard_normal((64, 48), np.float32))
w1 = jnp.asarray(r.standard_normal((48, 96), np.float32) * 0.1)
w2 = jnp.asarray(r.standard_normal((96, 48), np.float32) * 0.1)
f = lambda w1, w2: jnp.sum((jax.nn.silu(x @ w1) * (x @ w1)) @ w2) ** 2
l, (g1, g2) = jax.jit(jax.value_and_grad(f, (0, 1)))(w1, w2)
print(repr(float(l)), repr(float(jnp.sum(jnp.abs(g1)))), repr(float(jnp.sum(jnp.abs(g2)))))
"""


def _run_probe(xla_flags: str) -> list[float]:
  env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=_ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return [float(v) for v in out.stdout.split()]


def test_recommended_flags_skip_names_the_user_set():
  user = "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=reduce"
  assert cpu_flags.recommended_flags(user) == [
      f"--{k}={v}" for k, v in cpu_flags.RECOMMENDED.items()
      if k != "xla_cpu_experimental_ynn_fusion_type"]
  assert len(cpu_flags.recommended_flags("")) == len(cpu_flags.RECOMMENDED)


def test_apply_appends_once_and_keeps_user_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  monkeypatch.delenv(cpu_flags.OPT_OUT_ENV, raising=False)
  added = cpu_flags.apply_recommended(force=True)
  assert added and all(f in os.environ["XLA_FLAGS"].split() for f in added)
  assert os.environ["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8 ")
  before = os.environ["XLA_FLAGS"]
  assert cpu_flags.apply_recommended(force=True) == []  # idempotent
  assert os.environ["XLA_FLAGS"] == before


def test_opt_out_and_accelerator_target(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv(cpu_flags.OPT_OUT_ENV, "0")
  assert cpu_flags.apply_recommended(force=True) == []
  assert os.environ["XLA_FLAGS"] == ""
  monkeypatch.delenv(cpu_flags.OPT_OUT_ENV)
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert cpu_flags.apply_recommended() == []
  assert os.environ["XLA_FLAGS"] == ""


@pytest.mark.slow
def test_this_jaxlib_accepts_the_flags_and_numerics_hold():
  """XLA aborts on an unknown flag or value: a jaxlib upgrade that drops one fails here."""
  if cpu_flags._jaxlib_version() not in cpu_flags.TESTED_JAXLIB:
    pytest.skip("jaxlib outside cpu_flags.TESTED_JAXLIB: the flags are not applied")
  base = _run_probe("")
  tuned = _run_probe(" ".join(cpu_flags.recommended_flags()))
  assert tuned == pytest.approx(base, rel=1e-5)
