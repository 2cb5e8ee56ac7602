"""Side-by-side: one LLaMA training step, ours (jitted) vs PyTorch `transformers` eager.

Model: the SmolLM2-135M architecture with random weights, identical on both sides (the
torch state dict is loaded into ours). One step = forward + next-token cross-entropy
over all positions + gradient + AdamW update, batch `--batch` x `--length` tokens.

Modes:
  full  all parameters train (torch: `torch.optim.AdamW` over every parameter).
  lora  rank-`--rank` adapters on q, k, v, o, gate, up, down (alpha = 2 * rank), base
        frozen; ours adds them on the fly (`Llama.apply(..., lora=...)`), torch wraps
        each targeted `nn.Linear` the same way (no PEFT dependency).

The first losses of both sides are compared before timing. Timings alternate in blocks
so load from other processes hits both alike; medians are reported as tokens/s and
the ratio ours / torch (> 1 means ours is faster).

XLA:CPU runs with `lcrec_jax/cpu_flags.py`'s recommended flags unless `--no-cpu_flags`.

  python benchmarks/llama_train_step.py --modes=full,lora --batch=2 --length=64
"""

from __future__ import annotations

import argparse
import functools
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
  p.add_argument("--modes", default="full,lora")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--length", type=int, default=64)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--layers", type=int, default=30, help="decoder layers (30 = SmolLM2-135M)")
  p.add_argument("--remat", default="none", help="our remat policy (none, full, dots, ...)")
  p.add_argument("--model", choices=("smollm2", "quick"), default="smollm2",
                 help="smollm2: SmolLM2-135M; quick: configs/ml100k_quick.py's model "
                      "(2 layers, width 128, 4/2 heads, vocab 50,176 + 1,024 codes)")
  p.add_argument("--label_tokens", type=int, default=0,
                 help="> 0: loss only on each row's last N tokens (a response), as in "
                      "LC-Rec tuning; ours then runs the trainer's loss "
                      "(lcrec_jax.train.step.label_loss_sums: logits only at label "
                      "positions), torch gets labels=-100 elsewhere")
  p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                 help="nn.scan over layers (default off: unrolled layers run faster on CPU)")
  p.add_argument("--steps", type=int, default=2, help="timed steps per block per side")
  p.add_argument("--blocks", type=int, default=2, help="alternating timing blocks")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
  p.add_argument("--cpu_flags", action=argparse.BooleanOptionalAction, default=True,
                 help="append lcrec_jax.cpu_flags.RECOMMENDED to XLA_FLAGS (as "
                      "lcrec_jax.main does on CPU); --no-cpu_flags: XLA:CPU defaults")
  return p.parse_args()


ARGS = _parse()
if ARGS.cpu_flags:
  from lcrec_jax import cpu_flags  # before jax: XLA reads XLA_FLAGS once

  cpu_flags.apply_recommended(force=True)
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lcrec_jax.llm import config as config_lib  # noqa: E402
from lcrec_jax.llm import convert  # noqa: E402
from lcrec_jax.llm import lora as lora_lib  # noqa: E402
from lcrec_jax.llm import model as model_lib  # noqa: E402

torch.set_num_threads(ARGS.threads)
_clock = time.perf_counter if ARGS.clock == "wall" else time.process_time
LR = 1e-4
TARGETS = lora_lib.TARGETS


class TorchLora(torch.nn.Module):
  """y = base(x) + scale * B(A(x)) with a frozen base `nn.Linear`."""

  def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
    super().__init__()
    self.base = base
    self.a = torch.nn.Linear(base.in_features, rank, bias=False)
    self.b = torch.nn.Linear(rank, base.out_features, bias=False)
    torch.nn.init.zeros_(self.b.weight)
    self.scale = alpha / rank

  def forward(self, x):
    return self.base(x) + self.scale * self.b(self.a(x))


def _torch_setup(tm, mode):
  if mode == "lora":
    for p in tm.parameters():
      p.requires_grad_(False)
    for layer in tm.model.layers:
      for mod in (layer.self_attn, layer.mlp):
        for name in TARGETS:
          if hasattr(mod, name):
            setattr(mod, name, TorchLora(getattr(mod, name), ARGS.rank, 2.0 * ARGS.rank))
  trainable = [p for p in tm.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)

  def step(tt, lt):
    out = tm(input_ids=tt, labels=lt)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())

  return step, sum(p.numel() for p in trainable)


def _labels(toks: np.ndarray) -> np.ndarray:
  """HF-style labels: the tokens themselves, -100 except the last --label_tokens."""
  labels = toks.copy()
  if ARGS.label_tokens > 0:
    labels[:, : toks.shape[1] - ARGS.label_tokens] = -100
  return labels


def _loss_fn(model):
  """Loss of `params` (or a `lora.LoraTree`) on `(tokens, labels)`."""
  if ARGS.label_tokens > 0:
    from lcrec_jax.train import step as step_lib

    def loss(p, toks, labels):
      b, t = toks.shape
      batch = {"tokens": toks, "labels": labels,
               "attention_mask": jnp.ones_like(toks),
               "positions": jnp.broadcast_to(jnp.arange(t), (b, t))}
      total, (count, _) = step_lib.label_loss_sums(p, model, batch, ARGS.label_tokens)
      return total / count
    return loss

  def loss(p, toks, labels):
    del labels
    if isinstance(p, lora_lib.LoraTree):
      logits = model.apply({"params": p.params}, toks, lora=p.lora)[0]
    else:
      logits = model.apply({"params": p}, toks)[0]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], -1))
  return loss


def _jax_setup(cfg, params, mode):
  model = model_lib.Llama(cfg)
  opt = optax.adamw(LR, weight_decay=0.0)
  if mode == "full":
    state = opt.init(params)

    loss_fn = _loss_fn(model)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # update in place, as torch does
    def step(params, state, toks, labels):
      loss, g = jax.value_and_grad(loss_fn)(params, toks, labels)
      upd, state = opt.update(g, state, params)
      return optax.apply_updates(params, upd), state, loss

    n = sum(x.size for x in jax.tree.leaves(params))
    holder = {"p": params, "s": state}

    def run(toks, labels):
      holder["p"], holder["s"], loss = step(holder["p"], holder["s"], toks, labels)
      return loss
    return run, n

  lo = lora_lib.init_lora(jax.random.PRNGKey(0), params, cfg, rank=ARGS.rank,
                          alpha=2.0 * ARGS.rank, targets=TARGETS)
  state = opt.init(lo)

  loss_fn = _loss_fn(model)

  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def lstep(params, lo, state, toks, labels):
    f = lambda l: loss_fn(lora_lib.LoraTree(params=params, lora=l), toks, labels)
    loss, g = jax.value_and_grad(f)(lo)
    upd, state = opt.update(g, state, lo)
    return optax.apply_updates(lo, upd), state, loss

  holder = {"l": lo, "s": state}

  def lrun(toks, labels):
    holder["l"], holder["s"], loss = lstep(params, holder["l"], holder["s"], toks, labels)
    return loss
  return lrun, sum(x.size for x in jax.tree.leaves(lo))


def main() -> None:
  if ARGS.model == "quick":
    cfg = config_lib.tiny(vocab=50176 + 1024, hidden=128, layers=2, heads=4, kv_heads=2,
                          intermediate=384, scan_layers=ARGS.scan,
                          remat_policy=ARGS.remat)
  else:
    cfg = config_lib.smollm2_135m(num_hidden_layers=ARGS.layers, scan_layers=ARGS.scan,
                                  remat_policy=ARGS.remat)
  hf_cfg = dict(cfg.to_hf_dict())
  for k in ("architectures", "model_type", "torch_dtype", "dtype"):
    hf_cfg.pop(k, None)
  toks = np.random.default_rng(0).integers(0, cfg.vocab_size,
                                           (ARGS.batch, ARGS.length)).astype(np.int32)
  ntok = toks.size
  name = "SmolLM2-135M architecture" if ARGS.model == "smollm2" else "quick-recipe model"
  print(f"{name}, {cfg.num_hidden_layers} layers, float32, batch "
        f"{ARGS.batch} x {ARGS.length} tokens, threads={ARGS.threads}, clock={ARGS.clock}, "
        f"remat={ARGS.remat}, scan={ARGS.scan}, label_tokens={ARGS.label_tokens or 'all'}, jax {jax.__version__}, torch {torch.__version__}")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"{'mode':>5} {'trainable':>10} {'ours tok/s':>10} {'torch tok/s':>11} "
        f"{'ours/torch':>10} {'compile s':>9} {'loss ours':>9} {'loss torch':>10}")
  for mode in ARGS.modes.split(","):
    torch.manual_seed(0)
    tm = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf_cfg, attn_implementation="sdpa")).train()
    sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    params = jax.device_put(convert.params_from_hf(sd, cfg))
    del sd
    run_j, n_j = _jax_setup(cfg, params, mode)
    run_t, n_t = _torch_setup(tm, mode)
    labels = _labels(toks)
    jt, tt = jnp.asarray(toks), torch.tensor(toks, dtype=torch.long)
    jl, tl = jnp.asarray(labels), torch.tensor(labels, dtype=torch.long)
    t0 = time.perf_counter()
    loss_j = float(run_j(jt, jl))
    compile_s = time.perf_counter() - t0
    loss_t = run_t(tt, tl)
    tj, tts = [], []
    for _ in range(ARGS.blocks):
      for _ in range(ARGS.steps):
        t0 = _clock()
        jax.block_until_ready(run_j(jt, jl))
        tj.append(_clock() - t0)
      for _ in range(ARGS.steps):
        t0 = _clock()
        run_t(tt, tl)
        tts.append(_clock() - t0)
    rj, rt = ntok / statistics.median(tj), ntok / statistics.median(tts)
    assert n_j == n_t, (n_j, n_t)
    print(f"{mode:>5} {n_j:>10d} {rj:>10.1f} {rt:>11.1f} {rj / rt:>10.2f} {compile_s:>9.1f} "
          f"{loss_j:>9.4f} {loss_t:>10.4f}", flush=True)


if __name__ == "__main__":
  main()
