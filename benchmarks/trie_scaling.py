"""How the item-code trie's memory and one masked beam step grow with the catalogue.

  python benchmarks/trie_scaling.py                    # 1k, 10k, 100k, 1M items
  python benchmarks/trie_scaling.py --quick            # fewer timing repeats
  python benchmarks/trie_scaling.py --sizes=1000,50000 --rows=640

For each size: a synthetic conflict-free index of random codes (4 levels x 256 codes), the
trie built in each layout (dense only while its table stays under ``--dense_max_mib``), and

* ``MiB``: ``Trie.nbytes()`` (device arrays of the trie); ``edges``: trie edges (all levels);
  ``deg``: CSR's padded width, the largest number of children of a node;
* ``build s``: ``build_trie`` wall time (numpy, once per index);
* ``step us``: median wall time of one jitted ``Trie.allowed(level, nodes)`` for ``--rows``
  nodes (batch x beams, default 16 x 20) at the last level, where nodes are most numerous,
  with random existing node ids and the level passed as a traced scalar as inside the beam
  search's ``fori_loop``. Output: ``[rows, 256]`` mask and children.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lcrec_jax.decode.trie import build_trie  # noqa: E402
from lcrec_jax.index.item_index import ItemIndex  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["1000", "10000", "100000", "1000000"], "catalogue sizes")
_ROWS = flags.DEFINE_integer("rows", 16 * 20, "nodes per masked step (batch x beams)")
_DENSE_MAX = flags.DEFINE_integer("dense_max_mib", 1024, "skip dense layouts larger than this")
_QUICK = flags.DEFINE_bool("quick", False, "fewer timing repeats")

LEVELS, CODES = 4, 256


def synthetic_index(num_items: int, seed: int = 0) -> ItemIndex:
  """``num_items`` distinct random codes over 4 levels x 256 codes."""
  rng = np.random.default_rng(seed)
  codes = np.unique(rng.integers(0, CODES, (int(num_items * 1.05) + 16, LEVELS)), axis=0)
  if len(codes) < num_items:
    raise ValueError(f"--sizes: could not draw {num_items} distinct codes")
  codes = codes[rng.permutation(len(codes))[:num_items]].astype(np.int32)
  return ItemIndex(tuple(str(i) for i in range(num_items)), codes, (CODES,) * LEVELS)


def dense_mib(codes: np.ndarray) -> float:
  """Size the dense table would have: ``L x max nodes per level x 256`` int32."""
  nodes = max(len(np.unique(codes[:, :l], axis=0)) for l in range(LEVELS))
  return LEVELS * nodes * CODES * 4 / 2**20


def time_step(trie, num_nodes: int, rows: int, repeats: int) -> float:
  """Median seconds of one jitted ``trie.allowed`` at the last level over ``rows`` nodes."""
  step = jax.jit(lambda t, level, nodes: t.allowed(level, nodes))
  rng = np.random.default_rng(1)
  level = jnp.int32(LEVELS - 1)
  batches = [jnp.asarray(rng.integers(0, num_nodes, rows), jnp.int32) for _ in range(4)]
  jax.block_until_ready(step(trie, level, batches[0]))  # compile
  times = []
  for i in range(repeats):
    nodes = batches[i % len(batches)]
    t0 = time.perf_counter()
    jax.block_until_ready(step(trie, level, nodes))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  repeats = 20 if _QUICK.value else 100
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {LEVELS} levels x {CODES} codes, "
        f"step over {_ROWS.value} nodes, median of {repeats}", flush=True)
  header = f"{'items':>9} {'layout':>6} {'MiB':>9} {'edges':>9} {'deg':>4} {'build s':>8} {'step us':>9}"
  print(header)
  print("-" * len(header), flush=True)
  for size in (int(s) for s in _SIZES.value):
    index = synthetic_index(size)
    last_nodes = len(np.unique(index.codes[:, :LEVELS - 1], axis=0))
    need = dense_mib(index.codes)
    for layout in ("dense", "csr"):
      if layout == "dense" and need > _DENSE_MAX.value:
        print(f"{size:>9} {'dense':>6} {need:>9.1f} {'':>9} {'':>4} {'skipped: > --dense_max_mib':>18}",
              flush=True)
        continue
      t0 = time.perf_counter()
      trie = jax.block_until_ready(build_trie(index, layout))
      build = time.perf_counter() - t0
      kids = trie.table if layout == "dense" else trie.edge_children
      edges = int((kids >= 0).sum())
      deg = str(trie.max_degree) if layout == "csr" else ""
      step = time_step(trie, last_nodes, _ROWS.value, repeats)
      print(f"{size:>9} {layout:>6} {trie.nbytes() / 2**20:>9.2f} {edges:>9} "
            f"{deg:>4} {build:>8.2f} {step * 1e6:>9.0f}", flush=True)
      del trie


if __name__ == "__main__":
  app.run(main)
