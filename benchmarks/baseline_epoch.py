"""What training on every target costs the sequential baselines: targets, tokens, epoch time.

  python benchmarks/baseline_epoch.py                      # ML-100K, both models, timed
  python benchmarks/baseline_epoch.py --dataset=synthetic  # paper-scale counts, untimed

Compares the former training rows (each user's last ``max_len`` targets only, one row per
user) with :func:`lcrec_jax.baselines.sequential.training_pairs` (every target, windows of
``max_len`` targets with their context): targets trained per epoch, rows, padded tokens
(length buckets), and, with ``--time``, the seconds of one training epoch of each model
after a compile epoch (no validation), in one process, so both see the same machine load.
The synthetic set is the paper-scale one of ``benchmarks/scale_pipeline.py`` (24,772 users x
9,922 items, 206,153 interactions).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcrec_jax.baselines import gru4rec, sasrec, sequential  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "ml100k", ["ml100k", "synthetic"], "data")
_TIME = flags.DEFINE_bool("time", True, "time one epoch of each model (ml100k)")
_MAX_LEN = flags.DEFINE_integer("max_len", 50, "items of context per target")


def last_only_pairs(train, max_len):
  """The former rows: inputs ``s[:-1]``, targets ``s[1:]``, each cut to the last max_len."""
  seqs = [np.asarray(s) for s in train if len(s) >= 2]
  return [s[:-1][-max_len:] for s in seqs], [s[1:][-max_len:] for s in seqs]


def _train(split):
  if _DATASET.value == "ml100k":
    from lcrec_jax.data.movielens import load_movielens_100k  # noqa: PLC0415
    ds = load_movielens_100k()
    return ds, ds.split().train
  from lcrec_jax.data import synthetic  # noqa: PLC0415
  inter, _, _ = synthetic.generate(synthetic.SyntheticSpec(24772, 9922, 206153))
  seqs = [np.asarray(v[:-2]) for v in inter.values()]   # leave-one-out: valid, test held out
  return None, seqs


def _counts(inputs, labels, buckets):
  lab = sum(int((np.asarray(y) >= 0).sum()) for y in labels)
  padded = sum(sequential.bucket_of(len(x), buckets) for x in inputs)
  return lab, len(inputs), sum(len(x) for x in inputs), padded


def _epoch_seconds(model, cfg, inputs, labels, buckets):
  """Seconds of one epoch of training steps, after a first (compiling) epoch."""
  lengths = np.asarray([len(x) for x in inputs])
  params = model.init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32), train=False)["params"]
  tx = optax.adam(cfg.lr)

  @jax.jit
  def step(params, opt, key, x, y):
    key, rng = jax.random.split(key)
    loss, g = jax.value_and_grad(lambda p: sequential.loss_fn(
        model, p, x, y, train=True, rng=rng, label_span=cfg.max_len))(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, key, loss

  state = (params, tx.init(params), jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  times = []
  for _ in range(2):
    t0 = time.perf_counter()
    for b, idx in sequential.epoch_batches(lengths, cfg.batch_size, buckets, rng):
      x, y = sequential.make_batch(inputs, labels, idx, b)
      *state, loss = step(*state, x, y)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  return times[-1]


def main(argv):
  del argv
  ds, train = _train(None)
  L = _MAX_LEN.value
  old = last_only_pairs(train, L)
  new = sequential.training_pairs(train, L)
  total = sum(max(len(s) - 1, 0) for s in train)
  print(f"{_DATASET.value}: {len(train)} users, {total} next-item targets, max_len {L}")
  print("| rows | targets trained / epoch | rows | tokens | padded tokens |")
  print("|---|---|---|---|---|")
  for name, (x, y), b in (("last max_len per user (former)", old, sequential.length_buckets(L)),
                          ("every target, windows (now)", new,
                           sequential.length_buckets(sequential.window_len(L)))):
    lab, rows, tok, pad = _counts(x, y, b)
    print(f"| {name} | {lab} ({lab / total:.0%}) | {rows} | {tok} | {pad} |")
  if not (_TIME.value and ds is not None):
    return
  models = (("GRU4Rec", gru4rec.GRU4Rec(ds.num_items, L), gru4rec.GRU4RecConfig(max_len=L)),
            ("SASRec", sasrec.SASRec(ds.num_items, L, num_heads=2, dropout=0.5, inner=256,
                                     act="gelu"), sasrec.SASRecConfig(max_len=L)))
  print("\n| model | former epoch s | every-target epoch s | ratio |\n|---|---|---|---|")
  for name, model, cfg in models:
    t_old = _epoch_seconds(model, cfg, *old, sequential.length_buckets(L))
    t_new = _epoch_seconds(model, cfg, *new,
                           sequential.length_buckets(sequential.window_len(L)))
    print(f"| {name} (batch {cfg.batch_size} rows) | {t_old:.1f} | {t_new:.1f} | "
          f"{t_new / t_old:.2f}x |", flush=True)


if __name__ == "__main__":
  app.run(main)
