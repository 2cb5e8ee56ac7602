"""A provided item index: LC-Rec's ``X.index.json`` instead of a trained RQ-VAE.

``c.index.source = "file"`` and ``c.index.path = ".../Instruments.index.json"`` make the
index stage read the codes instead of learning them. The file is LC-Rec's format,
``{"<item id>": ["<a_12>", "<b_3>", ...], ...}``, and is checked against the dataset:

* every dataset item has a code and every key is a dataset item (missing / extra items),
* every code is a list of tokens ``<a_N>``, ``<b_N>``, ... in level order, all of the
  same length (ragged codes), with ``N`` below ``c.index.level_size`` when that is set
  (out of range; ``0`` = max code + 1 per level).

Each problem is a :class:`lcrec_jax.data.errors.DataError` naming the file and the item.
Items that share a code (LC-Rec's released indices have some) are made unique by the
project's uniqueness step (:func:`lcrec_jax.index.assign.make_unique`, no distances: item
order decides who moves), and the number of moved items is reported and logged. The
stage then writes the same ``index.json``, ``report.json`` and ``codes.png`` as for a
trained index (no RQ-VAE fields: ``reconstruction_mse`` is None, the plot has no curve).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from lcrec_jax import fs
from lcrec_jax.data.dataset import Dataset
from lcrec_jax.data.errors import DataError, MissingFileError
from lcrec_jax.index import assign
from lcrec_jax.index import report as report_lib
from lcrec_jax.index.item_index import ItemIndex, parse_code_token


def read_codes(path: str, dataset: Dataset, level_size: int = 0) -> np.ndarray:
  """``[num_items, levels]`` int codes of ``path`` in ``dataset``'s item order, checked.

  Args:
    path: LC-Rec ``X.index.json``.
    dataset: the dataset whose items the codes are for.
    level_size: codes per level (``> 0``: a larger code is an error; 0 = no bound).

  Raises:
    DataError: unreadable file, missing / extra items, malformed, ragged or out-of-range
      codes; the message names the file and the first offending item.
  """
  if not fs.exists(path):
    raise MissingFileError(path, "index file (config index.path)")
  try:
    data = json.loads(fs.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(path, f"not valid json: {e}") from None
  if not isinstance(data, dict):
    raise DataError(path, f"top level must be a json object of item id -> code tokens, got "
                    f"{type(data).__name__}")
  ids = [it.item_id for it in dataset.items]
  missing = [i for i in ids if i not in data]
  if missing:
    raise DataError(path, f"{len(missing)} of the {len(ids)} items of dataset "
                    f"{dataset.name!r} have no code, e.g. item {missing[0]!r}")
  known = set(ids)
  extra = [k for k in data if k not in known]
  if extra:
    raise DataError(path, f"{len(extra)} item ids are not in dataset {dataset.name!r}, "
                    f"e.g. item {extra[0]!r} (an index for another dataset or filter?)")
  rows = []
  for iid in ids:
    toks = data[iid]
    if not isinstance(toks, list) or not toks or not all(isinstance(t, str) for t in toks):
      raise DataError(path, f"item {iid!r}: the code must be a non-empty list of tokens "
                      f"like ['<a_12>', '<b_3>'], got {toks!r}")
    row = []
    for pos, tok in enumerate(toks):
      try:
        lvl, code = parse_code_token(tok)
      except ValueError as e:
        raise DataError(path, f"item {iid!r}: {e}") from None
      if lvl != pos:
        raise DataError(path, f"item {iid!r}: token {tok!r} at position {pos}, expected level "
                        f"{chr(ord('a') + pos)!r}")
      if level_size > 0 and code >= level_size:
        raise DataError(path, f"item {iid!r}: code {tok!r} is out of range: config "
                        f"index.level_size={level_size} allows 0..{level_size - 1}")
      row.append(code)
    if rows and len(row) != len(rows[0]):
      raise DataError(path, f"item {iid!r} has a {len(row)}-token code, item {ids[0]!r} a "
                      f"{len(rows[0])}-token one: all codes need the same length")
    rows.append(row)
  return np.asarray(rows, np.int64).reshape(len(ids), -1)


def provided_index(path: str, dataset: Dataset, level_size: int = 0
                   ) -> tuple[ItemIndex, dict[str, Any]]:
  """The conflict-free :class:`ItemIndex` of ``path`` and its ``report.json`` fields.

  Returns:
    ``(index, report)``; ``report["repair"]["items_moved"]`` counts the items the
    uniqueness step gave another code, ``extra_level_size`` > 0 when it had to add a level.
  """
  codes = read_codes(path, dataset, level_size)
  levels = codes.shape[1]
  sizes = ([int(level_size)] * levels if level_size > 0
           else [int(m) + 1 for m in codes.max(0)])
  final, moved, extra = assign.make_unique(codes, None, codebook_size=sizes[-1])
  if extra:
    sizes.append(int(extra))
  index = ItemIndex(tuple(it.item_id for it in dataset.items), final, tuple(sizes))
  if not index.is_conflict_free():  # make_unique guarantees this; never ship otherwise
    raise AssertionError(f"uniqueness left {index.num_collisions()} colliding items")
  rate_before = assign.collision_rate(codes)
  report = report_lib.report_json(
      index, codes_before=codes, sizes_before=sizes[:levels],
      collision_rate_before=rate_before,
      collision_rate_after_repair=rate_before,  # no repair: there is no RQ-VAE
      collision_rate_after=assign.collision_rate(index.codes),
      colliding_items_before=int(sum(len(g) for g in assign.collision_groups(codes))),
      max_items_per_code=assign.max_items_per_code(codes),
      max_items_per_code_argmax=assign.max_items_per_code(codes), reconstruction_mse=None,
      repair={"repair_rounds": 0, "repair_rounds_used": 0, "items_moved": int(moved),
              "extra_level_added": bool(extra), "extra_level_size": int(extra),
              "collision_rate_after": assign.collision_rate(index.codes)},
      extra={"source": "file", "path": str(path), "dataset": dataset.name})
  return index, report


def load_lcrec_index(path: str, dataset: Dataset,
                     level_sizes: Sequence[int] | None = None) -> ItemIndex:
  """An LC-Rec ``X.index.json`` as an :class:`ItemIndex` in ``dataset``'s item order, as
  it is (no uniqueness step): the one reader, :func:`read_codes`, and its one policy
  (missing or extra items, malformed or ragged codes are a :class:`DataError`).
  ``level_sizes`` defaults to max code + 1 per level."""
  codes = read_codes(path, dataset).astype(np.int32)
  if level_sizes is None:
    level_sizes = tuple(int(m) + 1 for m in codes.max(0)) if len(codes) else ()
  return ItemIndex(tuple(it.item_id for it in dataset.items), codes,
                   tuple(int(k) for k in level_sizes))
