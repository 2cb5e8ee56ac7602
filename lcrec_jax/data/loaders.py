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

from typing import Any

from lcrec_jax import spec
from lcrec_jax.data.dataset import Dataset
from lcrec_jax.errors import ConfigError
from lcrec_jax.data.lcrec_json import load_lcrec_json
from lcrec_jax.data.movielens import load_movielens_100k
from lcrec_jax.data.recbole_atomic import load_recbole_atomic

FORMATS = ("movielens", "recbole", "lcrec")


def _get(cfg: Any, key: str) -> Any:
  """``cfg.key`` (ConfigDict, dict or object); the run spec's default when absent."""
  return spec.get(cfg, f"data.{key}")


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
