"""The one dataset model every loader produces and every stage consumes.

Items are numbered ``0 .. num_items-1`` in the order the loader defines (file order of
the item file); users likewise. A user's sequence is the chronological list of internal
item numbers they interacted with. The leave-one-out split follows LC-Rec / SASRec:
train = all but the last two items, valid target = second last, test target = last.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

MIN_INTERACTIONS = 3  # a user needs train (>=1) + valid + test


@dataclasses.dataclass(frozen=True)
class Item:
  """One catalogue item: its external id, a title and further text fields.

  ``fields`` keeps the loader's other text in a fixed order, e.g. MovieLens
  ``{"year": "1995", "genres": "Animation, Children's, Comedy"}`` or LC-Rec's
  ``{"description": "...", "brand": "..."}``.
  """

  item_id: str
  title: str
  fields: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def text(self) -> str:
    """The text the item encoder embeds: title first, then each non-empty field."""
    parts = [self.title] + [f"{k}: {v}" for k, v in self.fields.items() if v]
    return ". ".join(parts)


@dataclasses.dataclass(frozen=True)
class SplitExample:
  """One evaluation example: a user's history (internal item numbers) and the target."""

  user: int
  history: np.ndarray  # [len] int32, chronological
  target: int


@dataclasses.dataclass(frozen=True)
class Split:
  """Leave-one-out split of a :class:`Dataset`.

  ``train[u]`` is user ``u``'s training sequence (everything but the last two items);
  ``valid[u]`` predicts the second-last item from ``train[u]``; ``test[u]`` predicts the
  last item from ``train[u] + valid target``.
  """

  train: tuple[np.ndarray, ...]
  valid: tuple[SplitExample, ...]
  test: tuple[SplitExample, ...]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Items with text and users' chronological item sequences.

  Attributes:
    name: short dataset name, e.g. ``"ml-100k"``.
    items: catalogue, ``items[i]`` is internal item ``i``.
    user_ids: external user ids, ``user_ids[u]`` is internal user ``u``.
    sequences: ``sequences[u]`` is an int32 array of internal item numbers in time order.
    user_text: optional per-user text from the source (LC-Rec ``X.user.json``), keyed
      by external user id; free-form fields such as ``{"preference": ..., "query": ...}``.
    stats: counts of documented skips made while loading (e.g. ``"users_too_short"``),
      plus anything else the loader reports. Never silent: loaders log these too.
  """

  name: str
  items: tuple[Item, ...]
  user_ids: tuple[str, ...]
  sequences: tuple[np.ndarray, ...]
  user_text: Mapping[str, Mapping[str, object]] = dataclasses.field(default_factory=dict)
  stats: Mapping[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if len(self.user_ids) != len(self.sequences):
      raise ValueError(
          f"dataset {self.name!r}: {len(self.user_ids)} user ids but "
          f"{len(self.sequences)} sequences")
    n = len(self.items)
    for u, seq in enumerate(self.sequences):
      if len(seq) < MIN_INTERACTIONS:
        raise ValueError(
            f"dataset {self.name!r}: user {self.user_ids[u]!r} has {len(seq)} "
            f"interactions, fewer than {MIN_INTERACTIONS} needed for a leave-one-out split")
      if len(seq) and (int(np.min(seq)) < 0 or int(np.max(seq)) >= n):
        raise ValueError(
            f"dataset {self.name!r}: user {self.user_ids[u]!r} refers to an item "
            f"number outside 0..{n - 1}")

  @property
  def num_items(self) -> int:
    return len(self.items)

  @property
  def num_users(self) -> int:
    return len(self.user_ids)

  @property
  def num_interactions(self) -> int:
    return int(sum(len(s) for s in self.sequences))

  def item_texts(self) -> list[str]:
    """``[num_items]`` texts for the item encoder, in item order."""
    return [it.text() for it in self.items]

  def item_number(self) -> dict[str, int]:
    """Map external item id -> internal item number."""
    return {it.item_id: i for i, it in enumerate(self.items)}

  def split(self) -> Split:
    """Leave-one-out split (see :class:`Split`)."""
    train, valid, test = [], [], []
    for u, seq in enumerate(self.sequences):
      seq = np.asarray(seq, np.int32)
      train.append(seq[:-2])
      valid.append(SplitExample(u, seq[:-2], int(seq[-2])))
      test.append(SplitExample(u, seq[:-1], int(seq[-1])))
    return Split(tuple(train), tuple(valid), tuple(test))

  def summary(self) -> dict[str, int]:
    return {"num_items": self.num_items, "num_users": self.num_users,
            "num_interactions": self.num_interactions, **dict(self.stats)}


def make_sequences(user_events: Mapping[str, Sequence[tuple]]) -> list[np.ndarray]:
  """Sort each user's ``(timestamp, tie_break, item_number)`` events; return item arrays.

  The tie-break is part of the key, so equal timestamps keep a stable, documented order
  (the loaders use the row's line number in the source file).
  """
  return [np.asarray([e[-1] for e in sorted(evts)], np.int32) for evts in user_events.values()]
