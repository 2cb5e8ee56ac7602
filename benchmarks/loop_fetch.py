"""How much host wait the loop hides when it reads metrics one step late.

A jitted step of a few tens of ms (two `[N, N]` matmuls) and a host-side batch source that
sleeps `WAIT_MS` per batch (standing in for input-pipeline or logging time on the host).
Read synchronously a step costs ~compute + wait; read one step late (`fetch="late"`,
what the LLM trainer uses) the host work overlaps the dispatched step.

    python benchmarks/loop_fetch.py 40 768      # WAIT_MS=40, N=768
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lcrec_jax.runtime import loop as loop_lib  # noqa: E402

WAIT_S = float(sys.argv[1]) / 1e3 if len(sys.argv) > 1 else 0.04
N = int(sys.argv[2]) if len(sys.argv) > 2 else 768
STEPS = 40


@jax.jit
def step(x, b):
  for _ in range(2):
    x = jnp.tanh(x @ x) * 0.5 + b
  return x, {"s": x.sum()}


def batches(epoch, pos):
  del epoch
  for _ in range(pos, STEPS):
    time.sleep(WAIT_S)
    yield np.float32(0.1)


def main():
  x0 = jnp.ones((N, N), jnp.float32)
  step(x0, np.float32(0.1))[0].block_until_ready()
  t = time.perf_counter()
  for _ in range(10):
    step(x0, np.float32(0.1))[0].block_until_ready()
  compute_ms = (time.perf_counter() - t) / 10 * 1e3
  for fetch in ("sync", "late", "sync", "late"):
    loop = loop_lib.Loop(step, batches, x0, num_steps=STEPS, steps_per_epoch=STEPS, fetch=fetch)
    t = time.perf_counter()
    loop.run()
    ms = (time.perf_counter() - t) / STEPS * 1e3
    print(f"fetch={fetch}: {ms:.1f} ms/step (step alone {compute_ms:.1f} ms, host wait "
          f"{WAIT_S * 1e3:.0f} ms)")


if __name__ == "__main__":
  main()
