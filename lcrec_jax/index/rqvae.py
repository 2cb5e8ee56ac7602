"""RQ-VAE (residual-quantised autoencoder) in Flax Linen, as LC-Rec uses it for item codes.

An MLP encoder maps an item embedding ``x [B, in_dim]`` to ``z [B, e_dim]``; ``L`` levels of
``K`` codes each quantise it residually (level 0 quantises ``z``, level ``l`` quantises what
the levels before left over); an MLP decoder reconstructs ``x`` from the sum of the chosen
codes. The codes ``[B, L]`` are the item's index.

Parameter layout (``variables["params"]``)::

  encoder/dense_{i}/{kernel,bias}      in_dim -> encoder_layers... -> e_dim
  encoder/bn_{i}/{scale,bias}          only when batch_norm (running stats in "batch_stats")
  decoder/dense_{i}/...                e_dim -> reversed(encoder_layers)... -> in_dim
  quantizer/level_{l}/codebook         [codebook_size, e_dim]

Losses, as in LC-Rec (``index/models/vq.py``, ``rq.py``, ``rqvae.py``):

* per level ``l`` with residual ``r_l`` and chosen code vectors ``e_l``:
  ``mse(e_l, sg(r_l)) + beta * mse(sg(e_l), r_l)`` (codebook + commitment; ``mse`` is the
  mean over batch and dimensions);
* ``quant_loss`` = the **mean** over levels of those (LC-Rec stacks the per-level losses and
  takes ``.mean()``); ``quant_loss_reduction="sum"`` sums them instead;
* total = ``mse(recon, x) + quant_loss`` (:func:`loss_fn`).

LETTER terms (Wang et al., CIKM 2024, github.com/HonghuiBao2000/LETTER ``RQ-VAE/models``;
optional, weight 0 = off, added by the trainer):

* collaborative: :func:`cf_infonce`, an in-batch InfoNCE whose logits are the dot products
  of the quantised items ``z_q`` with collaborative-filtering item embeddings of the same
  items (e.g. SASRec's); LETTER's script weighs it 0.01;
* diversity: :func:`diversity_loss` per level: the codes of a level are clustered
  (:func:`cluster_codes`, once per epoch); each item's chosen code vector is pulled
  towards another code of its cluster (a sampled positive, :func:`sample_cluster_positives`)
  against all other codes of the level (its own code excluded), by cross-entropy over the
  dot products; mean over levels; LETTER's script weighs it 1e-4.

Straight-through: each level outputs ``r_l + sg(e_l - r_l)`` and the next residual is
``r_l`` minus that output, as in LC-Rec, so ``z_q_st = sum_l`` of the level outputs equals
``sum_l e_l`` in value and ``d z_q_st / d z`` is the identity.

Sinkhorn (LC-Rec): on levels whose epsilon is ``> 0`` and when ``use_sinkhorn`` is on, the
codes are ``argmax`` of the balanced transport plan of the batch (:mod:`sinkhorn`) rather
than the nearest code. Batch norm and dropout follow LC-Rec's MLP: ``[dropout] dense
[batch norm] relu`` per hidden layer, nothing after the last dense.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lcrec_jax.index import kmeans as kmeans_lib
from lcrec_jax.index import sinkhorn as sinkhorn_lib


@flax.struct.dataclass
class RQVAEOutput:
  """What :meth:`RQVAE.__call__` returns.

  Attributes:
    recon: ``[B, in_dim]`` reconstruction of ``x``.
    quant_loss: ``[]`` codebook + beta * commitment, reduced over levels (see module doc).
    codes: ``[B, L]`` int32 chosen code per level.
    z: ``[B, e_dim]`` encoder output.
    z_q: ``[B, e_dim]`` quantised ``z`` (straight-through: gradients pass to ``z``).
    distances: ``[B, L, K]`` squared distances of each level's residual to its codebook
      (no gradient).
  """

  recon: jax.Array
  quant_loss: jax.Array
  codes: jax.Array
  z: jax.Array
  z_q: jax.Array
  distances: jax.Array


class MLP(nn.Module):
  """``features[0] -> ... -> features[-1]`` dense stack; dense layers ``dense_{i}``.

  Each layer: dropout (rate ``dropout``), dense, then (except after the last) optional
  batch norm ``bn_{i}`` and ReLU. Input ``[B, features[0]]`` -> ``[B, features[-1]]``.
  """

  features: Sequence[int]
  dropout: float = 0.0
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if x.shape[-1] != self.features[0]:
      raise ValueError(f"MLP: input has {x.shape[-1]} features, expected {self.features[0]}")
    num = len(self.features) - 1
    for i, width in enumerate(self.features[1:]):
      if self.dropout > 0:
        x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
      x = nn.Dense(width, kernel_init=nn.initializers.xavier_normal(),
                   bias_init=nn.initializers.zeros, name=f"dense_{i}")(x)
      if i < num - 1:
        if self.batch_norm:
          x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           name=f"bn_{i}")(x)
        x = nn.relu(x)
    return x


class Codebook(nn.Module):
  """One level's codebook: parameter ``codebook`` ``[codebook_size, e_dim]``.

  Initialised ``N(0, 1)`` like a torch ``nn.Embedding``; normally overwritten by
  :func:`init_codebooks_kmeans` before training.
  """

  codebook_size: int
  e_dim: int

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("codebook", nn.initializers.normal(stddev=1.0),
                      (self.codebook_size, self.e_dim), jnp.float32)


class ResidualQuantizer(nn.Module):
  """``num_levels`` codebooks ``level_{l}``; see :meth:`RQVAE.quantize`."""

  num_levels: int
  codebook_size: int
  e_dim: int

  def setup(self):
    self.levels = [Codebook(self.codebook_size, self.e_dim, name=f"level_{l}")
                   for l in range(self.num_levels)]

  def codebooks(self) -> list[jax.Array]:
    """The ``num_levels`` codebooks, each ``[codebook_size, e_dim]``."""
    return [level() for level in self.levels]


def level_distances(r: jax.Array, codebook: jax.Array) -> jax.Array:
  """``[B, K]`` squared distances ``|r|^2 + |e|^2 - 2 r.e`` (LC-Rec's formula, unclipped)."""
  return (jnp.sum(r * r, axis=1, keepdims=True) + jnp.sum(codebook * codebook, axis=1)[None]
          - 2.0 * r @ codebook.T)


def residual_quantize(
    z: jax.Array,
    codebooks: Sequence[jax.Array],
    *,
    beta: float,
    sk_epsilons: Sequence[float],
    sk_iters: int,
    use_sinkhorn: bool,
    reduction: str = "mean",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Pure residual quantisation of ``z [B, e]`` with ``L`` codebooks ``[K, e]``.

  Returns:
    ``(z_q_st [B, e], quant_loss [], codes [B, L] int32, distances [B, L, K])``; see
    the module docstring for the loss and the straight-through estimator.
  """
  if len(sk_epsilons) != len(codebooks):
    raise ValueError(f"sk_epsilons has {len(sk_epsilons)} entries for {len(codebooks)} levels")
  if reduction not in ("mean", "sum"):
    raise ValueError(f"quant_loss_reduction must be 'mean' or 'sum', got {reduction!r}")
  sg = jax.lax.stop_gradient
  residual = z
  z_q = jnp.zeros_like(z)
  losses, codes, dists = [], [], []
  for codebook, eps in zip(codebooks, sk_epsilons):
    d = sg(level_distances(residual, codebook))
    if use_sinkhorn and float(eps) > 0:
      plan_log = sinkhorn_lib.log_sinkhorn(d, float(eps), sk_iters)
      idx = jnp.argmax(plan_log, axis=1)
    else:
      idx = jnp.argmin(d, axis=1)
    e = codebook[idx]
    codebook_loss = jnp.mean((e - sg(residual)) ** 2)
    commitment = jnp.mean((sg(e) - residual) ** 2)
    losses.append(codebook_loss + beta * commitment)
    out = residual + sg(e - residual)
    residual = residual - out
    z_q = z_q + out
    codes.append(idx.astype(jnp.int32))
    dists.append(d)
  loss = jnp.stack(losses)
  loss = jnp.mean(loss) if reduction == "mean" else jnp.sum(loss)
  return z_q, loss, jnp.stack(codes, axis=1), jnp.stack(dists, axis=1)


class RQVAE(nn.Module):
  """LC-Rec's RQ-VAE. See the module docstring for layout, losses and estimator.

  Attributes:
    in_dim: item embedding size.
    encoder_layers: hidden widths of the encoder (decoder mirrors them).
    e_dim: code (latent) dimension.
    num_levels: ``L``, levels of residual quantisation.
    codebook_size: ``K``, codes per level.
    dropout: dropout rate before every dense layer (needs a "dropout" rng in training).
    batch_norm: batch norm after every hidden dense layer (mutable "batch_stats" in
      training).
    beta: commitment weight.
    sk_epsilons: Sinkhorn epsilon per level (``<= 0``: nearest code).
    sk_iters: Sinkhorn rounds.
    quant_loss_reduction: "mean" (LC-Rec) or "sum" over levels.
  """

  in_dim: int
  encoder_layers: Sequence[int]
  e_dim: int
  num_levels: int
  codebook_size: int
  dropout: float = 0.0
  batch_norm: bool = False
  beta: float = 0.25
  sk_epsilons: Sequence[float] = ()
  sk_iters: int = 50
  quant_loss_reduction: str = "mean"

  def setup(self):
    if self.sk_epsilons and len(self.sk_epsilons) != self.num_levels:
      raise ValueError(f"rqvae.sk_epsilons has {len(self.sk_epsilons)} entries, "
                       f"num_levels is {self.num_levels}")
    widths = (self.in_dim, *self.encoder_layers, self.e_dim)
    self.encoder = MLP(widths, self.dropout, self.batch_norm)
    self.decoder = MLP(tuple(reversed(widths)), self.dropout, self.batch_norm)
    self.quantizer = ResidualQuantizer(self.num_levels, self.codebook_size, self.e_dim)

  def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``x [B, in_dim] -> z [B, e_dim]``."""
    return self.encoder(x, train)

  def decode(self, z_q: jax.Array, train: bool = False) -> jax.Array:
    """``z_q [B, e_dim] -> recon [B, in_dim]``."""
    return self.decoder(z_q, train)

  def quantize(
      self,
      z: jax.Array,
      use_sinkhorn: bool = True,
      sk_epsilons: Sequence[float] | None = None,
  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Residual quantisation of ``z [B, e_dim]``.

    Args:
      z: ``[B, e_dim]`` latents.
      use_sinkhorn: pick codes by Sinkhorn on levels with epsilon ``> 0``; otherwise the
        nearest code on every level.
      sk_epsilons: per-level epsilons overriding the module's (conflict repair); Python
        floats (they select code paths at trace time).

    Returns:
      ``(z_q_st [B, e_dim], quant_loss [], codes [B, L] int32, distances [B, L, K])``.
    """
    eps = tuple(sk_epsilons) if sk_epsilons is not None else (
        tuple(self.sk_epsilons) or (0.0,) * self.num_levels)
    if len(eps) != self.num_levels:
      raise ValueError(f"sk_epsilons has {len(eps)} entries, num_levels is {self.num_levels}")
    return residual_quantize(
        z, self.quantizer.codebooks(), beta=self.beta, sk_epsilons=eps,
        sk_iters=self.sk_iters, use_sinkhorn=use_sinkhorn,
        reduction=self.quant_loss_reduction)

  def __call__(self, x: jax.Array, *, train: bool, use_sinkhorn: bool = True) -> RQVAEOutput:
    """Encode, quantise, decode ``x [B, in_dim]``; see :class:`RQVAEOutput`."""
    z = self.encode(x, train)
    z_q, quant_loss, codes, distances = self.quantize(z, use_sinkhorn)
    recon = self.decode(z_q, train)
    return RQVAEOutput(recon=recon, quant_loss=quant_loss, codes=codes, z=z, z_q=z_q,
                       distances=distances)


def loss_fn(output: RQVAEOutput, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LC-Rec's RQ-VAE objective: ``mse(recon, x) + quant_loss``.

  Args:
    output: the model's output for ``x``.
    x: ``[B, in_dim]`` inputs.

  Returns:
    ``(total [], {"recon_mse": [], "quant_loss": []})``.
  """
  recon_mse = jnp.mean((output.recon.astype(jnp.float32) - x.astype(jnp.float32)) ** 2)
  total = recon_mse + output.quant_loss
  return total, {"recon_mse": recon_mse, "quant_loss": output.quant_loss}


def cf_infonce(z_q: jax.Array, cf: jax.Array) -> jax.Array:
  """LETTER's collaborative term: in-batch InfoNCE of quantised items vs CF embeddings.

  Args:
    z_q: ``[B, e]`` quantised item representations (straight-through).
    cf: ``[B, e]`` collaborative embeddings of the same items (row i = item of row i).

  Returns:
    ``[]`` mean over the batch of ``logsumexp_j(z_q[i] . cf[j]) - z_q[i] . cf[i]`` (float32;
    no temperature or normalisation, as LETTER).
  """
  logits = z_q.astype(jnp.float32) @ cf.astype(jnp.float32).T
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))


@functools.partial(jax.jit, static_argnums=(2, 3))
def cluster_codes(key: jax.Array, codebook: jax.Array, n_clusters: int,
                  iters: int = 20) -> jax.Array:
  """``[K]`` int32 cluster of every code of one level (k-means of the code vectors).

  LETTER clusters with size-constrained k-means (``k_means_constrained``); plain k-means
  here, so a cluster may hold one code, whose items then get no diversity term.
  """
  centers = kmeans_lib.kmeans(key, codebook, int(n_clusters), int(iters))
  return kmeans_lib.assign_nearest(codebook, centers).astype(jnp.int32)


def sample_cluster_positives(key: jax.Array, codes: jax.Array, labels: jax.Array
                             ) -> tuple[jax.Array, jax.Array]:
  """For each item a random other code of its code's cluster.

  Args:
    key: PRNG key.
    codes: ``[B]`` chosen codes of one level.
    labels: ``[K]`` cluster of each code (:func:`cluster_codes`).

  Returns:
    ``(positives [B] int32, valid [B] bool)``: uniform over the codes ``j != codes[i]``
    with ``labels[j] == labels[codes[i]]``; ``valid`` is False where there is none.
  """
  k = labels.shape[0]
  same = (labels[None, :] == labels[codes][:, None]) & (jnp.arange(k)[None] != codes[:, None])
  valid = jnp.any(same, axis=1)
  logits = jnp.where(same | ~valid[:, None], 0.0, -jnp.inf)
  return jax.random.categorical(key, logits, axis=1).astype(jnp.int32), valid


def diversity_loss(codebook: jax.Array, codes: jax.Array, positives: jax.Array,
                   valid: jax.Array) -> jax.Array:
  """LETTER's diversity term of one level.

  Args:
    codebook: ``[K, e]`` the level's codes (gradients flow into it).
    codes: ``[B]`` chosen codes; positives: ``[B]`` targets; valid: ``[B]`` bool.

  Returns:
    ``[]`` mean over valid items of the cross-entropy of ``positives`` under the logits
    ``codebook[codes] . codebook^T``, the item's own code excluded.
  """
  e = codebook[codes].astype(jnp.float32)
  logits = e @ codebook.astype(jnp.float32).T                          # [B, K]
  own = jax.nn.one_hot(codes, codebook.shape[0], dtype=jnp.bool_)
  logits = jnp.where(own, -1e12, logits)
  ce = jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(
      logits, positives[:, None], axis=1)[:, 0]
  w = valid.astype(jnp.float32)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def codebook_path(level: int) -> tuple[str, str, str]:
  """Keys of level ``level``'s codebook under ``variables["params"]``."""
  return ("quantizer", f"level_{level}", "codebook")


def get_codebooks(variables: Mapping[str, Any], num_levels: int) -> list[jax.Array]:
  """The ``num_levels`` codebooks ``[K, e_dim]`` from ``variables``."""
  out = []
  for l in range(num_levels):
    node = variables["params"]
    for k in codebook_path(l):
      node = node[k]
    out.append(node)
  return out


def _replace_codebooks(variables: Mapping[str, Any], codebooks: Sequence[jax.Array]) -> Any:
  """Copy of ``variables`` with level codebooks replaced (FrozenDict in -> FrozenDict out)."""
  frozen = isinstance(variables, flax.core.FrozenDict)
  new = flax.core.unfreeze(variables) if frozen else dict(variables)
  params = dict(new["params"])
  quant = dict(params["quantizer"])
  for l, cb in enumerate(codebooks):
    level = dict(quant[f"level_{l}"])
    old = level["codebook"]
    if tuple(old.shape) != tuple(cb.shape):
      raise ValueError(f"codebook level_{l}: shape {cb.shape} != {old.shape}")
    level["codebook"] = jnp.asarray(cb, old.dtype)
    quant[f"level_{l}"] = level
  params["quantizer"] = quant
  new["params"] = params
  return flax.core.freeze(new) if frozen else new


def init_codebooks_kmeans(
    variables: Mapping[str, Any],
    model: RQVAE,
    x: jax.Array,
    key: jax.Array,
    iters: int,
) -> Any:
  """Sets every level's codebook to k-means centroids of that level's residuals.

  ``z = encode(x)`` (eval mode); level 0's codebook is k-means of ``z``; each point then
  subtracts its nearest level-0 centroid and level 1 is k-means of those residuals, and so
  on. (LC-Rec runs k-means on the first training batch of each level instead.)

  Args:
    variables: the model's variables (``{"params": ..., ["batch_stats": ...]}``).
    model: the :class:`RQVAE` they belong to.
    x: ``[N, in_dim]`` inputs (e.g. all item embeddings).
    key: PRNG key; level ``l`` uses ``fold_in(key, l)``.
    iters: Lloyd iterations per level.

  Returns:
    ``variables`` with the codebooks replaced; other leaves are the same arrays.
  """
  z = jax.jit(lambda v, x: model.apply(v, x, False, method=RQVAE.encode))(variables, x)
  residual = z
  codebooks = []
  for l in range(model.num_levels):
    centers = kmeans_lib.kmeans(jax.random.fold_in(key, l), residual, model.codebook_size, iters)
    idx = kmeans_lib.assign_nearest(residual, centers)
    residual = residual - centers[idx]
    codebooks.append(centers)
  return _replace_codebooks(variables, codebooks)
