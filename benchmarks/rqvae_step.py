"""Side-by-side: our jitted RQ-VAE train step vs a plain PyTorch eager one, same model.

One step = forward + loss + gradient + AdamW update, batch 256, in_dim 384, encoder
512-256-128-64, e_dim 32, 4 levels x 256 codes, Sinkhorn (epsilon 0.003, 50 rounds) on
the last level. The PyTorch side is written here the way LC-Rec writes it (eager modules,
Sinkhorn in float64 on centred distances); both sides start from the same weights (the
JAX initialisation with k-means codebooks, copied into torch) and the script checks that
their first losses agree before timing anything.

Both runtimes are pinned to the same ``--threads`` cores (``sched_setaffinity``), torch
gets ``set_num_threads(--threads)`` and ``OMP_WAIT_POLICY=PASSIVE``. Steps are timed in
alternating blocks (JAX block, torch block, ...) so that load from other processes hits
both alike; the median per-step time is reported.

  OMP_WAIT_POLICY=PASSIVE python benchmarks/rqvae_step.py --steps=50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=50, help="timed steps per side")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
  p.add_argument("--blocks", type=int, default=5, help="alternating timing blocks")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                 help="cores for both runtimes (default: all this process may use)")
  p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                 help="wall: perf_counter; cpu: process CPU time (all threads), steadier "
                      "on a machine shared with other jobs")
  return p.parse_args()


ARGS = _parse()
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lcrec_jax.index import rqvae as rq  # noqa: E402

IN_DIM, LAYERS, E_DIM, LEVELS, K = 384, (512, 256, 128, 64), 32, 4, 256
SK_EPS, SK_ITERS, BETA, LR, WD = (0.0, 0.0, 0.0, 0.003), 50, 0.25, 1e-3, 1e-4


# ----------------------------------------------------------------------------- PyTorch


def _torch_sinkhorn(d: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
  """LC-Rec's plain-domain Sinkhorn, float64, on centred distances."""
  mid = (d.max() + d.min()) / 2
  d = ((d - mid) / (d.max() - mid + 1e-5)).double()
  q = torch.exp(-d / eps)
  b, k = q.shape
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(dim=1, keepdim=True)
    q /= b
    q /= q.sum(dim=0, keepdim=True)
    q /= k
  return q * b


class TorchRQVAE(torch.nn.Module):
  """The same model in eager PyTorch."""

  def __init__(self):
    super().__init__()
    widths = (IN_DIM, *LAYERS, E_DIM)
    self.enc = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
    rw = widths[::-1]
    self.dec = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(rw[:-1], rw[1:]))
    self.codebooks = torch.nn.ParameterList(
        torch.nn.Parameter(torch.zeros(K, E_DIM)) for _ in range(LEVELS))

  @staticmethod
  def _mlp(layers, x):
    for i, lin in enumerate(layers):
      x = lin(x)
      if i < len(layers) - 1:
        x = F.relu(x)
    return x

  def forward(self, x):
    z = self._mlp(self.enc, x)
    residual, z_q, losses = z, torch.zeros_like(z), []
    for cb, eps in zip(self.codebooks, SK_EPS):
      d = (residual ** 2).sum(1, keepdim=True) + (cb ** 2).sum(1)[None] - 2 * residual @ cb.t()
      if eps > 0:
        idx = _torch_sinkhorn(d.detach(), eps, SK_ITERS).argmax(-1)
      else:
        idx = d.argmin(-1)
      e = cb[idx]
      losses.append(F.mse_loss(e, residual.detach()) + BETA * F.mse_loss(e.detach(), residual))
      out = residual + (e - residual).detach()
      residual = residual - out
      z_q = z_q + out
    recon = self._mlp(self.dec, z_q)
    return F.mse_loss(recon, x) + torch.stack(losses).mean()

  def load_flax(self, params) -> None:
    with torch.no_grad():
      for name, layers in (("encoder", self.enc), ("decoder", self.dec)):
        for i, lin in enumerate(layers):
          lin.weight.copy_(torch.from_numpy(np.asarray(params[name][f"dense_{i}"]["kernel"]).T.copy()))
          lin.bias.copy_(torch.from_numpy(np.array(params[name][f"dense_{i}"]["bias"])))
      for l, cb in enumerate(self.codebooks):
        cb.copy_(torch.from_numpy(np.array(params["quantizer"][f"level_{l}"]["codebook"])))


# --------------------------------------------------------------------------------- main


def main() -> None:
  torch.set_num_threads(ARGS.threads)
  rng = np.random.default_rng(0)
  data = rng.normal(size=(8 * ARGS.batch, IN_DIM)).astype(np.float32)
  data /= np.linalg.norm(data, axis=1, keepdims=True)  # like MiniLM's unit vectors
  batches = [data[i * ARGS.batch:(i + 1) * ARGS.batch] for i in range(8)]

  model = rq.RQVAE(in_dim=IN_DIM, encoder_layers=LAYERS, e_dim=E_DIM, num_levels=LEVELS,
                   codebook_size=K, dropout=0.0, batch_norm=False, beta=BETA,
                   sk_epsilons=SK_EPS, sk_iters=SK_ITERS)
  variables = model.init(jax.random.key(0), jnp.asarray(batches[0]), train=False)
  variables = rq.init_codebooks_kmeans(variables, model, jnp.asarray(data), jax.random.key(1), 20)
  params = variables["params"]
  tx = optax.adamw(LR, weight_decay=WD)
  opt_state = tx.init(params)

  def loss_of(p, x):
    return rq.loss_fn(model.apply({"params": p}, x, train=True), x)[0]

  @jax.jit
  def jax_step(p, o, x):
    loss, g = jax.value_and_grad(loss_of)(p, x)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  tmodel = TorchRQVAE()
  tmodel.load_flax(params)
  topt = torch.optim.AdamW(tmodel.parameters(), lr=LR, weight_decay=WD)
  tbatches = [torch.from_numpy(b) for b in batches]

  def torch_step(x):
    topt.zero_grad(set_to_none=True)
    loss = tmodel(x)
    loss.backward()
    topt.step()
    return loss

  # Same model: first-step losses agree.
  l_jax = float(jax.jit(loss_of)(params, jnp.asarray(batches[0])))
  with torch.no_grad():
    l_torch = float(tmodel(tbatches[0]))
  print(f"first loss: jax {l_jax:.6f}  torch {l_torch:.6f}")
  if abs(l_jax - l_torch) > 1e-4 * max(1.0, abs(l_torch)):
    raise SystemExit("rqvae_step: the two implementations disagree; not timing them")

  clock = time.perf_counter if ARGS.clock == "wall" else time.process_time
  jax_times, torch_times, step = [], [], 0
  p, o = params, opt_state
  for i in range(ARGS.warmup):
    p, o, loss = jax_step(p, o, batches[i % 8])
    loss.block_until_ready()
    torch_step(tbatches[i % 8])
  per_block = -(-ARGS.steps // ARGS.blocks)
  for _ in range(ARGS.blocks):
    for _ in range(per_block):
      t = clock()
      p, o, loss = jax_step(p, o, batches[step % 8])
      loss.block_until_ready()
      jax_times.append(clock() - t)
      step += 1
    for j in range(per_block):
      t = clock()
      torch_step(tbatches[(step - per_block + j) % 8])
      torch_times.append(clock() - t)
  jm = statistics.median(jax_times) * 1e3
  tm = statistics.median(torch_times) * 1e3
  print(f"threads={ARGS.threads} batch={ARGS.batch} steps/side={len(jax_times)} "
        f"clock={ARGS.clock} jax={jax.__version__} torch={torch.__version__}")
  print(f"jax   jitted step: median {jm:.2f} ms  (min {min(jax_times) * 1e3:.2f})")
  print(f"torch eager step:  median {tm:.2f} ms  (min {min(torch_times) * 1e3:.2f})")
  print(f"ratio torch/jax: {tm / jm:.2f}x")


if __name__ == "__main__":
  main()
