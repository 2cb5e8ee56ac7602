"""MovieLens-100K, the quick recipe trained longer: for a CPU with an hour to spare.

The quick recipe (configs/ml100k_quick.py) with twice the seqrec and fusionseqrec sample
and 6,000 steps instead of 1,200 (~5.6 epochs of its ~30k examples); everything else,
including the index, is the same, so it can reuse a quick run's workdir index:

  python -m lcrec_jax.main --config=configs/ml100k_long.py --workdir=runs/ml100k_long
"""

from lcrec_jax.recipes import sibling


def _quick():
  return sibling(__file__, "ml100k_quick.py")


def get_config():
  c = _quick().get_config()
  c.tasks.sample_nums = (24000, 1000, 1000, 4000, 500, 500)
  c.train.num_steps = 6000
  c.train.checkpoint_every = 1000
  return c
