"""Prefix trie over item codes, as arrays a jitted beam search can index.

Nodes are numbered per level: level 0 has the single root (node 0); a node at level
``l`` is a distinct code prefix of length ``l``. Following code ``c`` from node ``n`` at
level ``l`` leads to node ``child`` at level ``l + 1``; at the last level the child is
the item number. Two layouts hold the same trie:

* dense: ``table[l]`` is ``[num_nodes_l, K_l]`` with ``-1`` where no item continues.
  Memory is nodes x codes per level: fine for small catalogues.
* CSR: per level ``offsets [num_nodes_l + 1]``, ``codes [edges_l]``, ``children [edges_l]``
  sorted by (node, code). Memory grows with the number of edges, i.e. O(items * levels).

Levels are padded to a common width so that one ``lax.fori_loop`` body serves every
level: ``max_codes = max K_l`` and, for CSR, ``max_degree = max children of a node``.

Per-user bans (e.g. the items a user has already seen): ``item_nodes [L, N]`` holds the
node each item passes through after every level (at the last level, the item itself), so
:meth:`Trie.live_nodes` counts, per user, the items left under every node with one
scatter-add per level. A search that only follows live nodes never enters a subtree whose
items are all banned, and every beam it finishes is an unbanned item.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from lcrec_jax.index.item_index import ItemIndex

Layout = Literal["dense", "csr", "auto"]
DENSE_MAX_CELLS = 1 << 24  # auto picks dense while sum_l nodes_l * K_l stays below this


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trie:
  """Array form of the item-code trie (a pytree: arrays are leaves, sizes are static).

  Dense layout: ``table [L, max_nodes, max_codes]``.
  CSR layout: ``offsets [L, max_nodes + 1]``, ``edge_codes [L, max_edges]``,
  ``edge_children [L, max_edges]``.
  Unused layout arrays are ``None``. ``item_nodes [L, num_items]`` (both layouts): the
  node of each item's prefix after level ``l``; at the last level the item number.
  """

  table: jax.Array | None
  offsets: jax.Array | None
  edge_codes: jax.Array | None
  edge_children: jax.Array | None
  num_levels: int = dataclasses.field(metadata=dict(static=True))
  max_codes: int = dataclasses.field(metadata=dict(static=True))
  max_degree: int = dataclasses.field(metadata=dict(static=True))
  layout: str = dataclasses.field(metadata=dict(static=True))
  item_nodes: jax.Array | None = None

  @property
  def num_items(self) -> int:
    return int(self.item_nodes.shape[1])

  def live_nodes(self, banned: jax.Array) -> jax.Array:
    """Which children still lead to an item that is not banned, per user.

    Args:
      banned: ``[batch, num_items]`` bool, ``True`` = the item must not be returned.
    Returns:
      ``[batch, L, num_items]`` bool: ``out[b, l, c]`` is true when node ``c`` of level
      ``l + 1`` (an item at the last level) has at least one item below it that ``b`` may
      get. Node numbers of a level are below ``num_items``; columns beyond are false.
    """
    if self.item_nodes is None:
      raise ValueError("this trie has no item_nodes table: build it with build_trie")
    keep = (~banned).astype(jnp.int32)                                     # [B, N]
    rows = []
    for l in range(self.num_levels):
      counts = jnp.zeros_like(keep).at[:, self.item_nodes[l]].add(keep)    # [B, N]
      rows.append(counts > 0)
    return jnp.stack(rows, axis=1)

  def allowed(self, level: jax.Array, nodes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Valid continuations of trie nodes at ``level``.

    Args:
      level: scalar int32 (may be traced).
      nodes: ``[...]`` int32 node ids at ``level`` (``-1`` = dead beam).
    Returns:
      ``(mask [..., max_codes] bool, children [..., max_codes] int32)``: which codes
      continue each node, and the node (or, at the last level, item) they lead to;
      ``-1`` where not allowed.
    """
    safe = jnp.maximum(nodes, 0)
    if self.layout == "dense":
      children = self.table[level][safe]                                    # [..., K]
    else:
      offs = self.offsets[level]
      start, end = offs[safe], offs[safe + 1]                               # [...]
      pos = start[..., None] + jnp.arange(self.max_degree)                  # [..., D]
      valid = pos < end[..., None]
      pos = jnp.where(valid, pos, 0)
      codes = jnp.where(valid, self.edge_codes[level][pos], self.max_codes)  # [..., D]
      kids = jnp.where(valid, self.edge_children[level][pos], -1)
      flat_shape = (-1, self.max_degree)
      c2, k2 = codes.reshape(flat_shape), kids.reshape(flat_shape)
      rows = jnp.arange(c2.shape[0])[:, None]
      out = jnp.full((c2.shape[0], self.max_codes + 1), -1, jnp.int32)
      out = out.at[rows, c2].set(k2)[:, : self.max_codes]                    # drop the sink
      children = out.reshape(nodes.shape + (self.max_codes,))
    children = jnp.where((nodes >= 0)[..., None], children, -1)
    return children >= 0, children

  def nbytes(self) -> int:
    return int(sum(x.nbytes for x in (self.table, self.offsets, self.edge_codes,
                                      self.edge_children, self.item_nodes) if x is not None))


def _levels(codes: np.ndarray):
  """Per level: (parent node of each item, node of each item's prefix after the level)."""
  n, num_levels = codes.shape
  parent = np.zeros(n, np.int64)  # every item starts at the root
  out = []
  for l in range(num_levels):
    key = parent * (int(codes[:, l].max(initial=0)) + 1) + codes[:, l]
    if l == num_levels - 1:
      child = np.arange(n, dtype=np.int64)         # leaves are items
    else:
      _, child = np.unique(key, return_inverse=True)
      child = child.reshape(-1)
    out.append((parent, codes[:, l].astype(np.int64), child))
    parent = child
  return out


def build_trie(index: ItemIndex, layout: Layout = "auto") -> Trie:
  """Build the trie of a conflict-free :class:`ItemIndex` (numpy, once per index)."""
  if not index.is_conflict_free():
    raise ValueError(f"item index has {index.num_collisions()} items sharing a code; "
                     "the trie needs conflict-free codes (run the index stage's assignment)")
  codes = np.asarray(index.codes, np.int64)
  num_levels, max_codes = index.num_levels, max(index.level_sizes)
  levels = _levels(codes)
  item_nodes = jnp.asarray(np.stack([child for _, _, child in levels]).astype(np.int32))
  nodes_per_level = [1] + [int(c.max()) + 1 for _, _, c in levels[:-1]]
  max_nodes = max(nodes_per_level)
  if layout == "auto":
    layout = "dense" if max_nodes * max_codes * num_levels <= DENSE_MAX_CELLS else "csr"
  if layout == "dense":
    table = np.full((num_levels, max_nodes, max_codes), -1, np.int32)
    for l, (parent, code, child) in enumerate(levels):
      table[l, parent, code] = child
    return Trie(jnp.asarray(table), None, None, None, num_levels, max_codes, 1, "dense",
                item_nodes)
  if layout != "csr":
    raise ValueError(f"trie layout must be 'dense', 'csr' or 'auto', got {layout!r}")
  max_edges, max_degree, per_level = 1, 1, []
  for l, (parent, code, child) in enumerate(levels):
    edges = np.unique(np.stack([parent, code, child], 1), axis=0)  # sorted by (node, code)
    counts = np.bincount(edges[:, 0], minlength=nodes_per_level[l])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    per_level.append((offsets, edges[:, 1], edges[:, 2]))
    max_edges, max_degree = max(max_edges, len(edges)), max(max_degree, int(counts.max()))
  offsets = np.zeros((num_levels, max_nodes + 1), np.int32)
  edge_codes = np.zeros((num_levels, max_edges), np.int32)
  edge_children = np.full((num_levels, max_edges), -1, np.int32)
  for l, (o, c, ch) in enumerate(per_level):
    offsets[l, : len(o)] = o
    offsets[l, len(o):] = o[-1]
    edge_codes[l, : len(c)] = c
    edge_children[l, : len(ch)] = ch
  return Trie(None, jnp.asarray(offsets), jnp.asarray(edge_codes), jnp.asarray(edge_children),
              num_levels, max_codes, max_degree, "csr", item_nodes)


def position_mask(index: ItemIndex) -> np.ndarray:
  """LC-Rec's per-position constraint: ``[L, max_codes]`` bool, code seen at that level.

  Beams built under this mask alone may spell codes of no item.
  """
  mask = np.zeros((index.num_levels, max(index.level_sizes)), bool)
  for l in range(index.num_levels):
    mask[l, np.unique(index.codes[:, l])] = True
  return mask
