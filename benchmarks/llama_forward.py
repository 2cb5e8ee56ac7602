"""Side-by-side: our jitted Flax LLaMA forward vs PyTorch `transformers` eager, same weights.

Model: the SmolLM2-135M architecture (30 layers, E=576, GQA 9/3 heads, tied
embeddings, V=49152) with random weights: a torch `LlamaForCausalLM` is built from
the config and its state dict is loaded into ours with `convert.params_from_hf`, and
the script checks that both give the same logits before timing. Work per call: full
logits `[B, T, V]` for a batch x length grid, no KV cache.

Both runtimes use the same `--threads` cores (`sched_setaffinity`; torch
`set_num_threads`); timings alternate in blocks (ours, torch, ours, ...) so load from
other processes hits both alike; medians per call are reported with the ratio
torch / ours (> 1 means ours is faster).

  python benchmarks/llama_forward.py --batches=1,4 --lengths=32,128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
  p.add_argument("--lengths", default="32,128", help="comma-separated sequence lengths")
  p.add_argument("--reps", type=int, default=3, help="timed calls per block per side")
  p.add_argument("--blocks", type=int, default=3, help="alternating timing blocks")
  p.add_argument("--layers", type=int, default=30, help="decoder layers (30 = SmolLM2-135M)")
  p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                 help="torch attention implementation")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                 help="wall: perf_counter; cpu: process CPU time (steadier when shared)")
  return p.parse_args()


ARGS = _parse()
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lcrec_jax.llm import config as config_lib  # noqa: E402
from lcrec_jax.llm import convert  # noqa: E402
from lcrec_jax.llm import model as model_lib  # noqa: E402

torch.set_num_threads(ARGS.threads)
_clock = time.perf_counter if ARGS.clock == "wall" else time.process_time


def _median_time(fn, reps: int) -> list[float]:
  out = []
  for _ in range(reps):
    t0 = _clock()
    fn()
    out.append(_clock() - t0)
  return out


def main() -> None:
  cfg = config_lib.smollm2_135m(num_hidden_layers=ARGS.layers, scan_layers=True)
  hf_cfg = dict(cfg.to_hf_dict())
  for k in ("architectures", "model_type", "torch_dtype", "dtype"):
    hf_cfg.pop(k, None)
  torch.manual_seed(0)
  tm = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(**hf_cfg, attn_implementation=ARGS.attn)).eval()
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  params = jax.device_put(convert.params_from_hf(sd, cfg))
  model = model_lib.Llama(cfg)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  print(f"SmolLM2-135M architecture, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_params() / 1e6:.1f}M params, float32, threads={ARGS.threads}, "
        f"clock={ARGS.clock}, torch attn={ARGS.attn}, jax {jax.__version__}, "
        f"torch {torch.__version__}")
  print(f"{'B':>3} {'T':>5} {'ours ms':>9} {'torch ms':>9} {'torch/ours':>10} "
        f"{'compile s':>9} {'max|dlogit|':>11}")
  rng = np.random.default_rng(0)
  for b in [int(x) for x in ARGS.batches.split(",")]:
    for t in [int(x) for x in ARGS.lengths.split(",")]:
      toks = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
      jt = jnp.asarray(toks)
      tt = torch.tensor(toks, dtype=torch.long)
      t0 = time.perf_counter()
      ours = np.asarray(fwd(params, jt))
      compile_s = time.perf_counter() - t0
      with torch.no_grad():
        ref = tm(input_ids=tt).logits.numpy()
      err = float(np.abs(ours - ref).max())
      run_jax = lambda: fwd(params, jt).block_until_ready()

      def run_torch():
        with torch.no_grad():
          tm(input_ids=tt)

      tj, tt_ = [], []
      for _ in range(ARGS.blocks):
        tj += _median_time(run_jax, ARGS.reps)
        tt_ += _median_time(run_torch, ARGS.reps)
      mj, mt = statistics.median(tj) * 1e3, statistics.median(tt_) * 1e3
      print(f"{b:>3} {t:>5} {mj:>9.1f} {mt:>9.1f} {mt / mj:>10.2f} {compile_s:>9.1f} "
            f"{err:>11.2e}", flush=True)


if __name__ == "__main__":
  main()
