"""A :class:`Dataset`'s leave-one-out split as a tensorflow-datasets builder (array_record).

Works without TensorFlow: tensorflow-datasets 4.9.10 encodes ``FeaturesDict`` /
``Scalar`` / ``Tensor`` features with numpy, writes ``array_record`` shards, and reads them
back as random-access ``ArrayRecordDataSource`` objects (``builder.as_data_source``),
which grain batches directly. Only ``as_dataset`` (tf.data) needs TensorFlow; nothing
here uses it. One snag: for a builder defined in a package, tfds 4.9.10 locates the
builder's code through ``importlib_resources``, which it declares only for Python < 3.9;
:class:`LcrecSplits` overrides ``code_path`` so no extra package is needed.

Layout: ``<data_dir>/lcrec_splits/<dataset name>-<fingerprint>/1.0.0/`` with splits
``train``, ``validation``, ``test``; record ``u`` of every split is user ``u`` (shuffling
disabled). Each record is ``{"user": int32, "history": int32[len], "target": int32}``:

- ``validation`` / ``test``: exactly ``Split.valid[u]`` / ``Split.test[u]``;
- ``train``: the training sequence ``Split.train[u]`` cut as history = all but its last
  item, target = its last item (a user with 3 interactions has an empty history), so
  ``concat(history, [target]) == Split.train[u]``.

The config name carries a fingerprint of the items and sequences, so a changed dataset
is written next to, never mistaken for, an older one. Reading needs no :class:`Dataset`:
:func:`open_splits` uses ``tfds.builder_from_directory``.

Batches (:func:`grain_batches`) have fixed shapes for ``jit``: histories keep their last
``max_len`` items, left-padded with ``pad_id`` (most recent item in the last column);
a final partial batch is filled with padding examples whose ``valid`` is False.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
from typing import Any

from etils import epath
import grain
import numpy as np
import tensorflow_datasets as tfds

from lcrec_jax.data.dataset import Dataset, Split, SplitExample

BUILDER_NAME = "lcrec_splits"
SPLITS = ("train", "validation", "test")


def fingerprint(dataset: Dataset) -> str:
  """Hex sha256 over item ids, user ids and sequences (what the split depends on)."""
  h = hashlib.sha256()
  h.update("\x1f".join(it.item_id for it in dataset.items).encode())
  h.update(b"\x1e")
  for uid, seq in zip(dataset.user_ids, dataset.sequences):
    h.update(uid.encode() + b"\x1f")
    h.update(np.asarray(seq, "<i4").tobytes())
  return h.hexdigest()


def config_name(dataset: Dataset) -> str:
  """``<slug of dataset.name>-<12 hex of the fingerprint>``."""
  slug = re.sub(r"[^a-z0-9_]+", "_", dataset.name.lower()).strip("_") or "dataset"
  return f"{slug}-{fingerprint(dataset)[:12]}"


def _example(user: int, history: np.ndarray, target: int) -> dict[str, Any]:
  return {"user": np.int32(user), "history": np.asarray(history, np.int32),
          "target": np.int32(target)}


def prepare_quietly(builder: tfds.core.DatasetBuilder) -> None:
  """``builder.download_and_prepare()`` without TFDS's stdout banner ("Downloading and
  preparing dataset Unknown size ...", "Dataset ... downloaded and prepared") and, when
  stderr is not a terminal (``nohup``, a pod worker, CI), without its tqdm bars: the
  banner goes to the log at INFO instead."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from lcrec_jax import progress  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  was = tqdm_utils._active  # pylint: disable=protected-access
  tfds.display_progress_bar(was and progress.stderr_is_terminal())
  builder._log_download_bytes = lambda: logging.info(  # pylint: disable=protected-access
      "tfds: preparing %s in %s", builder.name, builder.data_dir)
  builder._log_download_done = lambda: logging.info(  # pylint: disable=protected-access
      "tfds: %s prepared", builder.name)
  try:
    builder.download_and_prepare()
  finally:
    tfds.display_progress_bar(was)


class LcrecSplits(tfds.core.GeneratorBasedBuilder):
  """TFDS builder over one :class:`Dataset`'s leave-one-out split (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "user/history/target records, leave-one-out split."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. tfds' own lookup calls ``importlib_resources``, a package it declares
    only for Python < 3.9 and that is absent here; this is the same path without it."""
    return epath.Path(inspect.getfile(cls))

  def __init__(self, dataset: Dataset, **kwargs):
    self._lcrec_dataset = dataset
    kwargs.setdefault("file_format", "array_record")
    kwargs.setdefault("config", tfds.core.BuilderConfig(
        name=config_name(dataset), description=f"LC-Rec splits of {dataset.name}"))
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    d = self._lcrec_dataset
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Leave-one-out split of {d.name}: {d.num_users} users, "
                    f"{d.num_items} items.",
        features=tfds.features.FeaturesDict({
            "user": tfds.features.Scalar(np.int32),
            "history": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "target": tfds.features.Scalar(np.int32),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            dataset_name=d.name, fingerprint=fingerprint(d), num_items=d.num_items,
            num_users=d.num_users),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {s: self._generate_examples(s) for s in SPLITS}

  def _generate_examples(self, split: str):
    parts = self._lcrec_dataset.split()
    if split == "train":
      for u, seq in enumerate(parts.train):
        yield u, _example(u, seq[:-1], int(seq[-1]))
    else:
      for ex in (parts.valid if split == "validation" else parts.test):
        yield ex.user, _example(ex.user, ex.history, ex.target)


def write_tfds(dataset: Dataset, data_dir: str) -> LcrecSplits:
  """Write (or reuse, if already prepared) ``dataset``'s splits under ``data_dir``."""
  builder = LcrecSplits(dataset, data_dir=data_dir)
  prepare_quietly(builder)
  return builder


def open_splits(directory: str) -> tfds.core.DatasetBuilder:
  """Open a prepared builder directory (``builder.data_dir``) without the Dataset."""
  if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
    raise FileNotFoundError(f"{directory}: no prepared TFDS dataset (dataset_info.json)")
  return tfds.builder_from_directory(directory)


def split_from_tfds(builder: tfds.core.DatasetBuilder) -> Split:
  """Rebuild the :class:`Split` from the array_record files (inverse of the builder)."""
  train_src = builder.as_data_source("train")
  train = []
  for u in range(len(train_src)):
    r = train_src[u]
    train.append(np.concatenate([np.asarray(r["history"], np.int32),
                                 np.asarray([r["target"]], np.int32)]))
  evals = []
  for split in ("validation", "test"):
    src = builder.as_data_source(split)
    evals.append(tuple(
        SplitExample(int(r["user"]), np.asarray(r["history"], np.int32), int(r["target"]))
        for r in (src[i] for i in range(len(src)))))
  return Split(tuple(train), evals[0], evals[1])


def pad_example(record: dict[str, Any], max_len: int, pad_id: int = -1) -> dict[str, np.ndarray]:
  """One record -> fixed shapes: ``history [max_len]`` (last items, left-padded), scalars."""
  hist = np.asarray(record["history"], np.int32)[-max_len:] if max_len else np.zeros(0, np.int32)
  out = np.full((max_len,), pad_id, np.int32)
  if len(hist):
    out[max_len - len(hist):] = hist
  return {"user": np.int32(record["user"]), "history": out,
          "length": np.int32(len(hist)), "target": np.int32(record["target"]),
          "valid": np.bool_(True)}


def grain_batches(source: Any, batch_size: int, max_len: int, *, pad_id: int = -1,
                  drop_remainder: bool = False, shuffle_seed: int | None = None
                  ) -> grain.MapDataset:
  """Fixed-shape batches of a split with grain.

  Args:
    source: a random-access source, e.g. ``builder.as_data_source("test")``.
    batch_size: examples per batch.
    max_len: history length kept (the most recent ``max_len`` items).
    pad_id: value of padding positions (and of padding examples' user/target).
    drop_remainder: drop the final partial batch instead of padding it.
    shuffle_seed: shuffle examples with this seed (``None``: user order).

  Returns:
    ``grain.MapDataset`` of dicts: ``user [B]``, ``history [B, max_len]``,
    ``length [B]`` (real history items), ``target [B]``, ``valid [B]`` (False on the
    padding examples that fill the last batch).
  """
  if batch_size < 1 or max_len < 0:
    raise ValueError(f"batch_size must be >= 1 and max_len >= 0, got {batch_size}, {max_len}")
  n = len(source)
  ds = grain.MapDataset.source(source)
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.map(lambda r: pad_example(r, max_len, pad_id))
  if not drop_remainder and n % batch_size:
    filler = {"user": np.int32(pad_id), "history": np.full((max_len,), pad_id, np.int32),
              "length": np.int32(0), "target": np.int32(pad_id), "valid": np.bool_(False)}
    total = n + batch_size - n % batch_size
    ds = grain.MapDataset.range(total).map(
        lambda i, ds=ds: ds[i] if i < n else dict(filler))
  return ds.batch(batch_size, drop_remainder=drop_remainder)
