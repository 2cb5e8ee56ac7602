"""LC-Rec paper recipe: Amazon Instruments with LLaMA-7B, full fine-tune on a TPU v4-32.

  python -m lcrec_jax.main --config=configs/lcrec_instruments_llama7b.py --workdir=gs://BUCKET/runs/instruments \
      --config.data.path=gs://BUCKET/LC-Rec/data --config.model.hf_dir=/path/to/llama-7b-hf
  python -m lcrec_jax.plan --config=configs/lcrec_instruments_llama7b.py --mesh=fsdp=16

Everything but the dataset and fusionseqrec's sample count
(Instruments: 20,000) is shared: see configs/_lcrec_paper.py.
"""

from lcrec_jax.recipes import sibling

import ml_collections


def _paper():
  return sibling(__file__, "_lcrec_paper.py")


def get_config() -> ml_collections.ConfigDict:
  return _paper().paper_config("Instruments")
