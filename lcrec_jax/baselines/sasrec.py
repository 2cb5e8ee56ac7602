"""SASRec (Kang & McAuley, ICDM 2018) in Flax, trained with cross-entropy over all items.

The reference a generative recommender must beat on the same leave-one-out split:
causal self-attention over the user's last ``max_len`` items, next-item prediction at
every position, scores = hidden state · item embeddings (shared input/output table).
Full softmax over the catalogue instead of the paper's one sampled negative (known to
be markedly stronger; Klenitskiy & Vasilev, RecSys 2023). Training on length buckets,
ranking on the device and model selection per protocol:
:mod:`lcrec_jax.baselines.sequential`.

Positions count back from the last item of a row (the last one always has the table's last
position), so a left-padded sequence gives the same states at its real positions whatever
the padded length: a bucket of 8 equals the classic fixed ``max_len`` padding. Training rows
are windows of up to ``2 * max_len - 1`` items (:func:`sequential.training_pairs`), so the
table has that many positions and attention is banded: a position attends to itself and
the ``max_len - 1`` items before it, the input RecBole gives each target. Ranking reads the
last ``<= max_len`` items, where the band changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcrec_jax.baselines import sequential
from lcrec_jax.data.dataset import Dataset


class SASRec(nn.Module):
  """Item ids are shifted by one; 0 is padding. Returns ``[batch, len, dim]`` states."""

  num_items: int
  max_len: int
  dim: int = 64
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.2
  inner: int = 0          # feed-forward width; 0 = dim
  act: str = "relu"       # relu | gelu

  def setup(self):
    self.item_emb = nn.Embed(self.num_items + 1, self.dim,
                             embedding_init=nn.initializers.normal(1.0 / math.sqrt(self.dim)))
    self.pos_emb = nn.Embed(sequential.window_len(self.max_len), self.dim)
    self.attn = [nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=self.dropout)
                 for _ in range(self.num_blocks)]
    self.ln_attn = [nn.LayerNorm() for _ in range(self.num_blocks)]
    self.ln_ff = [nn.LayerNorm() for _ in range(self.num_blocks)]
    self.ff_in = [nn.Dense(self.inner or self.dim) for _ in range(self.num_blocks)]
    self.ff_out = [nn.Dense(self.dim) for _ in range(self.num_blocks)]
    self.ln_out = nn.LayerNorm()
    self.drop = nn.Dropout(self.dropout)

  def __call__(self, seq: jax.Array, *, train: bool) -> jax.Array:
    """``seq [batch, len]`` (left-padded, 0 = pad) -> ``[batch, len, dim]``."""
    width = sequential.window_len(self.max_len)
    if seq.shape[1] > width:
      raise ValueError(f"SASRec: {seq.shape[1]} positions, more than 2 * max_len - 1 = {width}")
    valid = (seq > 0)[..., None]
    t = jnp.arange(seq.shape[1])
    x = self.item_emb(seq) * math.sqrt(self.dim) + self.pos_emb(t + (width - seq.shape[1]))
    x = self.drop(x, deterministic=not train) * valid
    band = (t[:, None] - t[None, :]) < self.max_len                      # [T, T]
    mask = nn.make_attention_mask(seq > 0, seq > 0) * nn.make_causal_mask(seq) * band
    act = {"relu": nn.relu, "gelu": nn.gelu}[self.act]
    for i in range(self.num_blocks):
      q = self.ln_attn[i](x)
      x = x + self.drop(self.attn[i](q, x, mask=mask, deterministic=not train),
                        deterministic=not train)
      h = self.ln_ff[i](x)
      h = self.ff_out[i](self.drop(act(self.ff_in[i](h)), deterministic=not train))
      x = (x + self.drop(h, deterministic=not train)) * valid
    return self.ln_out(x)

  def scores(self, hidden: jax.Array) -> jax.Array:
    """``[..., dim]`` -> ``[..., num_items]`` scores of items 0..N-1."""
    return hidden @ self.item_emb.embedding[1:].T


@dataclasses.dataclass
class SASRecConfig:
  """Defaults: RecBole 1.2.1's SASRec and training settings (BENCHMARKS compares them)."""
  max_len: int = 50
  dim: int = 64
  num_blocks: int = 2
  num_heads: int = 2
  dropout: float = 0.5
  inner: int = 256     # feed-forward width; 0 = dim
  act: str = "gelu"    # relu | gelu
  lr: float = 1e-3
  batch_size: int = 64  # training windows (each up to max_len targets) per step
  epochs: int = 300
  eval_every: int = 1
  patience: int = 10   # evaluations without improvement (either protocol) before stopping


def train_and_evaluate(dataset: Dataset, cfg: SASRecConfig, seed: int = 0) -> dict:
  """Train on the split's training sequences; valid/test HR/NDCG under both protocols.

  See :func:`lcrec_jax.baselines.sequential.train_and_evaluate` for the result layout.
  """
  model = SASRec(dataset.num_items, cfg.max_len, cfg.dim, cfg.num_blocks, cfg.num_heads,
                 cfg.dropout, cfg.inner, cfg.act)
  out = sequential.train_and_evaluate(model, cfg, dataset, name="sasrec", seed=seed)
  return {**out, "config": dataclasses.asdict(cfg)}


# The constructor fields a saved SASRec records (dropout too: it is inactive when scoring).
SAVED_FIELDS = ("num_items", "max_len", "dim", "num_blocks", "num_heads", "dropout", "inner",
                "act")


def save(path: str, model: SASRec, params: Any) -> None:
  """Writes a trained SASRec as one ``.npz``: ``config`` (its constructor fields, json) and
  one ``params/<module>/<leaf>`` array per parameter. Read back by :func:`load`."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  cfg = json.dumps({f: getattr(model, f) for f in SAVED_FIELDS})
  with open(path, "wb") as f:
    np.savez(f, config=np.asarray(cfg),
             **{f"params/{k}": np.asarray(v, np.float32) for k, v in flat.items()})


def load(path: str) -> tuple[SASRec, Any]:
  """``(model, params)`` of a :func:`save` file; ValueError if it is not one (a missing
  field or parameter, or a parameter of the wrong shape)."""
  with np.load(path, allow_pickle=False) as z:
    if "config" not in z.files:
      raise ValueError(f"{path}: no 'config' entry (not written by sasrec.save)")
    cfg = json.loads(str(z["config"]))
    flat = {k[len("params/"):]: np.asarray(z[k]) for k in z.files if k.startswith("params/")}
  if sorted(cfg) != sorted(SAVED_FIELDS):
    raise ValueError(f"{path}: config fields {sorted(cfg)}, expected {sorted(SAVED_FIELDS)}")
  model = SASRec(**cfg)
  want = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32),
                                           train=False))["params"]
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(want, sep="/").items()}
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if got != want:
    bad = sorted(set(got) ^ set(want)) or sorted(k for k in got if got[k] != want[k])
    raise ValueError(f"{path}: parameters do not match a SASRec of {cfg} (first: {bad[0]})")
  return model, traverse_util.unflatten_dict(flat, sep="/")
