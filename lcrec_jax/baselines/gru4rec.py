"""GRU4Rec (Hidasi et al., ICLR 2016) in Flax, as sequential toolkits run it today.

Item embedding (dropout) -> ``num_layers`` GRUs over the user's last ``max_len`` items ->
a dense layer back to the embedding width -> scores = state · item embeddings (shared
input/output table), trained with cross-entropy over the whole catalogue at every position
(RecBole's GRU4Rec with its ``CE`` loss, its default).
Training on length buckets, ranking on the device and model selection per protocol:
:mod:`lcrec_jax.baselines.sequential`.

Sequences are LEFT-padded; the recurrent state stays at zero through the padding (a padded
step keeps the previous state), so the states at real positions do not depend on the
padded length and length buckets give the same outputs as padding to ``max_len``.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcrec_jax.baselines import sequential
from lcrec_jax.data.dataset import Dataset


class _MaskedGRUStep(nn.Module):
  """One time step: ``carry [batch, hidden]``, ``(x [batch, in], valid [batch, 1])``."""

  hidden: int

  @nn.compact
  def __call__(self, carry: jax.Array, inputs: tuple[jax.Array, jax.Array]):
    x, valid = inputs
    new, _ = nn.GRUCell(self.hidden, name="cell")(carry, x)
    carry = jnp.where(valid, new, carry)  # padding: keep the previous (zero) state
    return carry, carry


_MaskedGRU = nn.scan(_MaskedGRUStep, variable_broadcast="params", split_rngs={"params": False},
                     in_axes=1, out_axes=1)


class GRU4Rec(nn.Module):
  """Item ids are shifted by one; 0 is padding. Returns ``[batch, len, dim]`` states."""

  num_items: int
  max_len: int
  dim: int = 64
  hidden: int = 128
  num_layers: int = 1
  dropout: float = 0.3

  def setup(self):
    self.item_emb = nn.Embed(self.num_items + 1, self.dim,
                             embedding_init=nn.initializers.normal(1.0 / math.sqrt(self.dim)))
    self.grus = [_MaskedGRU(self.hidden, name=f"gru_{i}") for i in range(self.num_layers)]
    self.out = nn.Dense(self.dim)
    self.drop = nn.Dropout(self.dropout)

  def __call__(self, seq: jax.Array, *, train: bool) -> jax.Array:
    """``seq [batch, len]`` (left-padded, 0 = pad) -> ``[batch, len, dim]``."""
    valid = (seq > 0)[..., None]
    x = self.drop(self.item_emb(seq), deterministic=not train)             # [B, T, dim]
    for gru in self.grus:
      carry = jnp.zeros((seq.shape[0], self.hidden), x.dtype)
      _, x = gru(carry, (x, valid))                                         # [B, T, hidden]
    return self.out(x) * valid

  def scores(self, hidden: jax.Array) -> jax.Array:
    """``[..., dim]`` -> ``[..., num_items]`` scores of items 0..N-1."""
    return hidden @ self.item_emb.embedding[1:].T


@dataclasses.dataclass
class GRU4RecConfig:
  """Defaults: RecBole 1.2.1's GRU4Rec and training settings (BENCHMARKS compares them)."""
  max_len: int = 50
  dim: int = 64
  hidden: int = 128
  num_layers: int = 1
  dropout: float = 0.3
  lr: float = 1e-3
  batch_size: int = 64  # training windows (each up to max_len targets) per step
  epochs: int = 300
  eval_every: int = 1
  patience: int = 10   # evaluations without improvement (either protocol) before stopping


def train_and_evaluate(dataset: Dataset, cfg: GRU4RecConfig, seed: int = 0) -> dict:
  """Train on the split's training sequences; valid/test HR/NDCG under both protocols.

  See :func:`lcrec_jax.baselines.sequential.train_and_evaluate` for the result layout.
  """
  model = GRU4Rec(dataset.num_items, cfg.max_len, cfg.dim, cfg.hidden, cfg.num_layers,
                  cfg.dropout)
  out = sequential.train_and_evaluate(model, cfg, dataset, name="gru4rec", seed=seed)
  return {**out, "config": dataclasses.asdict(cfg)}
