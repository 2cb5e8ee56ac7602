"""SASRec (Kang & McAuley, ICDM 2018) in Flax, trained with cross-entropy over all items.

The reference a generative recommender must beat on the same leave-one-out split:
causal self-attention over the user's last ``max_len`` items, next-item prediction at
every position, scores = hidden state · item embeddings (shared input/output table).
Full softmax over the catalogue instead of the paper's one sampled negative (known to
be markedly stronger; Klenitskiy & Vasilev, RecSys 2023). Validation NDCG@10 picks the
epoch; the test metrics come from those parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm.auto import tqdm

from lcrec_jax.data.dataset import Dataset
from lcrec_jax.eval.metrics import topk_metrics


class SASRec(nn.Module):
  """Item ids are shifted by one; 0 is padding. Returns ``[batch, len, dim]`` states."""

  num_items: int
  max_len: int
  dim: int = 64
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.2

  def setup(self):
    self.item_emb = nn.Embed(self.num_items + 1, self.dim,
                             embedding_init=nn.initializers.normal(1.0 / math.sqrt(self.dim)))
    self.pos_emb = nn.Embed(self.max_len, self.dim)
    self.attn = [nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=self.dropout)
                 for _ in range(self.num_blocks)]
    self.ln_attn = [nn.LayerNorm() for _ in range(self.num_blocks)]
    self.ln_ff = [nn.LayerNorm() for _ in range(self.num_blocks)]
    self.ff_in = [nn.Dense(self.dim) for _ in range(self.num_blocks)]
    self.ff_out = [nn.Dense(self.dim) for _ in range(self.num_blocks)]
    self.ln_out = nn.LayerNorm()
    self.drop = nn.Dropout(self.dropout)

  def __call__(self, seq: jax.Array, *, train: bool) -> jax.Array:
    """``seq [batch, len]`` (left-padded, 0 = pad) -> ``[batch, len, dim]``."""
    valid = (seq > 0)[..., None]
    x = self.item_emb(seq) * math.sqrt(self.dim) + self.pos_emb(jnp.arange(seq.shape[1]))
    x = self.drop(x, deterministic=not train) * valid
    mask = nn.make_attention_mask(seq > 0, seq > 0) * nn.make_causal_mask(seq)
    for i in range(self.num_blocks):
      q = self.ln_attn[i](x)
      x = x + self.drop(self.attn[i](q, x, mask=mask, deterministic=not train),
                        deterministic=not train)
      h = self.ln_ff[i](x)
      h = self.ff_out[i](self.drop(nn.relu(self.ff_in[i](h)), deterministic=not train))
      x = (x + self.drop(h, deterministic=not train)) * valid
    return self.ln_out(x)

  def scores(self, hidden: jax.Array) -> jax.Array:
    """``[..., dim]`` -> ``[..., num_items]`` scores of items 0..N-1."""
    return hidden @ self.item_emb.embedding[1:].T


@dataclasses.dataclass
class SASRecConfig:
  max_len: int = 200
  dim: int = 64
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.2
  lr: float = 1e-3
  batch_size: int = 128
  epochs: int = 200
  eval_every: int = 5
  patience: int = 10   # evaluations without improvement before stopping


def _left_pad(seqs: Sequence[np.ndarray], length: int) -> np.ndarray:
  """Last ``length`` items of each sequence, shifted by one, left-padded with 0."""
  out = np.zeros((len(seqs), length), np.int32)
  for r, s in enumerate(seqs):
    s = np.asarray(s[-length:], np.int32) + 1
    if len(s):
      out[r, -len(s):] = s
  return out


def train_and_evaluate(dataset: Dataset, cfg: SASRecConfig, seed: int = 0,
                       exclude_seen: bool = False) -> dict:
  """Train on the split's training sequences; return valid/test HR/NDCG and the history."""
  split = dataset.split()
  n = dataset.num_items
  model = SASRec(n, cfg.max_len, cfg.dim, cfg.num_blocks, cfg.num_heads, cfg.dropout)
  seqs = [s for s in split.train if len(s) >= 2]
  inputs = _left_pad([s[:-1] for s in seqs], cfg.max_len)
  targets = _left_pad([s[1:] for s in seqs], cfg.max_len) - 1     # -1 = padding

  key = jax.random.PRNGKey(seed)
  params = model.init(key, inputs[:1], train=False)["params"]
  tx = optax.adam(cfg.lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, rng):
    def loss_fn(p):
      h = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
      logits = model.apply({"params": p}, h, method=SASRec.scores)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
      w = (y >= 0).astype(jnp.float32)
      return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def last_scores(params, x):
    h = model.apply({"params": params}, x, train=False)[:, -1]
    return model.apply({"params": params}, h, method=SASRec.scores)

  def evaluate(params, examples):
    hist = _left_pad([e.history for e in examples], cfg.max_len)
    scores = np.concatenate([np.asarray(last_scores(params, hist[i:i + 512]))
                             for i in range(0, len(hist), 512)])
    if exclude_seen:
      for r, e in enumerate(examples):
        scores[r, e.history] = -np.inf
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :20]
    return topk_metrics(ranked, np.array([e.target for e in examples]))

  rng = np.random.default_rng(seed)
  best, best_params, bad, history = -1.0, params, 0, []
  pbar = tqdm(range(1, cfg.epochs + 1), desc="sasrec", leave=False)
  for epoch in pbar:
    perm = rng.permutation(len(inputs))
    losses = []
    for i in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
      idx = perm[i:i + cfg.batch_size]
      key, sub = jax.random.split(key)
      params, opt_state, loss = step(params, opt_state, inputs[idx], targets[idx], sub)
      losses.append(float(loss))
    if epoch % cfg.eval_every == 0:
      valid = evaluate(params, split.valid)
      history.append({"epoch": epoch, "loss": float(np.mean(losses)), **valid})
      pbar.set_postfix(loss=f"{np.mean(losses):.3f}", ndcg10=f"{valid['NDCG@10']:.4f}")
      if valid["NDCG@10"] > best:
        best, best_params, bad = valid["NDCG@10"], params, 0
      else:
        bad += 1
        if bad >= cfg.patience:
          break
  logging.info("sasrec: best valid NDCG@10 %.4f", best)
  return {"valid": evaluate(best_params, split.valid), "test": evaluate(best_params, split.test),
          "history": history, "config": dataclasses.asdict(cfg)}
