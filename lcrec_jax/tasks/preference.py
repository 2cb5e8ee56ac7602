"""User preference and search-query text for the itemsearch / preferenceobtain tasks.

LC-Rec asked an external LLM for each user's preferences and for search queries
(``X.user.json``). Two sources are supported here, recorded per example in
``meta["source"]``:

* ``"user_json"``: the dataset carries that text (``Dataset.user_text``, from LC-Rec's
  ``X.user.json``). Preferences are read from ``user_explicit_preference`` (or
  ``explicit_preference`` / ``preference`` / ``preferences``). A json query is only used
  when it names the item it was written for and that item lies in the user's training
  part (LC-Rec's ``user_vague_intention["train"][user] = {"item", "inters", "querys"}``);
  otherwise the query is derived, so a query about a valid/test item can never leak
  into training text.
* ``"derived"``: deterministic text computed from item metadata, counted over the items
  the caller passes (the builders pass only the user's training part). For MovieLens:
  the genres and decades the history favours and a few representative titles, e.g.
  ``Prefers Drama and Thriller films, mostly from the 1990s, such as "Fargo", "Heat"
  and "Seven (Se7en)".``; a query names a target's genres and decade, e.g.
  ``a Comedy and Romance film from the 1990s``. Datasets without genre or year
  fields fall back to categories / brand / titles.

:func:`preference_source` says which source a dataset uses (the README states it per
run).
"""

from __future__ import annotations

import collections
import re
from typing import Mapping, Sequence

import numpy as np

from lcrec_jax.data.dataset import Dataset, Item

GENRE_FIELDS = ("genres", "genre", "class", "categories", "category")
YEAR_FIELDS = ("year", "release_year")
_PREF_KEYS = ("user_explicit_preference", "explicit_preference", "preference", "preferences",
              "text")
_YEAR_RE = re.compile(r"(1[89]\d\d|20\d\d)")
_UNKNOWN = {"", "unknown", "none", "n/a"}
_TITLE_STRIP = ".!?,;:` \t\n"

SOURCE_DERIVED = "derived"
SOURCE_USER_JSON = "user_json"


def clean_title(title: str) -> str:
  """Title with surrounding whitespace and trailing punctuation removed (as LC-Rec does)."""
  return title.strip().strip(_TITLE_STRIP)


def item_genres(item: Item) -> list[str]:
  """Genres/categories of ``item``, in the file's order, without "unknown".

  Comma-separated values are split on commas, others on whitespace (RecBole's
  ``token_seq`` form, e.g. ``"Animation Children's Comedy"``).
  """
  for key in GENRE_FIELDS:
    value = item.fields.get(key)
    if value:
      parts = value.split(",") if "," in value else value.split()
      out = []
      for p in parts:
        p = p.strip()
        if p.lower() not in _UNKNOWN and p not in out:
          out.append(p)
      return out
  return []


def item_year(item: Item) -> int | None:
  """Release year from a year field, or None when absent or unparsable."""
  for key in YEAR_FIELDS:
    value = item.fields.get(key)
    if value:
      m = _YEAR_RE.search(str(value))
      if m:
        return int(m.group(1))
  return None


def _decade(year: int) -> str:
  return f"{year // 10 * 10}s"


def _noun(dataset: Dataset) -> str:
  name = dataset.name.lower()
  return "films" if ("ml-" in name or "movie" in name) else "items"


def _join(words: Sequence[str]) -> str:
  """``["a"] -> "a"``, ``["a", "b"] -> "a and b"``, ``["a", "b", "c"] -> "a, b and c"``."""
  words = list(words)
  if len(words) <= 1:
    return "".join(words)
  return ", ".join(words[:-1]) + " and " + words[-1]


def derive_preference(dataset: Dataset, items: Sequence[int], max_genres: int = 3,
                      max_titles: int = 3) -> str:
  """Deterministic preference sentence from the metadata of ``items``.

  Args:
    dataset: the dataset whose ``items`` hold the metadata.
    items: ``[n]`` item numbers (a user's training items, in time order); only these are
      mentioned.
    max_genres: most genres named; a genre is named when it covers at least 20% of the
      items (the top genre always is).
    max_titles: most representative titles named: the items sharing the most of the named
      genres, most recent first.

  Returns:
    A sentence such as ``Prefers Drama and Thriller films, mostly from the 1990s, such as
    "Fargo" and "Heat".``
  """
  items = [int(i) for i in items]
  if not items:
    return "No preference is known yet."
  noun = _noun(dataset)
  counts = collections.Counter(g for i in items for g in item_genres(dataset.items[i]))
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  top = [g for k, (g, c) in enumerate(ranked[:max_genres]) if k == 0 or c >= 0.2 * len(items)]

  years = [y for y in (item_year(dataset.items[i]) for i in items) if y is not None]
  decade_text = ""
  if years:
    dec = collections.Counter(y // 10 * 10 for y in years)
    ranked_dec = sorted(dec.items(), key=lambda kv: (-kv[1], -kv[0]))
    first, n_first = ranked_dec[0]
    if n_first * 2 > len(years) or len(ranked_dec) == 1:
      decade_text = f"mostly from the {_decade(first)}"
    else:
      decade_text = f"mostly from the {_decade(first)} and {_decade(ranked_dec[1][0])}"

  top_set = set(top)
  order = sorted(range(len(items)),
                 key=lambda k: (-len(top_set & set(item_genres(dataset.items[items[k]]))), -k))
  titles: list[str] = []
  for k in order:
    t = clean_title(dataset.items[items[k]].title)
    if t and t not in titles:
      titles.append(t)
    if len(titles) == max_titles:
      break
  quoted = _join([f'"{t}"' for t in titles])

  if top:
    text = f"Prefers {_join(top)} {noun}"
  else:
    text = f"Is interested in {noun}"
  if decade_text:
    text += f", {decade_text}"
  if quoted:
    text += f", such as {quoted}"
  return text + "."


_QUERY_FORMS = (
    "a {genres} {noun1} from the {decade}",
    "looking for a {genres} {noun1} released in the {decade}",
    "something {genres} from the {decade}",
)
_QUERY_FORMS_NO_YEAR = (
    "a {genres} {noun1}",
    "looking for a {genres} {noun1}",
    "something {genres}",
)


def derive_query(dataset: Dataset, item: int, variant: int = 0) -> str:
  """Deterministic search query that ``item`` answers, from its genres and decade.

  Args:
    dataset: the dataset holding the item metadata.
    item: the target item number.
    variant: which wording to use (taken modulo the number of wordings).

  Returns:
    E.g. ``a Comedy and Romance film from the 1990s``. Items without genres use their
    brand or the first words of their description or title.
  """
  it = dataset.items[int(item)]
  genres = item_genres(it)
  year = item_year(it)
  noun1 = _noun(dataset)[:-1]
  if genres:
    forms = _QUERY_FORMS if year is not None else _QUERY_FORMS_NO_YEAR
    form = forms[variant % len(forms)]
    return form.format(genres=_join(genres), noun1=noun1,
                       decade=_decade(year) if year is not None else "")
  brand = it.fields.get("brand", "").strip()
  if brand:
    return f"a {noun1} from {brand}"
  words = (it.fields.get("description", "") or clean_title(it.title)).split()
  return "something like " + " ".join(words[:12])


# -- LC-Rec user.json ---------------------------------------------------------------------


def _as_texts(value: object) -> list[str]:
  if isinstance(value, str):
    return [value.strip()] if value.strip() else []
  if isinstance(value, (list, tuple)):
    return [v.strip() for v in value if isinstance(v, str) and v.strip()]
  return []


def _raw_layout(user_text: Mapping[str, object]) -> bool:
  """True for LC-Rec's file layout keyed by field first (``{"user_explicit_preference":
  {user: [...]}, "user_vague_intention": {"train": {user: {...}}}}``)."""
  v = user_text.get("user_explicit_preference")
  return isinstance(v, Mapping)


def user_json_record(dataset: Dataset, user: int) -> dict[str, object]:
  """``{"preferences": [str], "query_item": str | None, "queries": [str]}`` for ``user``.

  Accepts both LC-Rec's raw ``X.user.json`` layout (keyed by field, then user) and a
  per-user layout (``user_text[user_id] = {...}`` with the same or simpler field names:
  ``preference``/``preferences``, ``query``/``querys`` plus ``item``).
  """
  ut = dataset.user_text or {}
  uid = dataset.user_ids[user]
  prefs: list[str] = []
  vague: object = None
  if _raw_layout(ut):
    prefs = _as_texts(ut["user_explicit_preference"].get(uid))
    vi = ut.get("user_vague_intention")
    if isinstance(vi, Mapping):
      vague = (vi.get("train") or {}).get(uid) if isinstance(vi.get("train"), Mapping) else None
  else:
    rec = ut.get(uid)
    if isinstance(rec, Mapping):
      for k in _PREF_KEYS:
        if k in rec:
          prefs = _as_texts(rec[k])
          if prefs:
            break
      vague = rec.get("user_vague_intention", rec)
      if isinstance(vague, Mapping) and isinstance(vague.get("train"), Mapping):
        vague = vague["train"]
  queries: list[str] = []
  query_item = None
  if isinstance(vague, Mapping):
    for k in ("querys", "queries", "query"):
      if k in vague:
        queries = _as_texts(vague[k])
        break
    if vague.get("item") is not None:
      query_item = str(vague["item"])
  return {"preferences": prefs, "query_item": query_item, "queries": queries}


def preference_source(dataset: Dataset) -> str:
  """``"user_json"`` when the dataset carries preference text for any user, else ``"derived"``."""
  if not dataset.user_text:
    return SOURCE_DERIVED
  for u in range(dataset.num_users):
    if user_json_record(dataset, u)["preferences"]:
      return SOURCE_USER_JSON
  return SOURCE_DERIVED


def user_preference(dataset: Dataset, user: int, items: Sequence[int],
                    rng: np.random.Generator) -> tuple[str, str]:
  """The preference text of ``user`` and its source.

  Args:
    dataset: the dataset.
    user: internal user number.
    items: the items a derived preference may count and mention (training items only).
    rng: picks one of several json preferences.

  Returns:
    ``(text, source)``, source ``"user_json"`` or ``"derived"``.
  """
  if dataset.user_text:
    prefs = user_json_record(dataset, user)["preferences"]
    if prefs:
      return prefs[int(rng.integers(len(prefs)))], SOURCE_USER_JSON
  return derive_preference(dataset, items), SOURCE_DERIVED


def user_query(dataset: Dataset, user: int, train_items: Sequence[int],
               rng: np.random.Generator,
               item_numbers: Mapping[str, int] | None = None) -> tuple[str, int, str]:
  """A search query of ``user`` whose answer is one of ``train_items``.

  Args:
    dataset: the dataset.
    user: internal user number.
    train_items: ``[n >= 1]`` the user's training items in time order.
    rng: picks the json query or the derived wording.
    item_numbers: ``dataset.item_number()``, passed in to avoid rebuilding it per user.

  Returns:
    ``(query, target item, source)``. A json query is used only when its item is in
    ``train_items``; otherwise the target is the last training item and the query is
    derived from its metadata.
  """
  train_items = [int(i) for i in train_items]
  if dataset.user_text:
    rec = user_json_record(dataset, user)
    if rec["queries"] and rec["query_item"] is not None:
      if item_numbers is None:
        item_numbers = dataset.item_number()
      number = item_numbers.get(rec["query_item"])
      if number is not None and number in train_items:
        q = rec["queries"][int(rng.integers(len(rec["queries"])))]
        return q, number, SOURCE_USER_JSON
  target = train_items[-1]
  variant = int(rng.integers(len(_QUERY_FORMS)))
  return derive_query(dataset, target, variant), target, SOURCE_DERIVED
