"""ItemIndex: every item's code, one code id per level, and LC-Rec's json form.

A code is ``num_levels`` small integers, one per level; level ``l`` has ``level_sizes[l]``
possible values. As tokens, level ``l`` uses the prefix ``chr(ord('a') + l)``, so code
``[12, 3, 200, 7]`` is ``<a_12><b_3><c_200><d_7>`` (LC-Rec's format). A conflict-free
index gives every item a distinct code; levels beyond the RQ-VAE's (an extra level added
to separate items whose codes could not otherwise be made unique) are just more columns.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Mapping, Sequence

import numpy as np

from lcrec_jax import fs

_TOKEN_RE = re.compile(r"^<([a-z])_(\d+)>$")


def code_token(level: int, code: int) -> str:
  """``code_token(0, 12) == "<a_12>"``."""
  return f"<{chr(ord('a') + level)}_{int(code)}>"


def parse_code_token(token: str) -> tuple[int, int]:
  """Inverse of :func:`code_token`: ``"<c_200>" -> (2, 200)``."""
  m = _TOKEN_RE.match(token)
  if not m:
    raise ValueError(f"not an item code token: {token!r} (expected like '<a_12>')")
  return ord(m.group(1)) - ord("a"), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class ItemIndex:
  """Codes of all items.

  Attributes:
    item_ids: external item ids; row ``i`` of ``codes`` belongs to ``item_ids[i]``
      (the dataset's internal item ``i``).
    codes: ``[num_items, num_levels]`` int32 level-local code ids.
    level_sizes: number of possible codes per level (vocabulary needed per level).
  """

  item_ids: tuple[str, ...]
  codes: np.ndarray
  level_sizes: tuple[int, ...]

  def __post_init__(self):
    codes = np.asarray(self.codes)
    if codes.ndim != 2 or codes.shape[0] != len(self.item_ids):
      raise ValueError(f"codes must be [num_items={len(self.item_ids)}, levels], got {codes.shape}")
    if codes.shape[1] != len(self.level_sizes):
      raise ValueError(f"codes have {codes.shape[1]} levels but level_sizes has {len(self.level_sizes)}")
    if codes.size and (codes.min() < 0 or np.any(codes.max(0) >= np.asarray(self.level_sizes))):
      raise ValueError("a code id is outside its level's size")

  @property
  def num_items(self) -> int:
    return len(self.item_ids)

  @property
  def num_levels(self) -> int:
    return len(self.level_sizes)

  def item_tokens(self, i: int) -> list[str]:
    """Tokens of item ``i``: ``["<a_12>", "<b_3>", ...]``."""
    return [code_token(l, c) for l, c in enumerate(self.codes[i])]

  def item_code_str(self, i: int) -> str:
    return "".join(self.item_tokens(i))

  def all_tokens(self) -> list[str]:
    """Every code token the vocabulary needs, level by level: ``num_levels * level_size``."""
    return [code_token(l, c) for l, k in enumerate(self.level_sizes) for c in range(k)]

  def num_collisions(self) -> int:
    """Items whose code is shared with another item (all members of shared groups)."""
    _, inverse, counts = np.unique(self.codes, axis=0, return_inverse=True, return_counts=True)
    return int(np.sum(counts[inverse.reshape(-1)] > 1))

  def is_conflict_free(self) -> bool:
    return self.num_collisions() == 0

  def lookup(self) -> dict[tuple[int, ...], int]:
    """Map code tuple -> item number (requires a conflict-free index)."""
    if not self.is_conflict_free():
      raise ValueError(f"index has {self.num_collisions()} colliding items; no unique lookup")
    return {tuple(int(c) for c in row): i for i, row in enumerate(self.codes)}

  # -- LC-Rec json -------------------------------------------------------------------

  def to_json_dict(self) -> dict[str, list[str]]:
    return {iid: self.item_tokens(i) for i, iid in enumerate(self.item_ids)}

  def save(self, path: str) -> None:
    """Write LC-Rec's ``index.json`` atomically (temp file + rename; local or ``gs://``).

    Only process 0 writes (see :mod:`lcrec_jax.fs`).
    """
    fs.write_json(path, self.to_json_dict(), indent=None)

  @classmethod
  def from_json_dict(cls, data: Mapping[str, Sequence[str]], item_ids: Sequence[str] | None = None,
                     level_sizes: Sequence[int] | None = None, source: str = "<index>") -> "ItemIndex":
    """Build from LC-Rec's ``{"<item id>": ["<a_12>", ...]}``.

    ``item_ids`` fixes the row order (default: the json's key order); every id in it must
    have a code. ``level_sizes`` defaults to ``max code + 1`` per level.
    """
    ids = list(data.keys()) if item_ids is None else [str(i) for i in item_ids]
    rows = []
    for iid in ids:
      if iid not in data:
        raise ValueError(f"{source}: item {iid!r} has no code")
      toks = data[iid]
      row = []
      for l, t in enumerate(toks):
        try:
          lvl, code = parse_code_token(t)
        except ValueError as e:
          raise ValueError(f"{source}: item {iid!r}: {e}") from None
        if lvl != l:
          raise ValueError(f"{source}: item {iid!r}: token {t!r} at position {l}")
        row.append(code)
      rows.append(row)
    widths = {len(r) for r in rows}
    if len(widths) > 1:
      raise ValueError(f"{source}: items have codes of different lengths {sorted(widths)}")
    codes = np.asarray(rows, np.int32).reshape(len(ids), -1)
    if level_sizes is None:
      level_sizes = tuple(int(m) + 1 for m in codes.max(0)) if len(ids) else ()
    return cls(tuple(ids), codes, tuple(int(k) for k in level_sizes))

  @classmethod
  def load(cls, path: str, item_ids: Sequence[str] | None = None,
           level_sizes: Sequence[int] | None = None) -> "ItemIndex":
    try:
      data = fs.read_json(path)
    except FileNotFoundError:
      raise FileNotFoundError(f"index file not found: {path}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid json: {e}") from None
    return cls.from_json_dict(data, item_ids, level_sizes, source=path)
