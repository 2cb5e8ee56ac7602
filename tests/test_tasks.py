"""LC-Rec alignment tasks: rendering, code placement, sampling, preference text, leakage."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.data.dataset import Dataset, Item
from lcrec_jax.data.loaders import load_dataset
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.tasks import builders, preference, prompts

CODE_RE = re.compile(r"(?:<[a-z]_\d+>)+")
PER_USER = ("seqrec", "fusionseqrec", "itemsearch", "preferenceobtain")


def random_index(item_ids, seed=0, levels=3, size=16) -> ItemIndex:
  """A conflict-free random index: distinct code rows drawn without replacement."""
  rng = np.random.default_rng(seed)
  n = len(item_ids)
  flat = rng.choice(size ** levels, size=n, replace=False)
  codes = np.stack([(flat // size ** l) % size for l in range(levels)], 1).astype(np.int32)
  return ItemIndex(tuple(item_ids), codes, (size,) * levels)


# Hand-made catalogue: genres and years chosen so the preference text is hand-computable.
_ITEMS = [
    ("A", "Alpha", "1994", "Drama"),
    ("B", "Bravo", "1995", "Drama, Thriller"),
    ("C", "Charlie", "1987", "Thriller"),
    ("D", "Delta", "1996", "Comedy"),
    ("E", "Echo", "1999", "Drama"),
    ("F", "Foxtrot", "1972", "Western"),
    ("G", "Golf", "2001", "Animation, Children's"),
    ("H", "Hotel", "1993", "Horror"),
    ("I", "India", "", "Documentary"),
    ("J", "Juliet.", "1990", "Romance, Comedy"),
    ("K", "Kilo", "1980", "Sci-Fi"),
    ("L", "Lima", "1998", "Crime, Thriller"),
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Dataset, ItemIndex]:
  items = tuple(Item(i, t, {"year": y, "genres": g}) for i, t, y, g in _ITEMS)
  rng = np.random.default_rng(3)
  seqs = [np.asarray([0, 1, 2, 3, 4, 5, 6], np.int32)]           # user 0: hand-computed
  seqs += [rng.permutation(12)[:n].astype(np.int32) for n in (3, 4, 5, 8, 12, 9, 6)]
  ds = Dataset("ml-tiny", items, tuple(f"u{k}" for k in range(len(seqs))), tuple(seqs))
  return ds, random_index([it.item_id for it in items])


@pytest.fixture(scope="module")
def ml100k_subset() -> tuple[Dataset, ItemIndex]:
  """The first 150 users of real MovieLens-100K (all items) and a random index."""
  full = load_dataset(spec.section_settings("data", {"format": "movielens", "path": "", "name": "ml-100k"}))
  ds = Dataset(full.name, full.items, full.user_ids[:150], full.sequences[:150])
  return ds, random_index([it.item_id for it in ds.items], levels=4, size=8)


_LOOKUPS: dict[int, dict[str, int]] = {}


def code_items(index: ItemIndex, text: str) -> list[int]:
  """Item numbers of every full item code written in ``text``, in order."""
  if id(index) not in _LOOKUPS:
    _LOOKUPS[id(index)] = {index.item_code_str(i): i for i in range(index.num_items)}
  lookup = _LOOKUPS[id(index)]
  out = []
  for run in CODE_RE.findall(text):
    toks = re.findall(r"<[a-z]_\d+>", run)
    step = index.num_levels
    assert len(toks) % step == 0, run
    out += [lookup["".join(toks[k:k + step])] for k in range(0, len(toks), step)]
  return out


def test_templates_are_many_and_well_formed():
  allowed = {"history", "history_titles", "item", "title", "description", "preference",
             "query"}
  for task in prompts.TASK_NAMES:
    tmpls = prompts.templates(task)
    assert len(tmpls) >= 8, task
    assert len({t.instruction for t in tmpls}) == len(tmpls), f"{task}: duplicate template"
    for t in tmpls:
      assert t.fields <= allowed, (task, t.fields)
      # The answer is never given away in the instruction.
      assert not (t.fields & {"item"} and "{item}" in t.instruction and "{item}" in t.response)
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    prompts.templates("nope")


def test_seqrec_examples_are_every_training_prefix(tiny):
  ds, index = tiny
  split = ds.split()
  h = 3
  ex = builders.build_task("seqrec", ds, index, max_history=h, seed=1)
  expected = [(u, tuple(int(i) for i in tr[max(0, t - h):t]), int(tr[t]))
              for u, tr in enumerate(split.train) for t in range(1, len(tr))]
  got = [(e.meta["user"], e.meta["history"], e.meta["target"]) for e in ex]
  assert got == expected
  for e in ex:
    # Response is exactly the target's code; the instruction lists the history codes in
    # order, oldest first, and names no other item.
    assert e.response == index.item_code_str(e.meta["target"])
    hist_codes = [index.item_code_str(i) for i in e.meta["history"]]
    assert ", ".join(hist_codes) in e.instruction
    assert code_items(index, e.instruction) == list(e.meta["history"])
    assert e.instruction == prompts.SEQREC[e.meta["template_id"]].instruction.format(
        history=", ".join(hist_codes))


@pytest.mark.parametrize("task", prompts.TASK_NAMES)
def test_every_template_renders_with_codes_in_place(tiny, task):
  ds, index = tiny
  n_t = len(prompts.templates(task))
  ex = builders.build_task(task, ds, index, prompt_sample_num=n_t, seed=0)
  assert ex
  assert {e.meta["template_id"] for e in ex} == set(range(n_t))
  titles = {i: preference.clean_title(it.title) for i, it in enumerate(ds.items)}
  for e in ex:
    assert e.task == task
    assert "{" not in e.instruction + e.response, e
    tmpl = prompts.templates(task)[e.meta["template_id"]]
    target = e.meta["target"]
    code = index.item_code_str(target) if target is not None else None
    if tmpl.response == "{item}":
      assert e.response == code
      assert code not in e.instruction  # the answer is not in the question
    elif tmpl.response == "{title}":
      assert e.response == titles[target]
    elif tmpl.response == "{description}":
      assert e.response == builders.item_description(ds.items[target])
    elif tmpl.response == "{title}\n{description}":
      assert e.response == titles[target] + "\n" + builders.item_description(ds.items[target])
    if task == "index2item":
      assert code_items(index, e.instruction) == [target]
    if "history" in tmpl.fields:
      assert code_items(index, e.instruction) == list(e.meta["history"])
    if "history_titles" in tmpl.fields:
      assert ", ".join(f'"{titles[i]}"' for i in e.meta["history"]) in e.instruction
    if task == "preferenceobtain":
      assert e.response == preference.derive_preference(ds, e.meta["history"])
      assert e.meta["source"] == "derived"


def test_title_cleaning_and_description(tiny):
  ds, index = tiny
  ex = builders.build_task("index2item", ds, index, prompt_sample_num=10)
  juliet = [e for e in ex if e.meta["target"] == 9 and
            prompts.INDEX2ITEM[e.meta["template_id"]].response == "{title}"]
  assert juliet and all(e.response == "Juliet" for e in juliet)
  assert builders.item_description(ds.items[9]) == "year: 1990; genres: Romance, Comedy"
  # Item I has no year: its description skips the empty field.
  assert builders.item_description(ds.items[8]) == "genres: Documentary"


def test_derived_preference_hand_computed(tiny):
  ds, _ = tiny
  # Alpha(Drama,1994) Bravo(Drama+Thriller,1995) Charlie(Thriller,1987) Delta(Comedy,1996)
  # Echo(Drama,1999): Drama 3, Thriller 2, Comedy 1 (>= 20% of 5); 1990s 4 of 5 years.
  # Titles: most named genres first (Bravo: 2), then most recent (Echo, Delta).
  text = preference.derive_preference(ds, [0, 1, 2, 3, 4])
  assert text == ('Prefers Drama, Thriller and Comedy films, mostly from the 1990s, '
                  'such as "Bravo", "Echo" and "Delta".')
  # Two decades tie at 1 each of 2 -> the later one first, both named.
  assert preference.derive_preference(ds, [5, 6]) == (
      'Prefers Animation, Children\'s and Western films, mostly from the 2000s and 1970s, '
      'such as "Golf" and "Foxtrot".')
  assert preference.derive_query(ds, 1) == "a Drama and Thriller film from the 1990s"
  assert preference.derive_query(ds, 8) == "a Documentary film"  # no year
  assert preference.preference_source(ds) == "derived"


def test_user_json_preferences_and_guarded_queries(tiny):
  ds0, index = tiny
  split = ds0.split()
  test_target = split.test[1].target
  train0 = [int(i) for i in split.train[0]]
  user_text = {
      # LC-Rec user.json turned user-first (the json loader's layout).
      "u0": {"user_explicit_preference": ["likes tense dramas", "enjoys older films"],
             "user_vague_intention": {"train": {"item": ds0.items[train0[2]].item_id,
                                                "inters": [], "querys": ["q-user", "q-item"]}}},
      # A query written for the user's test item must not be used for training.
      "u1": {"user_explicit_preference": ["likes westerns"],
             "user_vague_intention": {"train": {"item": ds0.items[test_target].item_id,
                                                "querys": ["leaky query"]}}},
  }
  ds = Dataset(ds0.name, ds0.items, ds0.user_ids, ds0.sequences, user_text=user_text)
  assert preference.preference_source(ds) == "user_json"
  search = {e.meta["user"]: e for e in builders.build_task("itemsearch", ds, index, seed=0,
                                                           prompt_sample_num=10)}
  e0 = search[0]
  assert e0.meta["target"] == train0[2] and e0.meta["sources"]["query"] == "user_json"
  assert e0.meta["history"] == tuple(train0[:2])
  e1 = search[1]
  assert e1.meta["sources"]["query"] == "derived"
  assert e1.meta["target"] == int(split.train[1][-1])
  assert e1.meta["sources"]["preference"] == "user_json"
  assert search[2].meta["source"] == "derived"  # no json entry for u2
  for e in builders.build_task("itemsearch", ds, index, seed=0, prompt_sample_num=10):
    assert "leaky query" not in e.instruction
  pref = {e.meta["user"]: e for e in builders.build_task("preferenceobtain", ds, index)}
  assert pref[0].response in user_text["u0"]["user_explicit_preference"]
  assert pref[0].meta["source"] == "user_json"
  assert pref[3].meta["source"] == "derived"
  # LC-Rec's raw file layout (keyed by field first) reads the same.
  raw = {"user_explicit_preference": {"u0": ["likes tense dramas"]},
         "user_vague_intention": {"train": {"u0": {"item": ds0.items[train0[2]].item_id,
                                                   "querys": ["q-user"]}}}}
  ds_raw = Dataset(ds0.name, ds0.items, ds0.user_ids, ds0.sequences, user_text=raw)
  rec = preference.user_json_record(ds_raw, 0)
  assert rec == {"preferences": ["likes tense dramas"],
                 "query_item": ds0.items[train0[2]].item_id, "queries": ["q-user"]}


def test_eval_examples(tiny):
  ds, index = tiny
  split = ds.split()
  for name, rows in (("valid", split.valid), ("test", split.test)):
    ex = builders.seqrec_eval_examples(ds, index, name, template_id=4, max_history=3)
    assert len(ex) == ds.num_users
    for e, row in zip(ex, rows):
      hist = [int(i) for i in row.history[-3:]]
      assert e.meta["target"] == row.target and e.meta["user"] == row.user
      assert e.response == index.item_code_str(row.target)
      assert e.instruction == prompts.SEQREC[4].instruction.format(
          history=", ".join(index.item_code_str(i) for i in hist))
  test_hist = builders.seqrec_eval_examples(ds, index, "test")[0].meta["history"]
  assert test_hist[-1] == split.valid[0].target  # test history ends with the valid target
  with pytest.raises(ValueError, match="template_id 10"):
    builders.seqrec_eval_examples(ds, index, "test", template_id=10)
  with pytest.raises(ValueError, match="split"):
    builders.seqrec_eval_examples(ds, index, "train")


def test_sampling_is_deterministic_and_counts_hold(tiny):
  ds, index = tiny
  kw = dict(sample_nums=[5, 0, 3, 0, 0, 2], prompt_sample_nums=[1, 2, 1, 1, 1, 1])
  a = builders.build_train_examples(ds, index, seed=7, **kw)
  b = builders.build_train_examples(ds, index, seed=7, **kw)
  c = builders.build_train_examples(ds, index, seed=8, **kw)
  assert a == b
  assert a != c
  count = collections.Counter(e.task for e in a)
  n_prefix = sum(len(t) - 1 for t in ds.split().train)
  assert count == {"seqrec": 5, "item2index": 2 * ds.num_items, "index2item": 3,
                   "fusionseqrec": n_prefix, "itemsearch": ds.num_users,
                   "preferenceobtain": 2}
  # A sample is a subset of the full records, without repeats.
  full = {(e.meta["user"], e.meta["history"], e.meta["target"])
          for e in builders.build_task("seqrec", ds, index)}
  sampled = [(e.meta["user"], e.meta["history"], e.meta["target"])
             for e in a if e.task == "seqrec"]
  assert set(sampled) <= full and len(set(sampled)) == 5
  # Two templates per record for item2index, always distinct.
  per_item = collections.defaultdict(set)
  for e in a:
    if e.task == "item2index":
      per_item[e.meta["target"]].add(e.meta["template_id"])
  assert all(len(v) == 2 for v in per_item.values())
  # Templates are drawn, not fixed: with many records several templates occur.
  assert len({e.meta["template_id"] for e in a if e.task == "fusionseqrec"}) > 3
  with pytest.raises(ValueError, match="equal length"):
    builders.build_train_examples(ds, index, tasks=["seqrec"], sample_nums=[1, 2])


def test_no_valid_or_test_leakage_real_movielens(ml100k_subset):
  ds, index = ml100k_subset
  split = ds.split()
  titles = [preference.clean_title(it.title) for it in ds.items]
  examples = builders.build_train_examples(ds, index, tasks=PER_USER, seed=0,
                                           prompt_sample_nums=[1, 1, 3, 3])
  assert collections.Counter(e.task for e in examples)["itemsearch"] == 3 * ds.num_users
  checked = collections.Counter()
  for e in examples:
    u = e.meta["user"]
    train = {int(i) for i in split.train[u]}
    train_titles = {titles[i] for i in train}
    text = e.instruction + "\n" + e.response
    # Every item code in the text is one of the user's training items.
    assert set(code_items(index, text)) <= train, (e.task, u)
    assert set(e.meta["items"]) <= train and (e.meta["target"] is None
                                              or e.meta["target"] in train)
    # Neither held-out target appears, by code or by quoted title (unless a training item
    # shares that title).
    for held in (split.valid[u].target, split.test[u].target):
      if held in train:  # cannot happen in ML-100K (no repeats); guards the check itself
        continue
      assert index.item_code_str(held) not in text
      if titles[held] not in train_titles:
        assert f'"{titles[held]}"' not in text
        assert e.response != titles[held]
      checked[e.task] += 1
  assert set(checked) == set(PER_USER)
  # The per-user preference text counts only training items: recompute it by brute force.
  for e in examples:
    if e.task == "preferenceobtain":
      assert e.response == preference.derive_preference(ds, e.meta["history"])
      assert e.meta["history"] == tuple(int(i) for i in split.train[e.meta["user"]][-20:])


def test_index_size_mismatch_is_an_error(tiny):
  ds, index = tiny
  short = ItemIndex(index.item_ids[:-1], index.codes[:-1], index.level_sizes)
  with pytest.raises(ValueError, match="item index has 11 items"):
    builders.build_task("seqrec", ds, short)
