"""MovieLens-100K, the quick recipe trained longer.

The quick recipe (configs/ml100k_quick.py) with 6,000 steps instead of 4,500 (~3.1 epochs
of its 31k examples; ~26 minutes on a quiet 2-core CPU); everything else, including the
index and the sampled examples, is the same, so it reuses a quick run's workdir index:

  python -m lcrec_jax.main --config=configs/ml100k_long.py --workdir=runs/ml100k_long
"""

from lcrec_jax.recipes import sibling


def _quick():
  return sibling(__file__, "ml100k_quick.py")


def get_config():
  c = _quick().get_config()
  c.train.num_steps = 6000
  c.train.checkpoint_every = 1000
  return c
