"""``python -m lcrec_jax.plan``: the memory and throughput planner of a recipe.

    python -m lcrec_jax.plan --config=configs/lcrec_instruments_llama7b.py --mesh=fsdp=8

The entry module only; the planner is :mod:`lcrec_jax.pipeline.plan`.
"""

import sys

from lcrec_jax.pipeline.plan import (  # noqa: F401
    _define_flags, _set_simulated_devices, main)

if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _set_simulated_devices(sys.argv)
  _define_flags()
  from lcrec_jax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_backend_probe()
  app.run(main)
