"""Examples of the six LC-Rec alignment tasks, built from a Dataset and an ItemIndex.

Per-user tasks (``seqrec``, ``fusionseqrec``, ``itemsearch``, ``preferenceobtain``) use
only each user's training part ``Dataset.split().train[u]``, so validation and test
targets never appear in training text:

* ``seqrec``: for every position ``t >= 1`` of ``train[u]``, the codes of the items
  before ``t`` (at most ``max_history``, oldest first) -> the code of item ``t``.
  With ``seqrec_windows`` (not in LC-Rec) seqrec instead cuts ``train[u]`` into consecutive
  windows of ``max_history + 1`` items, stride = window, aligned to the end (the last window
  ends at the last training item, the oldest may be shorter; a window of one item, only
  ever ``train[u][0]``, is dropped): all but the last item of a window are the history,
  the last is the target. With the history loss on seqrec every history code is a label
  too, so an epoch trains every training target (positions ``t >= 1``) exactly once, with
  the items of its window before it as context (at most ``max_history``).
* ``fusionseqrec``: the same prefixes, rendered either as history codes -> next item's
  title or description, or as history titles -> next item's code.
* ``itemsearch``: one per user: a query (and, in some templates, the user's preference
  and history) -> the code of a training item the query describes (see
  :mod:`lcrec_jax.tasks.preference`); the history shown is what came before that item.
* ``preferenceobtain``: one per user: the last ``max_history`` training items -> the
  user's preference in words.

Catalogue tasks (``item2index``, ``index2item``) have one record per item: its title
and/or description <-> its code. They carry no user information.

Sampling follows LC-Rec: ``sample_num`` (LC-Rec's ``train_data_sample_num``; 0 = all)
records are drawn per task without replacement, then each record is rendered with
``prompt_sample_num`` distinct templates drawn from those whose placeholders the record
can fill. Every draw comes from ``numpy`` generators seeded by ``(seed, task)``, so the
same arguments give the same examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np

from lcrec_jax import progress
from lcrec_jax.data.dataset import Dataset, Item, Split
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.tasks import preference as pref_lib
from lcrec_jax.tasks import prompts
from lcrec_jax.tasks import text_budget as budget_lib

DEFAULT_MAX_HISTORY = 20


@dataclasses.dataclass(frozen=True)
class Example:
  """One instruction/response pair.

  ``meta`` holds ``template_id`` and, by task: ``user``, ``history`` (tuple of item
  numbers shown), ``target`` (the item the response names), ``items`` (every item number
  the text mentions, for leakage checks), ``source`` (``"derived"`` | ``"user_json"``
  for preference/query text), ``split`` (eval examples).
  """

  task: str
  instruction: str
  response: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def item_description(item: Item) -> str:
  """An item's text besides its title: its ``description`` field, else ``k: v`` fields."""
  desc = str(item.fields.get("description", "") or "").strip()
  if desc:
    return desc
  return "; ".join(f"{k}: {v}" for k, v in item.fields.items() if str(v).strip())


@dataclasses.dataclass
class _Context:
  """Per-item strings computed once."""

  dataset: Dataset
  index: ItemIndex
  split: Split
  max_history: int
  codes: list[str]
  titles: list[str]
  descriptions: list[str]

  @classmethod
  def make(cls, dataset: Dataset, index: ItemIndex, split: Split | None,
           max_history: int) -> "_Context":
    if index.num_items != dataset.num_items:
      raise ValueError(f"item index has {index.num_items} items but dataset "
                       f"{dataset.name!r} has {dataset.num_items}")
    if max_history < 1:
      raise ValueError(f"max_history must be >= 1, got {max_history}")
    return cls(dataset, index, dataset.split() if split is None else split, max_history,
               [index.item_code_str(i) for i in range(index.num_items)],
               [pref_lib.clean_title(it.title) for it in dataset.items],
               [item_description(it) for it in dataset.items])

  def history_codes(self, items: Sequence[int]) -> str:
    codes = self.codes
    return prompts.HISTORY_SEP.join([codes[i] for i in items])

  def history_titles(self, items: Sequence[int]) -> str:
    titles = self.titles
    return prompts.HISTORY_SEP.join([f'"{titles[i]}"' for i in items])


# A record: values for the template placeholders plus meta, before a template is chosen.
_Record = tuple[dict[str, str], dict[str, Any]]


def _prefix_records(ctx: _Context, with_text: bool) -> list[_Record]:
  out = []
  for u, train in enumerate(ctx.split.train):
    train = [int(i) for i in train]
    for t in range(1, len(train)):
      hist = train[max(0, t - ctx.max_history):t]
      target = train[t]
      values = {"history": ctx.history_codes(hist), "item": ctx.codes[target]}
      if with_text:
        values.update(history_titles=ctx.history_titles(hist), title=ctx.titles[target],
                      description=ctx.descriptions[target])
      out.append((values, {"user": u, "history": tuple(hist), "target": target,
                           "items": tuple(hist) + (target,)}))
  return out


def _window_records(ctx: _Context) -> list[_Record]:
  """Seqrec records of consecutive windows (module docstring, ``seqrec_windows``)."""
  out = []
  width = ctx.max_history + 1
  for u, train in enumerate(ctx.split.train):
    train = [int(i) for i in train]
    for end in range(len(train), 1, -width):
      window = train[max(0, end - width):end]
      if len(window) < 2:
        continue
      hist, target = window[:-1], window[-1]
      out.append(({"history": ctx.history_codes(hist), "item": ctx.codes[target]},
                  {"user": u, "history": tuple(hist), "target": target,
                   "items": tuple(window), "window_start": end - len(window)}))
  return out


def _item_records(ctx: _Context) -> list[_Record]:
  return [({"item": ctx.codes[i], "title": ctx.titles[i], "description": ctx.descriptions[i]},
           {"user": None, "target": i, "items": (i,)}) for i in range(ctx.index.num_items)]


def _itemsearch_records(ctx: _Context, rng: np.random.Generator,
                        preference_from: str) -> list[_Record]:
  out = []
  numbers = ctx.dataset.item_number()
  for u, train in enumerate(ctx.split.train):
    train = [int(i) for i in train]
    query, target, q_source = pref_lib.user_query(ctx.dataset, u, train, rng, numbers)
    pos = len(train) - 1 - train[::-1].index(target)
    before = train[:pos]
    hist = before[-ctx.max_history:]
    values = {"query": query, "item": ctx.codes[target]}
    sources = {"query": q_source}
    if hist:
      values["history"] = ctx.history_codes(hist)
    pref_items = hist if preference_from == "history" else before
    text, p_source = pref_lib.user_preference(ctx.dataset, u, pref_items, rng)
    if pref_items or p_source == pref_lib.SOURCE_USER_JSON:  # json text needs no history
      values["preference"] = text
      sources["preference"] = p_source
    source = (pref_lib.SOURCE_USER_JSON if pref_lib.SOURCE_USER_JSON in sources.values()
              else pref_lib.SOURCE_DERIVED)
    out.append((values, {"user": u, "history": tuple(hist), "target": target,
                         "items": tuple(hist) + (target,), "source": source,
                         "sources": sources}))
  return out


def _preference_records(ctx: _Context, rng: np.random.Generator,
                        preference_from: str) -> list[_Record]:
  out = []
  for u, train in enumerate(ctx.split.train):
    train = [int(i) for i in train]
    hist = train[-ctx.max_history:]
    pref_items = hist if preference_from == "history" else train
    text, source = pref_lib.user_preference(ctx.dataset, u, pref_items, rng)
    out.append(({"history": ctx.history_codes(hist), "preference": text},
                {"user": u, "history": tuple(hist), "target": None,
                 "items": tuple(pref_items), "source": source}))
  return out


def _render(task: str, records: Sequence[_Record], rng: np.random.Generator,
            prompt_sample_num: int) -> list[Example]:
  tmpls = prompts.templates(task)
  fields = [t.fields for t in tmpls]
  fits: dict[frozenset[str], list[int]] = {}
  draws = iter(rng.random(len(records)).tolist())  # one uniform per record when k == 1
  out = []
  for values, meta in records:
    filled = frozenset(k for k, v in values.items() if v)
    ok = fits.get(filled)
    if ok is None:
      ok = fits[filled] = [j for j, f in enumerate(fields) if f <= filled]
    if not ok:
      continue
    if prompt_sample_num == 1:
      chosen = [ok[int(next(draws) * len(ok))]]
    else:
      chosen = rng.choice(ok, size=min(prompt_sample_num, len(ok)), replace=False)
    for j in chosen:
      instruction, response = tmpls[int(j)].render(values)
      out.append(Example(task, instruction, response, {**meta, "template_id": int(j)}))
  return out


def build_task(task: str, dataset: Dataset, index: ItemIndex, *, seed: int = 0,
               sample_num: int = 0, prompt_sample_num: int = 1,
               max_history: int = DEFAULT_MAX_HISTORY, preference_from: str = "history",
               split: Split | None = None, seqrec_windows: bool = False) -> list[Example]:
  """Training examples of one task.

  Args:
    task: one of :data:`lcrec_jax.tasks.prompts.TASK_NAMES`.
    dataset: items with text and user sequences.
    index: conflict-free or not, one code per dataset item (same order).
    seed: seeds the record sample, the template choice and json-text choice.
    sample_num: records kept (without replacement, original order kept); 0 = all.
    prompt_sample_num: templates rendered per record (distinct; fewer if fewer fit).
    max_history: most history items shown (most recent ones).
    preference_from: which training items a derived preference counts: ``"history"`` (the
      items the prompt shows, so the text is a function of the prompt) or ``"train"``
      (all of the user's training items before the target).
    split: the leave-one-out split; default ``dataset.split()``.
    seqrec_windows: seqrec records are consecutive windows of each user's training items
      instead of every prefix (module docstring); other tasks ignore it.

  Returns:
    ``[num_records * prompt_sample_num]`` examples (fewer where templates don't fit).
  """
  prompts.templates(task)  # raises on an unknown task name
  if preference_from not in ("history", "train"):
    raise ValueError(f"preference_from must be 'history' or 'train', got {preference_from!r}")
  if sample_num < 0 or prompt_sample_num < 1:
    raise ValueError(f"task {task!r}: sample_num must be >= 0 and prompt_sample_num >= 1, "
                     f"got {sample_num} and {prompt_sample_num}")
  tid = prompts.TASK_NAMES.index(task)
  rng_sample, rng_template, rng_text = (np.random.default_rng([seed, tid, k]) for k in range(3))
  ctx = _Context.make(dataset, index, split, max_history)
  if task == "seqrec":
    records = (_window_records(ctx) if seqrec_windows else
               _prefix_records(ctx, with_text=False))
  elif task == "fusionseqrec":
    records = _prefix_records(ctx, with_text=True)
  elif task in ("item2index", "index2item"):
    records = _item_records(ctx)
  elif task == "itemsearch":
    records = _itemsearch_records(ctx, rng_text, preference_from)
  else:
    records = _preference_records(ctx, rng_text, preference_from)
  if 0 < sample_num < len(records):
    keep = np.sort(rng_sample.choice(len(records), size=sample_num, replace=False))
    records = [records[int(i)] for i in keep]
  return _render(task, records, rng_template, prompt_sample_num)


def build_train_examples(dataset: Dataset, index: ItemIndex,
                         tasks: Sequence[str] = prompts.TASK_NAMES, *,
                         sample_nums: Sequence[int] | None = None,
                         prompt_sample_nums: Sequence[int] | None = None, seed: int = 0,
                         max_history: int = DEFAULT_MAX_HISTORY,
                         preference_from: str = "history",
                         text_budget: budget_lib.TextBudget | None = None,
                         show_progress: bool = False,
                         seqrec_windows: bool = False) -> list[Example]:
  """All training examples of ``tasks``, task after task (batching shuffles them).

  ``sample_nums`` / ``prompt_sample_nums`` are per task, like LC-Rec's
  ``--train_data_sample_num 0,0,0,100000,0,0`` and ``--train_prompt_sample_num 1,...``.
  ``text_budget`` cuts item text fields first (:mod:`lcrec_jax.tasks.text_budget`).
  ``show_progress`` reports tasks done (:class:`lcrec_jax.progress.Progress`).
  ``seqrec_windows``: seqrec as consecutive windows (:func:`build_task`).
  """
  tasks = list(tasks)
  sample_nums = [0] * len(tasks) if sample_nums is None else list(sample_nums)
  prompt_sample_nums = [1] * len(tasks) if prompt_sample_nums is None else list(
      prompt_sample_nums)
  if not (len(sample_nums) == len(prompt_sample_nums) == len(tasks)):
    raise ValueError(f"tasks ({len(tasks)}), sample_nums ({len(sample_nums)}) and "
                     f"prompt_sample_nums ({len(prompt_sample_nums)}) must have equal length")
  if text_budget is not None:
    dataset, _ = budget_lib.apply_text_budget(dataset, text_budget)
  split = dataset.split()
  out: list[Example] = []
  with progress.Progress(len(tasks), "task build", "task", enabled=show_progress) as p:
    for task, n, k in zip(tasks, sample_nums, prompt_sample_nums):
      out.extend(build_task(task, dataset, index, seed=seed, sample_num=int(n),
                            prompt_sample_num=int(k), max_history=max_history,
                            preference_from=preference_from, split=split,
                            seqrec_windows=seqrec_windows))
      p.update(1, task=task, examples=len(out))
  return out


def seqrec_eval_examples(dataset: Dataset, index: ItemIndex, split: str = "valid",
                         template_id: int = 0, max_history: int = DEFAULT_MAX_HISTORY
                         ) -> list[Example]:
  """One seqrec example per user for ``split`` ("valid" | "test") with a fixed template.

  The history is the split's history (valid: ``train[u]``; test: ``train[u]`` + the valid
  target), its last ``max_history`` items; ``response`` is the target's code and
  ``meta["target"]`` its item number.
  """
  tmpls = prompts.templates("seqrec")
  if not 0 <= template_id < len(tmpls):
    raise ValueError(f"template_id {template_id} out of range 0..{len(tmpls) - 1} for seqrec")
  if split not in ("valid", "test"):
    raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
  ctx = _Context.make(dataset, index, None, max_history)
  rows: Iterable = ctx.split.valid if split == "valid" else ctx.split.test
  out = []
  for ex in rows:
    hist = [int(i) for i in ex.history[-max_history:]]
    instruction, response = tmpls[template_id].render(
        {"history": ctx.history_codes(hist), "item": ctx.codes[ex.target]})
    out.append(Example("seqrec", instruction, response,
                       {"user": ex.user, "history": tuple(hist), "target": int(ex.target),
                        "items": tuple(hist) + (int(ex.target),),
                        "template_id": template_id, "split": split}))
  return out


def num_templates(task: str) -> int:
  """How many templates ``task`` has (evaluation loops over seqrec's)."""
  return len(prompts.templates(task))
