"""Item text -> ``[num_items, dim]`` embeddings: encoder dispatch and an on-disk cache.

``cfg`` is a config's ``embed`` section (see ``configs/ml100k_quick.py``):

* ``encoder = "minilm"``: :class:`lcrec_jax.encoders.minilm.MiniLMEncoder` on
  ``model_dir`` ("" = the wheel), with ``batch_size`` and ``max_length``. Results are
  cached under ``cache_dir`` (local or ``gs://``; process 0 writes it) by a hash of the texts, the model files' contents and
  ``max_length`` (batch size does not change the result, so it is not in the key).
* ``encoder = "npy"``: LC-Rec style precomputed ``[num_items, dim]`` array at
  ``npy_path``, rows in item order; no cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from lcrec_jax import fs

ENCODERS = ("minilm", "npy")
CACHE_VERSION = 1  # bump when the embedding recipe changes


def _get(cfg: Any, name: str) -> Any:
  """``cfg.name`` of the embed settings (an object or a dict with every ``embed.*`` field)."""
  try:
    return cfg[name] if isinstance(cfg, Mapping) else getattr(cfg, name)
  except (KeyError, AttributeError):
    raise ValueError(f"config embed.{name} is missing (the embed settings need every "
                     "embed.* field: lcrec_jax.pipeline.spec.section_settings('embed', "
                     "...))") from None


def cache_key(texts: Sequence[str], model_fingerprint: str, max_length: int,
              encoder: str = "minilm") -> str:
  """sha256 hex of everything that determines the embeddings.

  Texts are hashed with their lengths so ``["ab", "c"]`` and ``["a", "bc"]`` differ.
  """
  h = hashlib.sha256()
  h.update(json.dumps({"v": CACHE_VERSION, "encoder": encoder, "model": model_fingerprint,
                       "max_length": int(max_length), "n": len(texts)}).encode())
  for t in texts:
    b = t.encode("utf-8")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  return h.hexdigest()


def save_atomic(path: str, array: np.ndarray) -> None:
  """Writes ``array`` as .npy to ``path`` via a temp file in the same dir and a rename.

  Local or ``gs://`` (:func:`lcrec_jax.fs.save_npy`); only process 0 writes.
  """
  fs.save_npy(path, array)


def load_npy_embeddings(path: str, num_items: int) -> np.ndarray:
  """Loads a precomputed ``[num_items, dim]`` array (LC-Rec ships these as .npy).

  Raises:
    FileNotFoundError: no file (names ``embed.npy_path``).
    ValueError: not a 2-D numeric array, wrong row count, or non-finite values.
  """
  if not path:
    raise ValueError("embed.encoder='npy' needs embed.npy_path")
  if not fs.isfile(path):  # local or gs://
    raise FileNotFoundError(f"embed.npy_path: no file {path}")
  try:
    arr = fs.load_npy(path)
  except ValueError as e:
    raise ValueError(f"embed.npy_path {path}: not a plain .npy array ({e})") from e
  if arr.ndim != 2:
    raise ValueError(f"embed.npy_path {path}: expected [num_items, dim], got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"embed.npy_path {path}: dtype {arr.dtype} is not numeric")
  if arr.shape[0] != num_items:
    raise ValueError(f"embed.npy_path {path}: {arr.shape[0]} rows but the dataset has "
                     f"{num_items} items")
  arr = arr.astype(np.float32)
  bad = ~np.isfinite(arr).all(axis=1)
  if bad.any():
    raise ValueError(f"embed.npy_path {path}: {int(bad.sum())} rows hold NaN/inf, first "
                     f"row {int(np.argmax(bad))}")
  return arr


def item_embeddings(cfg: Any, texts: Sequence[str], cache_dir: str | None = None
                    ) -> np.ndarray:
  """Embeds item texts per ``cfg`` (the ``embed`` config section).

  Args:
    cfg: fields ``encoder`` ("minilm" | "npy"), ``model_dir``, ``npy_path``,
      ``batch_size``, ``max_length``.
    texts: ``[num_items]`` item texts in item order.
    cache_dir: where MiniLM results are cached; ``None`` disables the cache.

  Returns:
    ``[num_items, dim]`` float32.
  """
  encoder = _get(cfg, "encoder")
  if encoder == "npy":
    return load_npy_embeddings(_get(cfg, "npy_path"), len(texts))
  if encoder != "minilm":
    raise ValueError(f"embed.encoder={encoder!r}, expected one of {ENCODERS}")

  from lcrec_jax.encoders import minilm  # jax import only when needed

  model_dir = minilm.resolve_model_dir(_get(cfg, "model_dir"))
  max_length = int(_get(cfg, "max_length"))
  batch_size = int(_get(cfg, "batch_size"))
  path = None
  if cache_dir is not None:
    key = cache_key(texts, minilm.model_fingerprint(model_dir), max_length, encoder)
    path = fs.join(cache_dir, f"item_emb_{encoder}_{key[:24]}.npy")
    if fs.isfile(path):
      try:
        arr = fs.load_npy(path)
      except (OSError, ValueError, EOFError) as e:
        arr = None
        logging.warning("item embeddings: unreadable cache file %s (%s); recomputing", path, e)
      if (arr is not None and arr.ndim == 2 and arr.shape[0] == len(texts)
          and arr.dtype == np.float32):
        logging.info("item embeddings: cache hit %s %s", path, arr.shape)
        return arr
      if arr is not None:
        logging.warning("item embeddings: malformed cache file %s %s; recomputing", path,
                        arr.shape)
  logging.info("item embeddings: encoding %d item texts with MiniLM (max_length %d, batch %d)",
               len(texts), max_length, batch_size)
  emb = minilm.shared_encoder(model_dir).encode(list(texts), batch_size, max_length)
  if path is not None:
    save_atomic(path, emb)
    logging.info("item embeddings: cached %s %s", path, emb.shape)
  return emb
