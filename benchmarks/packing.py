"""Sequence packing (tasks.pack_length) vs one example per row: throughput of the train step.

Reads the tokenized training examples a quick-recipe train stage wrote
(`<workdir>/train/examples/lcrec_examples/<fingerprint>/1.0.0`) and its trained tokenizer
(`<workdir>/train/tokenizer/`) with the codes of `<workdir>/index/index.json` (the vocabulary
size and the code-token ids of the history loss), builds the quick recipe's model (configs/ml100k_quick.py: 2 layers,
width 128, 4/2 heads, MLP 384, random init) and runs the jitted train step (AdamW, float32,
one device) on the batches the train stage would feed, with and without packing:

  unpacked        one example per row, each in its bucket (128 / 192 / 256 / 384), today
  packed:<L>      examples packed first-fit into rows of <= L tokens (segment ids)
  bucket:<L>      packed first-fit, a row holding up to its opening example's bucket
                  length (tasks.pack_rows=bucket): rows never longer than unpacked ones

Every shape is compiled before timing. Modes alternate in blocks so load from other
processes hits them alike; per mode the median step time is reported with real (non-pad)
tokens/s, examples/s, steps and examples per 10 minutes, and the fraction of row slots
that are padding. Run it through the heavy lock on the shared CPU:

  flock /tmp/lcrec-heavy.lock nice -n 5 python benchmarks/packing.py \
      --workdir=/tmp/levers/quick --modes=unpacked,packed:384,packed:512,bucket:384
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a quick-recipe workdir after its train "
                 "stage wrote train/examples and train/tokenizer")
  p.add_argument("--modes", default="unpacked,packed:384,packed:512,bucket:384")
  p.add_argument("--batch", type=int, default=16, help="rows per step (train.batch_size)")
  p.add_argument("--steps", type=int, default=12, help="timed steps per block per mode")
  p.add_argument("--blocks", type=int, default=2)
  p.add_argument("--seed", type=int, default=42)
  return p.parse_args()


ARGS = _parse()
from lcrec_jax.pipeline import spec  # noqa: E402
from lcrec_jax import cpu_flags  # noqa: E402  (before jax: XLA reads XLA_FLAGS once)

cpu_flags.apply_recommended(force=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lcrec_jax.index.item_index import ItemIndex  # noqa: E402
from lcrec_jax.llm import config as config_lib  # noqa: E402
from lcrec_jax.llm.tokenizer import LCRecTokenizer  # noqa: E402
from lcrec_jax.llm.model import Llama, init_params  # noqa: E402
from lcrec_jax.tasks import grain_batches  # noqa: E402
from lcrec_jax.train import state as state_lib  # noqa: E402
from lcrec_jax.train import step as step_lib  # noqa: E402

def _inputs(workdir: str):
  found = glob.glob(os.path.join(workdir, "train", "examples", "lcrec_examples", "*", "1.0.0"))
  if len(found) != 1:
    raise SystemExit(f"packing benchmark: expected one prepared examples dir under {workdir}/"
                     f"train/examples, found {found}")
  tok = LCRecTokenizer.from_dir(os.path.join(workdir, "train", "tokenizer"))
  index = ItemIndex.load(os.path.join(workdir, "index", "index.json"))
  tok.add_code_tokens(index.all_tokens())  # as the train stage does
  code_ids = tok.code_token_ids(index).ravel()
  return found[0], tok.vocab_size, code_ids[code_ids >= 0]


def _mode(name: str, examples: str, code_ids: np.ndarray):
  kind, _, length = name.partition(":")
  pack = int(length) if kind in ("packed", "bucket") else 0
  b = grain_batches.GrainBatcher(examples, "train", batch_size=ARGS.batch,
                                 prompt_label_ids=code_ids,
                                 prompt_label_tasks=("seqrec", "fusionseqrec"),
                                 num_threads=0, pack_length=pack, seed=ARGS.seed,
                                 pack_rows="bucket" if kind == "bucket" else "fixed")
  return b, pack > 0


def main() -> None:
  examples, vocab, code_ids = _inputs(ARGS.workdir)
  cfg = config_lib.tiny(vocab=vocab, hidden=128, layers=2, heads=4, kv_heads=2,
                        intermediate=384)
  model = Llama(cfg)
  params = init_params(cfg, jax.random.PRNGKey(0))
  tc = spec.section_settings("train", lr=2e-3, warmup_steps=20, schedule="cosine",
                             weight_decay=0.01, max_grad_norm=1.0, b1=0.9, b2=0.999,
                             eps=1e-8)
  tx, schedule = state_lib.make_optimizer(tc, 1200)
  print(f"examples {examples}, vocab {vocab}, {len(code_ids)} code tokens, "
        f"batch {ARGS.batch}, devices {jax.device_count()}", flush=True)

  modes = {}
  for name in ARGS.modes.split(","):
    batcher, packed = _mode(name, examples, code_ids)
    fn = step_lib.make_train_step(model, tx, shardings=None, mesh=None, schedule=schedule,
                                  packed=packed, donate=False)
    trainable, frozen = state_lib.split_params(params, None)
    state = state_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32),
                                 trainable=trainable, frozen=frozen,
                                 opt_state=tx.init(trainable), rng=jax.random.PRNGKey(1))
    plan = list(batcher.batches(ARGS.seed, 0))
    t0 = time.perf_counter()
    for shape in sorted(batcher.shapes):  # compile every shape before timing
      batch = next(b for b in plan if b["tokens"].shape == shape)
      jax.block_until_ready(fn(state, batch))
    n_ex = len(batcher) if batcher.packed is None else sum(len(r) for r in batcher.packed.rows)
    rows = len(batcher) if batcher.packed is None else len(batcher.packed)
    pad = 1.0 - sum(float(b["attention_mask"].sum()) for b in plan) / sum(
        b["tokens"].size for b in plan)
    print(f"{name}: {batcher.steps_per_epoch} steps/epoch, {n_ex / rows:.2f} examples/row, "
          f"{pad:.1%} of row slots padding, shapes {sorted(batcher.shapes)}, compiled in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    modes[name] = dict(fn=fn, state=state, plan=plan, times=[], tokens=[], examples=[],
                       per_row=n_ex / rows)

  for block in range(ARGS.blocks):
    for name, m in modes.items():
      start = block * ARGS.steps
      for batch in m["plan"][start:start + ARGS.steps]:
        t = time.perf_counter()
        jax.block_until_ready(m["fn"](m["state"], batch))
        m["times"].append(time.perf_counter() - t)
        m["tokens"].append(float(batch["attention_mask"].sum()))
        seg = batch.get("segment_ids", batch["attention_mask"])
        m["examples"].append(float(sum(len(np.unique(r[r > 0])) for r in seg)))
  print(f"{'mode':<14}{'step s':>8}{'tokens/s':>10}{'examples/s':>12}{'steps/10min':>13}"
        f"{'examples/10min':>16}")
  for name, m in modes.items():
    med = statistics.median(m["times"])
    tps = sum(m["tokens"]) / sum(m["times"])
    eps = sum(m["examples"]) / sum(m["times"])
    print(f"{name:<14}{med:>8.3f}{tps:>10.0f}{eps:>12.1f}{600 / med:>13.0f}{600 * eps:>16.0f}")


if __name__ == "__main__":
  main()
