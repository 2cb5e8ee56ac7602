"""``python -m lcrec_jax.main``: run pipeline stages for a config recipe.

  python -m lcrec_jax.main --config=configs/ml100k_quick.py --workdir=runs/ml100k

The entry module only; the runner is :mod:`lcrec_jax.pipeline.runner` (flags, plan,
stages, the one-line error boundary). See ARCHITECTURE.md.
"""

from lcrec_jax.pipeline.runner import _main, define_flags, main  # noqa: F401

if __name__ == "__main__":
  from lcrec_jax import cli  # pylint: disable=g-import-not-at-top
  define_flags()
  cli.run(_main, "main")
