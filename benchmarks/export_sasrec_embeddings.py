"""Train the in-project SASRec and save its item embeddings as .npy for LETTER's CF term.

The collaborative term of the RQ-VAE (``rqvae.cf_weight``, LETTER) needs one embedding per
item of width ``rqvae.e_dim``, row i = the dataset's item i. This trains
``lcrec_jax.baselines.sasrec.SASRec`` (width ``--dim``) on the leave-one-out training
sequences with the baselines' own batching and loss (``lcrec_jax.baselines.sequential``),
keeps the parameters of the best valid NDCG@10 (all items ranked; validated every
``--eval_every`` epochs, stopping after ``--patience`` evaluations without a gain), and
writes ``item_emb[1:]`` (``[num_items, dim]`` float32; row 0 of the table is padding).
Only training and valid data are used, never the test items. ``--sasrec_out=S.npz`` also
writes that whole SASRec (``lcrec_jax.baselines.sasrec.save``): the rl stage's collaborative
reward reads it (``--config.rl.reward_collab=W --config.rl.collab_sasrec=S.npz``).

  python benchmarks/export_sasrec_embeddings.py --out=/tmp/levers/sasrec32.npy --dim=32
  python -m lcrec_jax.main --config=configs/ml100k_quick.py --workdir=runs/letter \\
      --config.rqvae.cf_weight=0.01 --config.rqvae.cf_embeddings=/tmp/levers/sasrec32.npy \\
      --config.rqvae.diversity_weight=1e-4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from lcrec_jax.baselines import sasrec, sequential  # noqa: E402
from lcrec_jax.baselines.sasrec import SASRec  # noqa: E402
from lcrec_jax.data.dataset import Dataset  # noqa: E402


def train_item_embeddings(dataset: Dataset, *, dim: int = 32, max_len: int = 50,
                          epochs: int = 200, eval_every: int = 5, patience: int = 6,
                          lr: float = 1e-3, batch_size: int = 128, dropout: float = 0.2,
                          seed: int = 0) -> tuple[np.ndarray, dict]:
  """``(item embeddings [num_items, dim] float32, info)`` of a SASRec trained on ``dataset``.

  ``info``: ``best_epoch``, ``valid`` (the best valid metrics, all items ranked),
  ``epochs_run``, ``seconds``, ``model`` and ``params`` (that SASRec).
  """
  t0 = time.perf_counter()
  split, n = dataset.split(), dataset.num_items
  model = SASRec(n, max_len, dim, 2, 1, dropout)
  buckets = sequential.length_buckets(max_len)
  inputs, targets = sequential.training_pairs(split.train, max_len)
  lengths = np.asarray([len(s) for s in inputs])
  params = model.init(jax.random.PRNGKey(seed), np.ones((1, buckets[0]), np.int32),
                      train=False)["params"]
  tx = optax.adam(lr)
  opt_state, key = tx.init(params), jax.random.PRNGKey(seed + 1)

  @jax.jit
  def step(params, opt_state, key, x, y):
    key, rng = jax.random.split(key)
    loss, grads = jax.value_and_grad(
        lambda p: sequential.loss_fn(model, p, x, y, train=True, rng=rng))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, key, loss

  @jax.jit
  def last_scores(params, x):
    h = model.apply({"params": params}, x, train=False)[:, -1]
    return model.apply({"params": params}, h, method="scores")

  rng = np.random.default_rng(seed)
  best, bad, epoch = (-1.0, params, 0, None), 0, 0
  for epoch in range(1, epochs + 1):
    for b, idx in sequential.epoch_batches(lengths, batch_size, buckets, rng):
      x, y = sequential.make_batch(inputs, targets, idx, b)
      params, opt_state, key, _ = step(params, opt_state, key, x, y)
    if epoch % eval_every and epoch != epochs:
      continue
    valid = sequential.evaluate_split(lambda x: last_scores(params, x), split.valid, n,
                                      max_len)["unmasked"]
    print(f"sasrec epoch {epoch}: valid HR@10 {valid['HR@10']:.4f} NDCG@10 "
          f"{valid['NDCG@10']:.4f}", flush=True)
    if valid["NDCG@10"] > best[0]:
      best, bad = (valid["NDCG@10"], params, epoch, valid), 0
    else:
      bad += 1
      if bad >= patience:
        break
  emb = np.asarray(best[1]["item_emb"]["embedding"], np.float32)[1:]
  return emb, {"best_epoch": best[2], "valid": best[3], "epochs_run": epoch,
               "seconds": time.perf_counter() - t0, "model": model, "params": best[1]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="where to write the .npy")
  p.add_argument("--sasrec_out", default="",
                 help="also write the SASRec itself (.npz) for rl.collab_sasrec")
  p.add_argument("--dim", type=int, default=32, help="= rqvae.e_dim of the recipe")
  p.add_argument("--data_format", default="movielens")
  p.add_argument("--data_path", default="", help='"" = the recbole wheel\'s ml-100k')
  p.add_argument("--data_name", default="ml-100k")
  p.add_argument("--epochs", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  from lcrec_jax.data.loaders import load_dataset  # pylint: disable=g-import-not-at-top
  from lcrec_jax.pipeline import spec  # pylint: disable=g-import-not-at-top
  ds = load_dataset(spec.section_settings("data", {"format": a.data_format, "path": a.data_path, "name": a.data_name}))
  emb, info = train_item_embeddings(ds, dim=a.dim, epochs=a.epochs, seed=a.seed)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
  np.save(a.out, emb)
  print(f"wrote {a.out}: {list(emb.shape)} float32; best valid (all items ranked) "
        f"{info['valid']} at epoch {info['best_epoch']} of {info['epochs_run']}, "
        f"{info['seconds']:.0f}s")
  if a.sasrec_out:
    os.makedirs(os.path.dirname(os.path.abspath(a.sasrec_out)) or ".", exist_ok=True)
    sasrec.save(a.sasrec_out, info["model"], info["params"])
    print(f"wrote {a.sasrec_out}: the SASRec (rl.collab_sasrec)")


if __name__ == "__main__":
  main()
