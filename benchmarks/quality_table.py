"""The like-for-like quality table of finished workdirs (every model, both protocols, seeds).

  python benchmarks/quality_table.py --workdirs=runs/s0,runs/s1,runs/s2
  python benchmarks/quality_table.py --workdirs=runs/s0,runs/s1 --split=valid --out=table.md

Reads each workdir's ``baselines/results.json`` and ``eval/results.json`` (whichever it has)
and prints one markdown table per protocol (all items ranked | seen items excluded):
lcrec-jax, popularity, SASRec and GRU4Rec, HR@5 / NDCG@5 / HR@10 / NDCG@10 as mean ± sd over
the seeds found. Refuses, with one line, workdirs that disagree on the dataset, catalogue or
users, lcrec-jax runs with different eval settings, and a seed found twice
(:mod:`lcrec_jax.pipeline.quality_table`).
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcrec_jax import cli  # noqa: E402
from lcrec_jax.errors import ConfigError  # noqa: E402
from lcrec_jax.pipeline import quality_table  # noqa: E402

_WORKDIRS = flags.DEFINE_list("workdirs", [], "Finished workdirs, comma-separated.")
_SPLIT = flags.DEFINE_enum("split", "test", ["valid", "test"], "Split reported.")
_OUT = flags.DEFINE_string("out", "", "Also write the markdown here.")


def main(argv):
  del argv
  if not _WORKDIRS.value:
    raise ConfigError("--workdirs: give at least one finished workdir")
  text = quality_table.markdown(quality_table.collect(_WORKDIRS.value, _SPLIT.value),
                                _SPLIT.value)
  print(text, end="")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)


if __name__ == "__main__":
  cli.run(main, "quality_table")
