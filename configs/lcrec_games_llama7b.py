"""LC-Rec paper recipe: Amazon Games with LLaMA-7B, full fine-tune on a TPU v4-32.

  python -m lcrec_jax.main --config=configs/lcrec_games_llama7b.py --workdir=gs://BUCKET/runs/games \
      --config.data.path=gs://BUCKET/LC-Rec/data --config.model.hf_dir=/path/to/llama-7b-hf
  python -m lcrec_jax.plan --config=configs/lcrec_games_llama7b.py --mesh=fsdp=16

Everything but the dataset and fusionseqrec's sample count
(Games: 100,000) is shared: see configs/_lcrec_paper.py.
"""

import importlib.util
import os

import ml_collections


def _paper():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lcrec_paper.py")
  spec = importlib.util.spec_from_file_location("_lcrec_paper", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config() -> ml_collections.ConfigDict:
  return _paper().paper_config("Games")
