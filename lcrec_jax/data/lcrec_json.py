"""LC-Rec's json dataset format -> :class:`Dataset` (its ``X.index.json`` is read by
:func:`lcrec_jax.index.provided.load_lcrec_index`).

Files (LC-Rec's ``data_process/amazon18_data_process.py`` writes them), for stem ``X`` in
``<path>/`` or, as LC-Rec lays them out, ``<path>/X/``:

- ``X.inter.json``: ``{"<user>": [<item>, ...]}``, each list already chronological
  (items are json ints or strings; ids are compared as strings).
- ``X.item.json``: ``{"<item>": {"title": ..., "description": ..., "brand": ...,
  "categories": ...}}``.
- ``X.index.json`` (optional): ``{"<item>": ["<a_12>", "<b_3>", ...]}``; read with
  :func:`lcrec_jax.index.provided.load_lcrec_index`.
- ``X.user.json`` (optional): LC-Rec's LLM-written user text,
  ``{"user_explicit_preference": {"<user>": [...]}, "user_vague_intention": {"train":
  {"<user>": {"item": .., "inters": [..], "querys": [..]}}, "test": {...}}}``.

Decisions:

- Item order = key order of ``X.item.json`` (LC-Rec writes ids 0..N-1 in order); every
  item is kept, interacted with or not (``items_without_interactions``).
- User order = key order of ``X.inter.json``; sequences are used as given.
- ``Item.title`` is the ``title`` value stripped; every other key of the item becomes a
  field in the json's order: strings stripped, lists joined with ", ", ``null`` -> "",
  numbers and booleans via ``str``, objects via compact json.
- ``Dataset.user_text`` is ``X.user.json`` turned user-first, keeping every value as
  found: ``user_text["0"] == {"user_explicit_preference": [...],
  "user_vague_intention": {"train": {...}, "test": {...}}}``. A file already keyed by
  user (``{"<user>": {...}}``) is taken as is. Entries for users not in the dataset are
  counted (``user_text_unknown_users``); top-level keys that fit neither shape are
  counted (``user_text_keys_ignored``) and logged.

Bad input, case by case (json has no rows, so errors name the file and the line of the
offending key, found by searching the text for ``"<key>":``):

- missing ``X.inter.json`` / ``X.item.json`` -> :class:`MissingFileError`; a missing
  optional file is simply absent;
- non-UTF-8 bytes or invalid json -> :class:`DataError` with the line;
- wrong shape (top level not an object, a user's value not a list, an item id that is
  not an int or string, an item's value not an object, no ``title`` key) ->
  :class:`DataError` naming file, line and key;
- an item id in ``X.inter.json`` absent from ``X.item.json`` -> skipped, counted
  ``interactions_unknown_item``;
- empty title -> ``on_empty_title="error"`` (default) raises; ``"skip"`` drops the item
  (``items_empty_title``) and its interactions (``interactions_of_skipped_items``);
- user with fewer than 3 interactions -> dropped, counted ``users_too_short``.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Mapping, Sequence

import numpy as np

from lcrec_jax.data.assemble import SkipLog, assemble
from lcrec_jax.data.dataset import Dataset, Item
from lcrec_jax.data.errors import DataError
from lcrec_jax.data.recbole_atomic import EMPTY_TITLE_POLICIES
from lcrec_jax.data.source_io import read_json_and_text
from lcrec_jax.errors import ConfigError

SUFFIXES = {"inter": ".inter.json", "item": ".item.json", "index": ".index.json",
            "user": ".user.json"}


def lcrec_paths(path: str, name: str) -> dict[str, str]:
  """Paths of ``name``'s files: in ``path/`` if its ``.inter.json`` is there, else in
  ``path/name/`` (LC-Rec's ``--data_path``/``--dataset`` layout)."""
  base = path
  if not os.path.isfile(os.path.join(path, name + SUFFIXES["inter"])) and os.path.isfile(
      os.path.join(path, name, name + SUFFIXES["inter"])):
    base = os.path.join(path, name)
  return {k: os.path.join(base, name + s) for k, s in SUFFIXES.items()}


class _JsonSource:
  """A parsed json file plus its text, to name the line of a key in errors."""

  def __init__(self, path: str, what: str):
    self.path = path
    self.data, self._text = read_json_and_text(path, what)

  def line_of(self, key: str) -> int | None:
    m = re.search(re.escape(json.dumps(str(key))) + r"\s*:", self._text)
    return self._text.count("\n", 0, m.start()) + 1 if m else None

  def error(self, key: str, message: str) -> DataError:
    return DataError(self.path, f"key {key!r}: {message}", line=self.line_of(key))

  def top_object(self) -> dict:
    if not isinstance(self.data, dict):
      raise DataError(self.path, f"top level must be a json object, got "
                      f"{type(self.data).__name__}", line=1)
    return self.data


def _field_text(value: object) -> str:
  """One item field as text (see module docstring)."""
  if value is None:
    return ""
  if isinstance(value, str):
    return value.strip()
  if isinstance(value, (list, tuple)):
    return ", ".join(s for s in (_field_text(v) for v in value) if s)
  if isinstance(value, (dict,)):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
  return str(value)


def _read_items(src: _JsonSource, on_empty_title: str,
                skips: SkipLog) -> tuple[list[Item], set[str]]:
  items, skipped = [], set()
  for iid, feat in src.top_object().items():
    if not isinstance(feat, dict):
      raise src.error(iid, f"item value must be an object, got {type(feat).__name__}")
    if "title" not in feat:
      raise src.error(iid, f"item has no 'title' (keys: {list(feat)})")
    title = _field_text(feat["title"])
    if not title:
      if on_empty_title == "error":
        raise src.error(iid, "empty title (pass on_empty_title='skip' to drop such items)")
      skips.skip("items_empty_title", f"{src.path}:{src.line_of(iid)} (item {iid!r})")
      skipped.add(iid)
      continue
    fields = {k: _field_text(v) for k, v in feat.items() if k != "title"}
    items.append(Item(str(iid), title, fields))
  return items, skipped


def _read_sequences(src: _JsonSource, number: Mapping[str, int], skipped: set[str],
                    skips: SkipLog) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  sequences, repeats, read = {}, 0, 0
  for uid, seq in src.top_object().items():
    if not isinstance(seq, list):
      raise src.error(uid, f"user value must be a list of item ids, got {type(seq).__name__}")
    kept = []
    for pos, iid in enumerate(seq):
      if isinstance(iid, bool) or not isinstance(iid, (int, str)):
        raise src.error(uid, f"position {pos}: item id {iid!r} is not an int or string")
      read += 1
      iid = str(iid)
      if iid not in number:
        kind = "interactions_of_skipped_items" if iid in skipped else "interactions_unknown_item"
        skips.skip(kind, f"{src.path}:{src.line_of(uid)} (user {uid!r}, item {iid!r})")
        continue
      kept.append(number[iid])
    repeats += len(kept) - len(set(kept))
    sequences[str(uid)] = np.asarray(kept, np.int32)
  return sequences, {"interactions_read": read, "repeat_interactions": repeats}


def _read_user_text(src: _JsonSource, user_ids: Sequence[str],
                    skips: SkipLog) -> dict[str, dict[str, object]]:
  """Transpose ``X.user.json`` to user-first (see module docstring)."""
  known = set(user_ids)
  out: dict[str, dict[str, object]] = collections.defaultdict(dict)
  unknown: set[str] = set()

  def put(uid: str, path: tuple[str, ...], value: object) -> None:
    if uid not in known:
      unknown.add(uid)
      return
    node = out[uid]
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value

  for key, value in src.top_object().items():
    if key in known:
      if isinstance(value, dict):
        for k, v in value.items():
          put(key, (k,), v)
      else:
        put(key, ("text",), value)
    elif isinstance(value, dict) and any(k in known for k in value):
      for uid, v in value.items():
        put(uid, (key,), v)
    elif (isinstance(value, dict) and value
          and all(isinstance(v, dict) for v in value.values())
          and any(u in known for v in value.values() for u in v)):
      for sub, per_user in value.items():
        for uid, v in per_user.items():
          put(uid, (key, sub), v)
    else:
      skips.skip("user_text_keys_ignored", f"{src.path}:{src.line_of(key)} (key {key!r})")
  if unknown:
    skips.skip("user_text_unknown_users", f"{src.path} (e.g. user {sorted(unknown)[0]!r})",
               n=len(unknown))
  return dict(out)


def load_lcrec_json(path: str, name: str, *, on_empty_title: str = "error",
                    dataset_name: str | None = None) -> Dataset:
  """Load LC-Rec's ``name.inter.json``, ``name.item.json`` and optional ``name.user.json``.

  Args:
    path: directory holding the files (or holding ``name/`` with them, LC-Rec's layout).
    name: file stem, e.g. ``"Instruments"``.
    on_empty_title: ``"error"`` or ``"skip"``.
    dataset_name: ``Dataset.name`` (default ``name``).
  """
  if on_empty_title not in EMPTY_TITLE_POLICIES:
    raise ConfigError(f"data.on_empty_title must be one of {EMPTY_TITLE_POLICIES}, "
                     f"got {on_empty_title!r}")
  paths = lcrec_paths(path, name)
  skips = SkipLog()
  items, skipped = _read_items(_JsonSource(paths["item"], "LC-Rec item file (.item.json)"),
                               on_empty_title, skips)
  number = {it.item_id: i for i, it in enumerate(items)}
  inter_src = _JsonSource(paths["inter"], "LC-Rec interaction file (.inter.json)")
  sequences, stats = _read_sequences(inter_src, number, skipped, skips)
  user_text = {}
  if os.path.isfile(paths["user"]):
    user_text = _read_user_text(_JsonSource(paths["user"], "LC-Rec user file (.user.json)"),
                                list(sequences), skips)
  stats["user_text_users"] = len(user_text)
  return assemble(dataset_name or name, items, sequences, skips, stats, user_text=user_text,
                  source=paths["inter"])
