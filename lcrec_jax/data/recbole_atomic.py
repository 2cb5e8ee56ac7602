"""RecBole atomic files: any ``X.inter`` / ``X.item`` pair -> :class:`Dataset`.

Format (RecBole's): tab separated UTF-8 text, first line a header of ``name:type`` fields
with type one of ``token``, ``token_seq``, ``float``, ``float_seq``, e.g.
``user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float``. The item file's
columns vary (ml-100k: ``movie_title:token_seq release_year:token class:token_seq``).

Decisions, all documented here and reflected in ``Dataset.stats``:

- Catalogue and item order: every row of ``X.item`` in file order, including items no
  user interacted with (they are still recommendable; counted as
  ``items_without_interactions``). The item file is required: LC-Rec needs item text.
- Item text: the title column is ``title_field`` or else the first present of
  :data:`TITLE_FIELDS`; every other column except the item id becomes ``Item.fields``
  under its field name (type suffix removed), value as written (stripped).
- User order: numeric by external id when all ids are integers, else lexicographic.
- Time order: by ``timestamp`` then by line number in ``X.inter`` (stable, documented
  tie-break). Without a timestamp column, line order alone (logged; stat
  ``no_timestamp_column = 1``). Tie counts are reported as ``ties_broken`` (interactions
  minus distinct (user, timestamp) pairs: how many placements the tie-break decided) and
  ``interactions_in_tied_groups`` (interactions sharing their user's timestamp with
  another).
- Repeated user-item pairs are kept (counted as ``repeat_interactions``).

Bad input, case by case:

- missing file -> :class:`MissingFileError` naming the path;
- non-UTF-8 bytes -> :class:`DataError` with the line;
- bad header (no ``name:type``, unknown type, duplicate field, missing id column), or a
  row with the wrong column count, an empty user/item id, a non-numeric / non-finite
  timestamp, or a duplicate item id in ``X.item`` -> :class:`DataError` with file and line;
- empty lines: ignored (they hold no data);
- interaction with an item id absent from ``X.item`` -> skipped, counted
  ``interactions_unknown_item``;
- item with an empty title -> ``on_empty_title="error"`` (default) raises
  :class:`DataError` with the line; ``"skip"`` drops the item (``items_empty_title``) and
  its interactions (``interactions_of_skipped_items``);
- user with fewer than 3 interactions after the skips above -> dropped, counted
  ``users_too_short`` / ``interactions_of_short_users``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Callable, Mapping

from absl import logging
from lcrec_jax.data.assemble import SkipLog, assemble, user_order
from lcrec_jax.data.dataset import Dataset, Item, make_sequences
from lcrec_jax.data.errors import DataError
from lcrec_jax.data.source_io import read_text_lines
from lcrec_jax.errors import ConfigError

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
TITLE_FIELDS = ("title", "movie_title", "item_title", "name", "item_name", "book_title")
EMPTY_TITLE_POLICIES = ("error", "skip")

# (title, fields, counts) -> (title, fields): a dataset's own text normalisation; it may
# count what it changed in ``counts`` (reported in ``Dataset.stats``).
ItemTransform = Callable[[str, dict[str, str], collections.Counter],
                         tuple[str, dict[str, str]]]


@dataclasses.dataclass(frozen=True)
class AtomicFile:
  """A parsed atomic file.

  Attributes:
    path: source path.
    names: field names without type, e.g. ``("user_id", "item_id", ...)``.
    types: field types, ``types[k]`` belongs to ``names[k]``.
    rows: ``(line_number, values)`` per data row; ``line_number`` is 1-based in ``path``.
  """

  path: str
  names: tuple[str, ...]
  types: tuple[str, ...]
  rows: tuple[tuple[int, tuple[str, ...]], ...]

  def column(self, name: str) -> int:
    """Index of field ``name``; :class:`DataError` listing the fields if absent."""
    if name not in self.names:
      raise DataError(self.path, f"no field {name!r} in header (fields: {list(self.names)})",
                      line=1)
    return self.names.index(name)


def read_atomic(path: str, what: str = "atomic file") -> AtomicFile:
  """Read and validate one atomic file (header and column counts)."""
  lines = read_text_lines(path, what)
  if not lines or not lines[0].strip():
    raise DataError(path, "empty file: expected a header line of name:type fields", line=1)
  names, types = [], []
  for col in lines[0].split("\t"):
    name, sep, typ = col.strip().rpartition(":")
    if not sep or not name or typ not in FIELD_TYPES:
      raise DataError(path, f"header field {col!r} is not name:type with type in "
                      f"{FIELD_TYPES}", line=1)
    if name in names:
      raise DataError(path, f"header repeats field {name!r}", line=1)
    names.append(name)
    types.append(typ)
  rows = []
  for k, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    values = line.split("\t")
    if len(values) != len(names):
      raise DataError(path, f"{len(values)} tab-separated columns, header has {len(names)}",
                      line=k)
    rows.append((k, tuple(v.strip() for v in values)))
  return AtomicFile(path, tuple(names), tuple(types), tuple(rows))


def read_items(item_file: AtomicFile, *, item_field: str = "item_id",
               title_field: str | None = None, on_empty_title: str = "error",
               transform: ItemTransform | None = None,
               skips: SkipLog | None = None,
               counts: collections.Counter | None = None) -> tuple[list[Item], set[str]]:
  """Items of an ``X.item`` file in row order.

  ``counts`` receives what ``transform`` counted.

  Returns:
    ``(items, skipped_ids)``: the catalogue and the ids of items dropped for an empty
    title (only with ``on_empty_title="skip"``).
  """
  if on_empty_title not in EMPTY_TITLE_POLICIES:
    raise ConfigError(f"data.on_empty_title must be one of {EMPTY_TITLE_POLICIES}, "
                     f"got {on_empty_title!r}")
  skips = skips if skips is not None else SkipLog()
  counts = counts if counts is not None else collections.Counter()
  path = item_file.path
  id_col = item_file.column(item_field)
  if title_field is None:
    title_field = next((f for f in TITLE_FIELDS if f in item_file.names), None)
    if title_field is None:
      raise DataError(path, f"no title field: none of {TITLE_FIELDS} in header "
                      f"{list(item_file.names)}; name the title column with "
                      "--config.data.title_field=<column>", line=1)
  title_col = item_file.column(title_field)
  other = [k for k in range(len(item_file.names)) if k not in (id_col, title_col)]
  items, seen, skipped = [], {}, set()
  for line, values in item_file.rows:
    iid = values[id_col]
    if not iid:
      raise DataError(path, f"empty {item_field}", line=line)
    if iid in seen:
      raise DataError(path, f"item id {iid!r} repeats line {seen[iid]}", line=line)
    seen[iid] = line
    title = values[title_col]
    fields = {item_file.names[k]: values[k] for k in other}
    if transform is not None:
      title, fields = transform(title, fields, counts)
    if not title.strip():
      if on_empty_title == "error":
        raise DataError(path, f"item {iid!r} has an empty {title_field} "
                        "(pass on_empty_title='skip' to drop such items)", line=line)
      skips.skip("items_empty_title", f"{path}:{line}")
      skipped.add(iid)
      continue
    items.append(Item(iid, title.strip(), fields))
  return items, skipped


def read_interactions(inter_file: AtomicFile, item_number: Mapping[str, int], *,
                      skipped_items: frozenset[str] | set[str] = frozenset(),
                      user_field: str = "user_id", item_field: str = "item_id",
                      time_field: str = "timestamp", skips: SkipLog | None = None
                      ) -> tuple[dict[str, list[tuple[float, int, int]]], dict[str, int]]:
  """Per-user ``(timestamp, line, item_number)`` events of an ``X.inter`` file.

  Returns:
    ``(user_events, stats)``; ``user_events`` in first-appearance order, ``stats`` with
    ``interactions_read``, ``repeat_interactions``, ``ties_broken``,
    ``interactions_in_tied_groups`` (over the interactions kept) and
    ``no_timestamp_column``.
  """
  skips = skips if skips is not None else SkipLog()
  path = inter_file.path
  u_col = inter_file.column(user_field)
  i_col = inter_file.column(item_field)
  t_col = inter_file.names.index(time_field) if time_field in inter_file.names else None
  if t_col is None:
    logging.warning("%s: no %r field; interactions ordered by line number", path, time_field)
  events: dict[str, list[tuple[float, int, int]]] = collections.defaultdict(list)
  pairs, repeats = set(), 0
  for line, values in inter_file.rows:
    uid, iid = values[u_col], values[i_col]
    if not uid or not iid:
      raise DataError(path, f"empty {user_field if not uid else item_field}", line=line)
    if t_col is None:
      ts = 0.0
    else:
      try:
        ts = float(values[t_col])
      except ValueError:
        raise DataError(path, f"{time_field} {values[t_col]!r} is not a number",
                        line=line) from None
      if not math.isfinite(ts):
        raise DataError(path, f"{time_field} {values[t_col]!r} is not finite", line=line)
    if iid not in item_number:
      kind = ("interactions_of_skipped_items" if iid in skipped_items
              else "interactions_unknown_item")
      skips.skip(kind, f"{path}:{line} (item {iid!r})")
      continue
    if (uid, iid) in pairs:
      repeats += 1
    pairs.add((uid, iid))
    events[uid].append((ts, line, item_number[iid]))
  per_time = collections.Counter((u, e[0]) for u, evts in events.items() for e in evts)
  stats = {
      "interactions_read": len(inter_file.rows),
      "repeat_interactions": repeats,
      "ties_broken": sum(c - 1 for c in per_time.values()) if t_col is not None else 0,
      "interactions_in_tied_groups": (sum(c for c in per_time.values() if c > 1)
                                      if t_col is not None else 0),
      "no_timestamp_column": int(t_col is None),
  }
  return dict(events), stats


def atomic_paths(directory: str, name: str) -> tuple[str, str]:
  """``(<directory>/<name>.inter, <directory>/<name>.item)``."""
  return os.path.join(directory, f"{name}.inter"), os.path.join(directory, f"{name}.item")


def load_recbole_atomic(directory: str, name: str, *, title_field: str | None = None,
                        on_empty_title: str = "error", user_field: str = "user_id",
                        item_field: str = "item_id", time_field: str = "timestamp",
                        item_transform: ItemTransform | None = None,
                        dataset_name: str | None = None) -> Dataset:
  """Load ``<directory>/<name>.inter`` and ``<directory>/<name>.item``.

  Args:
    directory: folder holding the atomic files.
    name: file stem, e.g. ``"ml-100k"``.
    title_field: item title column (default: first of :data:`TITLE_FIELDS` present).
    on_empty_title: ``"error"`` or ``"skip"`` (see module docstring).
    user_field, item_field, time_field: column names (RecBole's defaults).
    item_transform: optional per-item text normalisation (e.g. MovieLens year/genres).
    dataset_name: ``Dataset.name`` (default ``name``).

  Returns:
    The dataset; skips and counts in ``Dataset.stats`` as the module docstring lists.
  """
  inter_path, item_path = atomic_paths(directory, name)
  skips, counts = SkipLog(), collections.Counter()
  item_file = read_atomic(item_path, "item file (.item)")
  items, skipped = read_items(item_file, item_field=item_field, title_field=title_field,
                              on_empty_title=on_empty_title, transform=item_transform,
                              skips=skips, counts=counts)
  inter_file = read_atomic(inter_path, "interaction file (.inter)")
  number = {it.item_id: i for i, it in enumerate(items)}
  events, stats = read_interactions(inter_file, number, skipped_items=skipped,
                                    user_field=user_field, item_field=item_field,
                                    time_field=time_field, skips=skips)
  order = user_order(list(events))
  ordered = {u: events[u] for u in order}
  sequences = dict(zip(order, make_sequences(ordered)))
  return assemble(dataset_name or name, items, sequences, skips, {**counts, **stats},
                  source=inter_path)

