"""Conflict-free item codes from a trained RQ-VAE.

Three steps turn item embeddings into an :class:`ItemIndex` where every item has its own
code:

1. **Argmax codes.** Every item is encoded (eval mode) and quantized with the nearest code
   at every level (no Sinkhorn), in fixed-size batches.
2. **LC-Rec's repair.** Mirrors ``index/generate_indices.py`` of RUCAIBox/LC-Rec: up to
   ``rounds`` rounds; each round finds the groups of items that share a full code and
   quantizes each group again, as one batch, with Sinkhorn-Knopp on the last level only
   (all other levels' epsilon set to 0, i.e. nearest code), replacing the group's codes.
   Nearest-code levels reproduce the argmax prefix, so only the last level changes; it is
   re-picked from the argmax pass's last-level distances in float64, as LC-Rec computes
   it. LC-Rec keeps the last level's training epsilon, or 0.003 when it was 0 (0.005 is
   its commented-out alternative); here the epsilon is a parameter
   (``c.index.repair_sk_epsilon``) and the rounds use the model's ``sk_iters``. LC-Rec
   stops after 20 rounds and keeps whatever duplicates remain; identical embeddings can
   never be separated this way (identical rows give identical plan rows).
3. **Uniqueness guarantee** (not in LC-Rec): within each prefix (the first ``L - 1``
   codes, never changed), the members of a shared code closest to it keep it and the
   others move to free last-level codes, greedily by last-level distance (ties: item
   number, then code number). A prefix with more items than last-level codes (``n > K``)
   holds ``ceil(n / K)`` items per code; an extra level then numbers the members of each
   shared code ``0, 1, ...`` by distance (every other item gets 0).

Collision rate follows LC-Rec: ``(num_items - number of distinct codes) / num_items``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcrec_jax.index import sinkhorn
from lcrec_jax.index.item_index import ItemIndex


# -- code statistics ----------------------------------------------------------------------


def collision_rate(codes: np.ndarray) -> float:
  """LC-Rec's collision rate of ``codes [N, L]``: ``(N - distinct codes) / N``."""
  codes = np.asarray(codes)
  n = codes.shape[0]
  if n == 0:
    return 0.0
  return float(n - np.unique(codes, axis=0).shape[0]) / n


def collision_groups(codes: np.ndarray) -> list[np.ndarray]:
  """Groups of items sharing a full code, ``codes [N, L]``.

  Returns:
    One ascending int array of item numbers per shared code (size > 1), ordered by their
    smallest member.
  """
  codes = np.asarray(codes)
  if codes.shape[0] == 0:
    return []
  _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
  inverse = inverse.reshape(-1)
  shared = np.nonzero(counts[inverse] > 1)[0]
  if shared.size == 0:
    return []
  order = np.lexsort((shared, inverse[shared]))
  items = shared[order]
  keys = inverse[items]
  splits = np.nonzero(np.diff(keys))[0] + 1
  groups = np.split(items, splits)
  groups.sort(key=lambda g: int(g[0]))
  return groups


def max_items_per_code(codes: np.ndarray) -> int:
  """Largest number of items sharing one full code in ``codes [N, L]`` (0 if empty)."""
  codes = np.asarray(codes)
  if codes.shape[0] == 0:
    return 0
  _, counts = np.unique(codes, axis=0, return_counts=True)
  return int(counts.max())


# -- step 1: argmax codes -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodedItems:
  """All items through the RQ-VAE in eval mode with nearest-code quantization.

  Attributes:
    codes: ``[N, L]`` int32 argmax codes.
    z: ``[N, e_dim]`` float32 encoder outputs (latents before quantization).
    last_distances: ``[N, K]`` float32 squared distances from each item's last-level
      residual (under its own prefix) to every last-level code.
    recon_sq_err: ``[N]`` float32 mean squared reconstruction error per item.
  """

  codes: np.ndarray
  z: np.ndarray
  last_distances: np.ndarray
  recon_sq_err: np.ndarray


@functools.partial(jax.jit, static_argnums=0)
def _encode_batch(model: Any, variables: Any, x: jax.Array):
  """``x [B, D] -> (codes [B, L], z [B, e], last_distances [B, K], recon_sq_err [B])``."""
  z = model.apply(variables, x, False, method="encode")
  z_q, _, codes, distances = model.apply(variables, z, False, method="quantize")
  recon = model.apply(variables, z_q, False, method="decode")
  err = jnp.mean(jnp.square(recon.astype(jnp.float32) - x), axis=-1)
  return codes.astype(jnp.int32), z, distances[:, -1, :], err


def encode_items(model: Any, variables: Any, embeddings: np.ndarray,
                 batch_size: int = 1024) -> EncodedItems:
  """Argmax codes, latents, last-level distances and reconstruction error of all items.

  Args:
    model: an ``RQVAE`` module.
    variables: its variables (``params`` and, with batch norm, ``batch_stats``).
    embeddings: ``[N, D]`` item embeddings.
    batch_size: items per jitted call; the last batch is zero-padded so that a single
      shape is compiled (rows are independent in eval mode).

  Returns:
    :class:`EncodedItems`.
  """
  x = np.asarray(embeddings, np.float32)
  if x.ndim != 2:
    raise ValueError(f"embeddings must be [num_items, dim], got shape {x.shape}")
  n = x.shape[0]
  bs = max(1, min(int(batch_size), n))
  outs = []
  for start in range(0, n, bs):
    chunk = x[start:start + bs]
    m = chunk.shape[0]
    if m < bs:
      chunk = np.concatenate([chunk, np.zeros((bs - m, x.shape[1]), np.float32)])
    res = _encode_batch(model, variables, jnp.asarray(chunk))
    outs.append([np.asarray(r)[:m] for r in res])
  codes, z, dist, err = (np.concatenate(parts) for parts in zip(*outs))
  return EncodedItems(codes.astype(np.int32), z.astype(np.float32),
                      dist.astype(np.float32), err.astype(np.float32))


def argmax_codes(model: Any, variables: Any, embeddings: np.ndarray,
                 batch_size: int = 1024) -> np.ndarray:
  """``[N, L]`` nearest-code (no Sinkhorn) codes of all items, in batches."""
  return encode_items(model, variables, embeddings, batch_size).codes


# -- step 2: LC-Rec's Sinkhorn repair -----------------------------------------------------


def sinkhorn_log_plan(distances: np.ndarray, epsilon: float, iters: int) -> np.ndarray:
  """``[g, K]`` float64 log of LC-Rec's Sinkhorn plan for ``distances [g, K]``.

  LC-Rec's iteration (``index/models/layers.py``) in the log domain, in float64
  (:func:`lcrec_jax.index.sinkhorn.log_sinkhorn_float64`, the twin of the float32 JAX
  Sinkhorn used in training), so nothing overflows or underflows at any epsilon.
  """
  return sinkhorn.log_sinkhorn_float64(distances, epsilon, iters)


def sinkhorn_codes(distances: np.ndarray, epsilon: float, iters: int,
                   tie_tol: float = 1e-9) -> np.ndarray:
  """Codes ``[g]``: each row's argmax of LC-Rec's Sinkhorn plan (:func:`sinkhorn_log_plan`).

  When a group is smaller than the codebook, a row usually "owns" several columns
  outright (plan value ``g / K`` in each, up to rounding); LC-Rec's argmax then takes
  whichever rounding favours. Here columns within ``tie_tol`` (log domain) of the row's
  maximum tie, and the tie goes to the nearest code (then the lowest code number).
  """
  d = np.asarray(distances, np.float64)
  log_q = sinkhorn_log_plan(d, epsilon, iters)
  best = log_q.max(axis=1, keepdims=True)
  masked = np.where(log_q >= best - tie_tol, d, np.inf)
  return np.argmin(masked, axis=1).astype(np.int32)


def repair_codes(codes: np.ndarray, last_distances: np.ndarray, *, rounds: int,
                 sk_epsilon: float, sk_iters: int) -> tuple[np.ndarray, int, int]:
  """LC-Rec's repair rounds (``index/generate_indices.py``).

  Each round takes every group of items sharing a full code and re-picks the group's
  last-level codes by Sinkhorn over the group (one Sinkhorn batch per group). LC-Rec
  re-runs the model on the group with epsilon 0 on all levels but the last; the encoder
  is deterministic in eval mode and nearest-code levels give the argmax pass's prefix
  again, so the only change is the last level, chosen from the same last-level
  distances that the argmax pass computed. That is what this does, in float64 as LC-Rec.

  Args:
    codes: ``[N, L]`` argmax codes (not modified).
    last_distances: ``[N, K]`` each item's last-level distances under its prefix.
    rounds: maximum number of rounds (LC-Rec: 20); stops early once collision-free.
    sk_epsilon: Sinkhorn epsilon of the last level.
    sk_iters: Sinkhorn rounds.

  Returns:
    ``(codes [N, L], rounds_used, items_changed)``; ``items_changed`` counts items whose
    final code differs from the input code.
  """
  out = np.array(codes, np.int32, copy=True)
  dist = np.asarray(last_distances)
  used = 0
  for _ in range(int(rounds)):
    groups = collision_groups(out)
    if not groups:
      break
    for g in groups:
      out[g, -1] = sinkhorn_codes(dist[g], sk_epsilon, sk_iters)
    used += 1
  changed = int(np.sum(np.any(out != np.asarray(codes), axis=1)))
  return out, used, changed


# -- step 3: the uniqueness guarantee ----------------------------------------------------


def make_unique(codes: np.ndarray, last_distances: np.ndarray | None = None,
                codebook_size: int | None = None) -> tuple[np.ndarray, int, int]:
  """Make every row of ``codes`` distinct, keeping every item's prefix.

  Within each prefix (``codes[:, :-1]``) with ``n`` items and ``K`` last-level codes,
  each last-level code may hold ``cap = ceil(n / K)`` items (1 whenever the prefix has
  room). For a code over ``cap`` the ``cap`` members nearest to it stay (ties: lower item
  number) and the rest move: all (mover, code with room) pairs are visited in order of
  (distance, item, code) and a pair is taken when the mover is still unplaced and the
  code has room. If some prefix needed ``cap > 1``, one extra level is appended: members
  of a still-shared code get ``0, 1, ...`` in order of (distance, item); all others 0.

  Args:
    codes: ``[N, L]`` non-negative codes.
    last_distances: ``[N, K]`` distance of each item's last-level residual to each
      last-level code; ``None`` = all equal (item and code numbers decide).
    codebook_size: ``K``, required when ``last_distances`` is ``None``.

  Returns:
    ``(codes [N, L] or [N, L + 1], items_moved, extra_level_size)`` with
    ``extra_level_size == 0`` when no level was added.
  """
  codes = np.array(codes, np.int64, copy=True)
  if codes.ndim != 2 or codes.shape[1] < 1:
    raise ValueError(f"codes must be [num_items, levels >= 1], got shape {codes.shape}")
  n_items = codes.shape[0]
  if last_distances is None:
    if codebook_size is None:
      raise ValueError("make_unique needs last_distances or codebook_size")
    k = int(codebook_size)
    dist = np.zeros((n_items, k), np.float64)
  else:
    dist = np.asarray(last_distances, np.float64)
    k = dist.shape[1]
    if dist.shape[0] != n_items:
      raise ValueError(f"last_distances has {dist.shape[0]} rows, codes {n_items}")
  if n_items and codes[:, -1].max() >= k:
    raise ValueError(f"a last-level code is >= codebook size {k}")
  if n_items == 0 or not collision_groups(codes):
    return codes.astype(np.int32), 0, 0

  moved = 0
  prefix = codes[:, :-1]
  if prefix.shape[1]:
    _, pinv = np.unique(prefix, axis=0, return_inverse=True)
    pinv = pinv.reshape(-1)
  else:
    pinv = np.zeros(n_items, np.int64)
  order = np.argsort(pinv, kind="stable")
  bounds = np.nonzero(np.diff(pinv[order]))[0] + 1
  for members in np.split(order, bounds):
    members = np.sort(members)
    last = codes[members, -1]
    counts = np.bincount(last, minlength=k)
    cap = max(1, math.ceil(len(members) / k))
    if counts.max() <= cap:
      continue
    movers = []
    for code in np.nonzero(counts > cap)[0]:
      grp = members[last == code]
      keep_order = np.lexsort((grp, dist[grp, code]))
      movers.extend(grp[keep_order[cap:]].tolist())
      counts[code] = cap
    movers = np.asarray(sorted(movers), np.int64)
    room = cap - counts
    free = np.nonzero(room > 0)[0]
    d = dist[np.ix_(movers, free)]
    mi, fi = np.meshgrid(np.arange(len(movers)), np.arange(len(free)), indexing="ij")
    mi, fi, d = mi.ravel(), fi.ravel(), d.ravel()
    pair_order = np.lexsort((free[fi], movers[mi], d))
    placed = np.zeros(len(movers), bool)
    left = len(movers)
    for p in pair_order:
      a, c = mi[p], free[fi[p]]
      if placed[a] or room[c] == 0:
        continue
      codes[movers[a], -1] = c
      room[c] -= 1
      placed[a] = True
      left -= 1
      if left == 0:
        break
    moved += len(movers)

  extra = 0
  groups = collision_groups(codes)
  if groups:
    extra = max(len(g) for g in groups)
    col = np.zeros((n_items, 1), np.int64)
    for g in groups:
      rank = np.lexsort((g, dist[g, codes[g, -1]]))
      col[g[rank], 0] = np.arange(len(g))
    codes = np.concatenate([codes, col], axis=1)
  return codes.astype(np.int32), moved, extra


# -- all together -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AssignStats:
  """What the assignment did; collision rates are LC-Rec's ``(N - distinct) / N``."""

  num_items: int
  collision_rate_before: float        # argmax codes
  collision_rate_after_repair: float  # after LC-Rec's Sinkhorn rounds
  collision_rate_after: float         # final, always 0
  colliding_items_before: int         # items sharing their argmax code with another
  max_items_per_code_before: int      # largest group sharing an argmax code
  max_items_per_code_after_repair: int
  repair_rounds: int                  # rounds allowed
  repair_rounds_used: int
  repair_items_changed: int           # items whose code the repair changed
  items_moved: int                    # items the uniqueness step moved
  extra_level_added: bool
  extra_level_size: int               # 0 if no level was added
  repair_sk_epsilon: float

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def assign_codes(codes: np.ndarray, last_distances: np.ndarray, *, rounds: int,
                 sk_epsilon: float, sk_iters: int
                 ) -> tuple[np.ndarray, np.ndarray, AssignStats]:
  """Steps 2 and 3 on arrays.

  Args:
    codes: ``[N, L]`` argmax codes.
    last_distances: ``[N, K]`` last-level distances under each item's prefix.
    rounds: LC-Rec repair rounds.
    sk_epsilon: last-level Sinkhorn epsilon of the repair.
    sk_iters: Sinkhorn rounds.

  Returns:
    ``(final codes [N, L'], codes after repair [N, L], stats)``.
  """
  codes = np.asarray(codes, np.int32)
  n = codes.shape[0]
  repaired, used, changed = repair_codes(codes, last_distances, rounds=rounds,
                                         sk_epsilon=sk_epsilon, sk_iters=sk_iters)
  final, moved, extra = make_unique(repaired, last_distances)
  stats = AssignStats(
      num_items=n,
      collision_rate_before=collision_rate(codes),
      collision_rate_after_repair=collision_rate(repaired),
      collision_rate_after=collision_rate(final),
      colliding_items_before=int(sum(len(g) for g in collision_groups(codes))),
      max_items_per_code_before=max_items_per_code(codes),
      max_items_per_code_after_repair=max_items_per_code(repaired),
      repair_rounds=int(rounds),
      repair_rounds_used=used,
      repair_items_changed=changed,
      items_moved=moved,
      extra_level_added=extra > 0,
      extra_level_size=extra,
      repair_sk_epsilon=float(sk_epsilon),
  )
  return final, repaired, stats


def build_item_index(model: Any, variables: Any, embeddings: np.ndarray,
                     item_ids: Sequence[str], *, repair_rounds: int = 20,
                     repair_sk_epsilon: float = 0.005, batch_size: int = 1024
                     ) -> tuple[ItemIndex, AssignStats, EncodedItems]:
  """Conflict-free :class:`ItemIndex` of all items from a trained RQ-VAE.

  Args:
    model: ``RQVAE`` module.
    variables: its trained variables.
    embeddings: ``[N, D]`` item embeddings, row ``i`` = ``item_ids[i]``.
    item_ids: external item ids.
    repair_rounds: LC-Rec repair rounds (``c.index.repair_rounds``).
    repair_sk_epsilon: last-level Sinkhorn epsilon in the repair
      (``c.index.repair_sk_epsilon``).
    batch_size: items per jitted encoding call.

  Returns:
    ``(index, stats, encoded)``; ``encoded`` holds the argmax pass (codes before repair,
    per-item reconstruction error) for reporting.
  """
  if len(item_ids) != np.asarray(embeddings).shape[0]:
    raise ValueError(f"{len(item_ids)} item ids but embeddings have "
                     f"{np.asarray(embeddings).shape[0]} rows")
  enc = encode_items(model, variables, embeddings, batch_size)
  final, _, stats = assign_codes(enc.codes, enc.last_distances, rounds=repair_rounds,
                                 sk_epsilon=repair_sk_epsilon, sk_iters=int(model.sk_iters))
  k = int(model.codebook_size)
  level_sizes = [k] * int(model.num_levels)
  if stats.extra_level_added:
    level_sizes.append(stats.extra_level_size)
  index = ItemIndex(tuple(str(i) for i in item_ids), final, tuple(level_sizes))
  if not index.is_conflict_free():  # make_unique guarantees this; never ship otherwise
    raise AssertionError(f"assignment left {index.num_collisions()} colliding items")
  return index, stats, enc
