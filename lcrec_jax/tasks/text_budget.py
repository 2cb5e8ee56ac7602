"""Item text cut to a budget per field before prompts are built (``tasks.text_budget``).

Real item descriptions run to thousands of characters (Amazon's average title +
description is ~760); the index2item / itemsearch / fusionseqrec templates put a whole
description into a prompt or a response, far over a small recipe's largest bucket, so
examples would be skipped (a response that does not fit) or cut from the left. With a
budget every field is cut before any template sees it, so the buckets hold them by design.

Unit: **UTF-8 bytes**, not tokens of the run's tokenizer. A trained tokenizer
(``model.tokenizer='trained'``) is learned from the very examples the budget shapes, so
it cannot count them first; and a byte-level BPE (SmolLM2's, the trained one) never
makes more tokens than a text has bytes, so ``N`` bytes are at most ``N`` tokens with
any of them: a response of ``title + description`` budgets fits a bucket of that many
tokens plus the prompt frame, whatever the tokenizer. The bound is loose: English text is
~0.25-0.35 tokens per byte with SmolLM2's BPE (measured on MovieLens titles), made-up
words ~0.5.

Cuts: at the last whitespace within the budget (else inside a word, never inside a
UTF-8 character), trailing punctuation and spaces dropped. Budgets (``0`` = no cut):

* ``title``: ``Item.title``;
* ``description``: the ``description`` field;
* ``other``: every other field (MovieLens year and genres, LC-Rec brand, categories).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging

from lcrec_jax.data.dataset import Dataset, Item
from lcrec_jax.errors import ConfigError

FIELDS = ("title", "description", "other")
_STRIP = " \t\n,;:-"


@dataclasses.dataclass(frozen=True)
class TextBudget:
  """Bytes kept per field; 0 = no cut."""

  title: int = 0
  description: int = 0
  other: int = 0

  @classmethod
  def from_config(cls, cfg: Any, name: str = "tasks.text_budget") -> "TextBudget":
    """From a ConfigDict / dict with keys :data:`FIELDS` (None = no budget)."""
    if cfg is None:
      return cls()
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
      raise ConfigError(f"config {name} has unknown field(s) {unknown}; known: {FIELDS}")
    for k, v in values.items():
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"config {name}.{k}={v!r}: expected a byte count >= 0 (0 = no cut)")
    return cls(**values)

  def __bool__(self) -> bool:
    return any((self.title, self.description, self.other))


def cut_text(text: str, budget: int) -> str:
  """``text`` cut to at most ``budget`` UTF-8 bytes (module docstring); 0 = unchanged."""
  data = text.encode("utf-8")
  if budget <= 0 or len(data) <= budget:
    return text
  head = data[:budget].decode("utf-8", errors="ignore")  # drops a split character
  space = head.rfind(" ")
  words = head[:space].rstrip(_STRIP) if space >= len(head) // 2 else ""
  return words or head.rstrip(_STRIP) or head


def apply_text_budget(dataset: Dataset, budget: TextBudget) -> tuple[Dataset, dict[str, int]]:
  """``dataset`` with every item's fields cut to ``budget``; logs and returns cut counts.

  Returns:
    ``(dataset, cut)``: the same dataset object when nothing is cut; ``cut[field]`` is
    the number of texts cut per budget field (``"title"``, ``"description"``, ``"other"``).
  """
  cut = {k: 0 for k in FIELDS}
  if not budget:
    return dataset, cut
  items = []
  for it in dataset.items:
    title = cut_text(it.title, budget.title)
    cut["title"] += title != it.title
    fields = {}
    for k, v in it.fields.items():
      kind = "description" if k == "description" else "other"
      fields[k] = cut_text(v, getattr(budget, kind))
      cut[kind] += fields[k] != v
    items.append(Item(it.item_id, title, fields))
  if not any(cut.values()):
    return dataset, cut
  logging.info("text budget (tasks.text_budget, bytes): cut %d titles to %d, %d descriptions "
               "to %d, %d other fields to %d, of %d items", cut["title"], budget.title,
               cut["description"], budget.description, cut["other"], budget.other,
               dataset.num_items)
  return dataclasses.replace(dataset, items=tuple(items)), cut
