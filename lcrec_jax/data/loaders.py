"""``load_dataset(cfg)``: one entry point over the dataset formats.

``cfg`` is the config's ``data`` section (see ``configs/ml100k_quick.py``):

- ``format``: ``"movielens"`` (MovieLens-100K, :mod:`lcrec_jax.data.movielens`),
  ``"recbole"`` (any atomic ``name.inter`` / ``name.item`` pair,
  :mod:`lcrec_jax.data.recbole_atomic`) or ``"lcrec"`` (LC-Rec json,
  :mod:`lcrec_jax.data.lcrec_json`);
- ``path``: directory of the files; for ``movielens`` ``""`` means the recbole wheel's
  ml-100k directory; required for the other formats;
- ``name``: file stem (``ml-100k``, ``Instruments``, ...);
- ``on_empty_title`` (optional, default ``"error"``): ``"error"`` or ``"skip"``;
- ``title_field`` (optional, recbole only, default auto): the item title column.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lcrec_jax.data.dataset import Dataset
from lcrec_jax.errors import ConfigError
from lcrec_jax.data.lcrec_json import lcrec_paths, load_lcrec_json
from lcrec_jax.data.movielens import ML100K_NAME, load_movielens_100k, ml100k_dir
from lcrec_jax.data.recbole_atomic import atomic_paths, load_recbole_atomic

FORMATS = ("movielens", "recbole", "lcrec")


def _get(cfg: Any, key: str) -> Any:
  """``cfg.key`` of the data settings (an object or a dict with every ``data.*`` field)."""
  try:
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)
  except (KeyError, AttributeError):
    raise ConfigError(f"config data.{key} is missing (the data settings need every data.* "
                      "field: lcrec_jax.pipeline.spec.section_settings('data', ...))") from None


def load_dataset(cfg: Any) -> Dataset:
  """Load the dataset ``cfg`` (a ``ConfigDict`` or dict: format, path, name) describes.

  Raises:
    ConfigError: a ``data.*`` field that names no loadable dataset.
    lcrec_jax.data.errors.DataError: a data file the loader refuses.
  """
  fmt = _get(cfg, "format")
  path = _get(cfg, "path") or ""
  name = _get(cfg, "name") or ""
  on_empty_title = _get(cfg, "on_empty_title") or "error"
  if fmt == "movielens":
    if name and name != "ml-100k":
      raise ConfigError(f"config data.name={name!r}: data.format='movielens' loads ml-100k "
                       "only; use data.format='recbole' for other atomic files")
    return load_movielens_100k(path, on_empty_title=on_empty_title)
  if fmt not in FORMATS:
    raise ConfigError(f"config data.format={fmt!r}: expected one of {FORMATS}")
  if not path:
    raise ConfigError(f"config data.path is empty: data.format={fmt!r} needs the directory "
                     "of the dataset files")
  if not name:
    raise ConfigError(f"config data.name is empty: data.format={fmt!r} needs the file stem")
  if fmt == "recbole":
    return load_recbole_atomic(path, name, on_empty_title=on_empty_title,
                               title_field=_get(cfg, "title_field") or None)
  return load_lcrec_json(path, name, on_empty_title=on_empty_title)


def data_files(cfg: Any) -> list[str]:
  """The files ``load_dataset(cfg)`` reads that exist now (for provenance hashes).

  Best effort: a config that names no loadable dataset gives ``[]`` (``load_dataset``
  reports the problem when a stage runs).
  """
  fmt = _get(cfg, "format")
  path = _get(cfg, "path") or ""
  name = _get(cfg, "name") or ""
  try:
    if fmt == "movielens":
      paths = atomic_paths(path or ml100k_dir(), ML100K_NAME)
    elif fmt == "recbole" and path and name:
      paths = atomic_paths(path, name)
    elif fmt == "lcrec" and path and name:
      found = lcrec_paths(path, name)
      paths = [found[k] for k in ("inter", "item", "user")]
    else:
      return []
  except Exception:  # pylint: disable=broad-except  (no wheel: load_dataset says so)
    return []
  return [p for p in paths if os.path.isfile(p)]
