"""Dataset loaders: MovieLens-100K (recbole wheel), RecBole atomic files, LC-Rec json.

Real data is checked against an independent brute-force reading of the raw file;
every bad-input case either raises an error naming file and line or is a counted skip.
"""

import collections
import json
import os

import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.data.dataset import Dataset, Item
from lcrec_jax.data.errors import DataError, MissingFileError
from lcrec_jax.data.lcrec_json import load_lcrec_json
from lcrec_jax.index.provided import load_lcrec_index
from lcrec_jax.data.loaders import load_dataset
from lcrec_jax.data.movielens import load_movielens_100k, ml100k_dir
from lcrec_jax.data.recbole_atomic import load_recbole_atomic

# --------------------------------------------------------------------------------------
# MovieLens-100K


@pytest.fixture(scope="module")
def ml100k() -> Dataset:
  return load_movielens_100k()


def _raw_ml100k():
  """Independent reading of ml-100k.inter: per user [(timestamp, line, item_id)]."""
  path = os.path.join(ml100k_dir(), "ml-100k.inter")
  events = collections.defaultdict(list)
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if line_no == 1 or not line.strip():
        continue
      u, i, _, t = line.rstrip("\n").split("\t")
      events[u].append((int(t), line_no, i))
  return events


def test_ml100k_sizes(ml100k):
  assert ml100k.num_items == 1682
  assert ml100k.num_users == 943
  assert ml100k.num_interactions == 100_000
  assert ml100k.name == "ml-100k"
  assert ml100k.stats["users_too_short"] == 0
  assert ml100k.stats["interactions_unknown_item"] == 0
  assert ml100k.stats["items_without_interactions"] == 0
  assert ml100k.stats["repeat_interactions"] == 0
  # Item order = ml-100k.item row order (ids 1..1682), users in numeric order.
  assert [it.item_id for it in ml100k.items] == [str(i) for i in range(1, 1683)]
  assert list(ml100k.user_ids) == [str(u) for u in range(1, 944)]


def test_ml100k_tie_counts(ml100k):
  # 50,561 placements decided by the tie-break = 100,000 - distinct (user, timestamp).
  assert ml100k.stats["ties_broken"] == 50_561
  assert ml100k.stats["interactions_in_tied_groups"] == 75_772
  raw = _raw_ml100k()
  per = collections.Counter((u, t) for u, ev in raw.items() for t, _, _ in ev)
  assert 100_000 - len(per) == 50_561
  # The tie-break decides the test (last) item of 415 users.
  assert sum(sorted(ev)[-1][0] == sorted(ev)[-2][0] for ev in raw.values()) == 415


def test_ml100k_order_is_timestamp_then_line(ml100k):
  raw = _raw_ml100k()
  number = ml100k.item_number()
  for uid, seq in zip(ml100k.user_ids, ml100k.sequences):
    expected = [number[i] for _, _, i in sorted(raw[uid])]
    np.testing.assert_array_equal(seq, expected)
  # And the line tie-break really matters: ordering ties by item id instead differs.
  by_item = sum(
      [number[i] for _, _, i in sorted(raw[u], key=lambda e: (e[0], int(e[2])))]
      != list(seq) for u, seq in zip(ml100k.user_ids, ml100k.sequences))
  assert by_item > 100


def test_ml100k_item_text(ml100k):
  toy = ml100k.items[0]
  assert toy == Item("1", "Toy Story", {"year": "1995", "genres": "Animation, Children's, Comedy"})
  assert toy.text() == "Toy Story. year: 1995. genres: Animation, Children's, Comedy"
  # Item 1412: RecBole left "(1995)" in the title and "V" as release year.
  lbt = ml100k.items[1411]
  assert lbt.title == "Land Before Time III: The Time of the Great Giving"
  assert lbt.fields["year"] == "1995"
  assert ml100k.stats["items_year_from_title"] == 1
  # Item 267: year "unkonwn" and genre "unknown" -> empty, left out of the text.
  assert ml100k.items[266].fields == {"year": "", "genres": ""}
  assert ml100k.items[266].text() == "unkonwn"
  assert ml100k.stats["items_year_unknown"] == 1
  # No title repeats its year; every other year is a 4-digit year.
  for it in ml100k.items:
    assert not it.title.endswith(f"({it.fields['year']})") or not it.fields["year"]
    assert it.fields["year"] == "" or (len(it.fields["year"]) == 4 and it.fields["year"].isdigit())
    assert "unknown" not in it.fields["genres"]
  assert ml100k.items[542].title == "Misérables, Les"  # UTF-8 kept


def test_ml100k_split_is_leave_one_out(ml100k):
  split = ml100k.split()
  for u in (0, 100, 942):
    seq = ml100k.sequences[u]
    assert split.test[u].target == seq[-1] and split.valid[u].target == seq[-2]
    np.testing.assert_array_equal(split.train[u], seq[:-2])


# --------------------------------------------------------------------------------------
# RecBole atomic files


def _write(path, text, encoding="utf-8"):
  with open(path, "w", encoding=encoding, newline="") as f:
    f.write(text)


ITEM_HEADER = "item_id:token\ttitle:token_seq\tcategories:token_seq\tprice:float\n"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def _atomic(tmp_path, inter_rows, item_rows, name="toy", inter_header=INTER_HEADER,
            item_header=ITEM_HEADER):
  _write(tmp_path / f"{name}.inter", inter_header + "".join(r + "\n" for r in inter_rows))
  _write(tmp_path / f"{name}.item", item_header + "".join(r + "\n" for r in item_rows))
  return str(tmp_path)


ITEMS = ["i1\tRed Guitar\tMusic Strings\t9.5", "i2\tBlue Drum\tMusic Drums\t20",
         "i3\tGreen Flute\tMusic Wind\t3", "i4\tNever Bought\tMisc\t1"]


def test_recbole_generic(tmp_path):
  inters = [
      "10\ti2\t5\t200",
      "10\ti1\t4\t100",
      "2\ti3\t3\t50",
      "10\ti3\t1\t200",   # ties with line 2 (i2 at 200): line order keeps i2 first
      "2\ti1\t2\t60",
      "2\ti3\t5\t70",     # repeat of (2, i3)
  ]
  d = load_recbole_atomic(_atomic(tmp_path, inters, ITEMS), "toy")
  assert [it.item_id for it in d.items] == ["i1", "i2", "i3", "i4"]
  assert d.items[0] == Item("i1", "Red Guitar", {"categories": "Music Strings", "price": "9.5"})
  assert d.user_ids == ("2", "10")  # numeric order, not "10" < "2"
  np.testing.assert_array_equal(d.sequences[0], [2, 0, 2])
  np.testing.assert_array_equal(d.sequences[1], [0, 1, 2])
  assert d.stats["repeat_interactions"] == 1
  assert d.stats["ties_broken"] == 1
  assert d.stats["interactions_in_tied_groups"] == 2
  assert d.stats["items_without_interactions"] == 1  # i4 kept in the catalogue


def test_recbole_tie_break_follows_line_order(tmp_path):
  # Same timestamp for all; the file order (not the item id) decides.
  inters = ["1\ti3\t1\t7", "1\ti1\t1\t7", "1\ti2\t1\t7"]
  d = load_recbole_atomic(_atomic(tmp_path, inters, ITEMS), "toy")
  np.testing.assert_array_equal(d.sequences[0], [2, 0, 1])


def test_recbole_without_timestamp_uses_line_order(tmp_path):
  inters = ["1\ti3", "1\ti1", "1\ti2"]
  d = load_recbole_atomic(_atomic(tmp_path, inters, ITEMS,
                                  inter_header="user_id:token\titem_id:token\n"), "toy")
  np.testing.assert_array_equal(d.sequences[0], [2, 0, 1])
  assert d.stats["no_timestamp_column"] == 1


def test_recbole_missing_file(tmp_path):
  _atomic(tmp_path, ["1\ti1\t1\t1"], ITEMS)
  os.remove(tmp_path / "toy.inter")
  with pytest.raises(MissingFileError, match=r"toy\.inter: interaction file .* not found"):
    load_recbole_atomic(str(tmp_path), "toy")
  with pytest.raises(FileNotFoundError, match=r"nope\.item"):
    load_recbole_atomic(str(tmp_path), "nope")


@pytest.mark.parametrize("row,line,message", [
    ("1\ti1\t4", 3, r"3 tab-separated columns, header has 4"),
    ("1\ti1\t4\t12\textra", 3, r"5 tab-separated columns"),
    ("1\ti1\t4\tyesterday", 3, r"timestamp 'yesterday' is not a number"),
    ("1\ti1\t4\tnan", 3, r"timestamp 'nan' is not finite"),
    ("\ti1\t4\t12", 3, r"empty user_id"),
])
def test_recbole_malformed_row(tmp_path, row, line, message):
  path = _atomic(tmp_path, ["1\ti2\t4\t10", row, "1\ti3\t4\t14"], ITEMS)
  with pytest.raises(DataError, match=rf"toy\.inter:{line}: {message}") as e:
    load_recbole_atomic(path, "toy")
  assert e.value.line == line and e.value.path.endswith("toy.inter")


def test_recbole_bad_header_and_duplicate_item(tmp_path):
  path = _atomic(tmp_path, ["1\ti1\t1\t1"], ITEMS,
                 inter_header="user_id\titem_id:token\trating:float\ttimestamp:float\n")
  with pytest.raises(DataError, match=r"toy\.inter:1: header field 'user_id'"):
    load_recbole_atomic(path, "toy")
  path = _atomic(tmp_path, ["1\ti1\t1\t1"], ITEMS + ["i2\tAgain\tX\t1"])
  with pytest.raises(DataError, match=r"toy\.item:6: item id 'i2' repeats line 3"):
    load_recbole_atomic(path, "toy")
  path = _atomic(tmp_path, ["1\ti1\t1\t1"], ["i1\t9.5"],
                 item_header="item_id:token\tprice:float\n")
  with pytest.raises(DataError, match=r"toy\.item:1: no title field"):
    load_recbole_atomic(path, "toy")


def test_recbole_unknown_item_and_short_user_are_counted_skips(tmp_path):
  inters = ["1\ti1\t1\t1", "1\tGHOST\t1\t2", "1\ti2\t1\t3", "1\ti3\t1\t4",
            "2\ti1\t1\t1", "2\ti2\t1\t2",                     # only 2 -> dropped
            "3\ti1\t1\t1", "3\tGHOST\t1\t2", "3\ti2\t1\t3"]   # 3 rows, 2 known -> dropped
  d = load_recbole_atomic(_atomic(tmp_path, inters, ITEMS), "toy")
  assert d.user_ids == ("1",)
  np.testing.assert_array_equal(d.sequences[0], [0, 1, 2])
  assert d.stats["interactions_unknown_item"] == 2
  assert d.stats["users_too_short"] == 2
  assert d.stats["interactions_of_short_users"] == 4
  assert d.stats["interactions_read"] == 9
  assert d.num_interactions + 2 + 4 == 9  # nothing unaccounted for


def test_recbole_empty_title(tmp_path):
  items = ITEMS[:1] + ["i2\t \tMusic\t2"] + ITEMS[2:]
  inters = ["1\ti1\t1\t1", "1\ti2\t1\t2", "1\ti3\t1\t3", "1\ti4\t1\t4"]
  path = _atomic(tmp_path, inters, items)
  with pytest.raises(DataError, match=r"toy\.item:3: item 'i2' has an empty title"):
    load_recbole_atomic(path, "toy")
  d = load_recbole_atomic(path, "toy", on_empty_title="skip")
  assert [it.item_id for it in d.items] == ["i1", "i3", "i4"]
  np.testing.assert_array_equal(d.sequences[0], [0, 1, 2])
  assert d.stats["items_empty_title"] == 1
  assert d.stats["interactions_of_skipped_items"] == 1


def test_recbole_bad_encoding(tmp_path):
  path = _atomic(tmp_path, ["1\ti1\t1\t1"], ITEMS)
  with open(tmp_path / "toy.item", "ab") as f:
    f.write(b"i9\tCaf\xe9 latin-1\tX\t1\n")  # line 6, latin-1 byte
  with pytest.raises(DataError, match=r"toy\.item:6: not valid UTF-8 .* column 7"):
    load_recbole_atomic(path, "toy")


def test_recbole_crlf_and_bom(tmp_path):
  _write(tmp_path / "w.inter", "\ufeff" + INTER_HEADER.replace("\n", "\r\n")
         + "1\ti1\t1\t3\r\n1\ti2\t1\t2\r\n1\ti3\t1\t1\r\n")
  _write(tmp_path / "w.item", ITEM_HEADER + "".join(r + "\n" for r in ITEMS))
  d = load_recbole_atomic(str(tmp_path), "w")
  np.testing.assert_array_equal(d.sequences[0], [2, 1, 0])


# --------------------------------------------------------------------------------------
# LC-Rec json


LC_ITEMS = {
    "0": {"title": "Guitar Strings ", "description": "Bright tone.", "brand": "Acme",
          "categories": "Instruments,Strings"},
    "1": {"title": "Drum Sticks", "description": ["Maple", "pair"], "brand": None,
          "categories": "Drums"},
    "2": {"title": "Capo", "description": "", "brand": "Acme", "categories": "Accessories"},
    "3": {"title": "Tuner", "description": "Clip-on.", "brand": "Tune", "price": 12.5},
}
LC_INTERS = {"0": [0, 1, 2], "1": [3, 2, 1, 0], "2": [1, 3, 0]}
LC_USERS = {
    "user_explicit_preference": {"0": ["likes strings", "long", "short"],
                                 "1": ["drums", "l", "s"], "77": ["ghost"]},
    "user_vague_intention": {
        "train": {"0": {"item": 1, "inters": [0], "querys": ["q-user", "q-item"]}},
        "test": {"1": {"item": 0, "inters": [3, 2, 1], "querys": ["a", "b"]}}},
}
LC_INDEX = {"0": ["<a_1>", "<b_0>"], "1": ["<a_0>", "<b_2>"], "2": ["<a_1>", "<b_1>"],
            "3": ["<a_0>", "<b_0>"]}


def _lcrec(dirpath, name="Toy", items=LC_ITEMS, inters=LC_INTERS, users=LC_USERS,
           index=LC_INDEX):
  os.makedirs(dirpath, exist_ok=True)
  for suffix, obj in (("item", items), ("inter", inters), ("user", users),
                      ("index", index)):
    if obj is not None:
      _write(os.path.join(dirpath, f"{name}.{suffix}.json"), json.dumps(obj, indent=4))
  return str(dirpath)


def test_lcrec_json(tmp_path):
  d = load_lcrec_json(_lcrec(tmp_path), "Toy")
  assert d.name == "Toy"
  assert [it.item_id for it in d.items] == ["0", "1", "2", "3"]
  assert d.items[0] == Item("0", "Guitar Strings", {
      "description": "Bright tone.", "brand": "Acme", "categories": "Instruments,Strings"})
  assert d.items[1].fields == {"description": "Maple, pair", "brand": "", "categories": "Drums"}
  assert d.items[3].fields["price"] == "12.5"
  assert d.user_ids == ("0", "1", "2")
  for seq, ref in zip(d.sequences, LC_INTERS.values()):
    np.testing.assert_array_equal(seq, ref)  # ids equal numbers here
  # user.json transposed user-first, values as found; user 77 is not in the dataset.
  assert d.user_text["0"] == {
      "user_explicit_preference": ["likes strings", "long", "short"],
      "user_vague_intention": {"train": {"item": 1, "inters": [0],
                                         "querys": ["q-user", "q-item"]}}}
  assert d.user_text["1"]["user_vague_intention"]["test"]["querys"] == ["a", "b"]
  assert "2" not in d.user_text and "77" not in d.user_text
  assert d.stats["user_text_unknown_users"] == 1
  assert d.stats["user_text_users"] == 2


def test_lcrec_json_layout_and_optional_files(tmp_path):
  # LC-Rec's layout: <data_path>/<dataset>/<dataset>.*.json; user/index files optional.
  _lcrec(tmp_path / "Toy", users=None, index=None)
  d = load_lcrec_json(str(tmp_path), "Toy")
  assert d.num_users == 3 and dict(d.user_text) == {}


def test_lcrec_index(tmp_path):
  path = _lcrec(tmp_path)
  d = load_lcrec_json(path, "Toy")
  index = load_lcrec_index(os.path.join(path, "Toy.index.json"), d)
  assert index.item_ids == ("0", "1", "2", "3")
  np.testing.assert_array_equal(index.codes, [[1, 0], [0, 2], [1, 1], [0, 0]])
  assert index.level_sizes == (2, 3) and index.is_conflict_free()
  assert index.to_json_dict() == LC_INDEX
  bad = dict(LC_INDEX)
  del bad["2"]
  _lcrec(tmp_path, index=bad)
  with pytest.raises(DataError, match=r"Toy\.index\.json: 1 of the 4 items of dataset 'Toy' "
                     r"have no code, e.g. item '2'"):
    load_lcrec_index(os.path.join(path, "Toy.index.json"), d)
  _lcrec(tmp_path, index={**LC_INDEX, "1": ["<a_0>", "<x_2>"]})
  with pytest.raises(DataError, match=r"Toy\.index\.json: item '1': token '<x_2>' at position 1"):
    load_lcrec_index(os.path.join(path, "Toy.index.json"), d)


def test_lcrec_missing_and_malformed(tmp_path):
  with pytest.raises(MissingFileError, match=r"Toy\.item\.json: LC-Rec item file"):
    load_lcrec_json(str(tmp_path), "Toy")
  path = _lcrec(tmp_path)
  with open(os.path.join(path, "Toy.inter.json"), "w") as f:
    f.write('{\n  "0": [0, 1, 2],\n  "1": [3, 2,, 1]\n}\n')
  with pytest.raises(DataError, match=r"Toy\.inter\.json:3: not valid json"):
    load_lcrec_json(path, "Toy")
  _lcrec(tmp_path, inters={"0": [0, 1, 2], "1": "3 2 1"})
  with pytest.raises(DataError, match=r"Toy\.inter\.json:7: key '1': user value must be a list"):
    load_lcrec_json(path, "Toy")
  _lcrec(tmp_path, inters={"0": [0, 1, 2], "1": [3, 2.5, 1]})
  with pytest.raises(DataError, match=r"key '1': position 1: item id 2.5 is not an int"):
    load_lcrec_json(path, "Toy")
  _lcrec(tmp_path, items={**LC_ITEMS, "2": {"name": "Capo"}})
  with pytest.raises(DataError, match=r"Toy\.item\.json:\d+: key '2': item has no 'title'"):
    load_lcrec_json(path, "Toy")
  _lcrec(tmp_path, items=["not", "an", "object"])
  with pytest.raises(DataError, match=r"Toy\.item\.json:1: top level must be a json object"):
    load_lcrec_json(path, "Toy")


def test_lcrec_bad_encoding(tmp_path):
  path = _lcrec(tmp_path)
  raw = json.dumps(LC_ITEMS, indent=4).encode().replace(b"Bright", b"Br\xffght")
  with open(os.path.join(path, "Toy.item.json"), "wb") as f:
    f.write(raw)
  line = raw[:raw.index(b"\xff")].count(b"\n") + 1
  with pytest.raises(DataError, match=rf"Toy\.item\.json:{line}: not valid UTF-8"):
    load_lcrec_json(path, "Toy")


def test_lcrec_skips_and_empty_title(tmp_path):
  inters = {"0": [0, 9, 1, 2], "1": [3, 2], "2": [1, 3, 0]}
  path = _lcrec(tmp_path, inters=inters)
  d = load_lcrec_json(path, "Toy")
  assert d.user_ids == ("0", "2")
  np.testing.assert_array_equal(d.sequences[0], [0, 1, 2])
  assert d.stats["interactions_unknown_item"] == 1
  assert d.stats["users_too_short"] == 1 and d.stats["interactions_of_short_users"] == 2
  assert "1" not in d.user_text  # dropped with its user
  items = {**LC_ITEMS, "2": {**LC_ITEMS["2"], "title": "  "}}
  _lcrec(tmp_path, items=items, inters=LC_INTERS)
  with pytest.raises(DataError, match=r"Toy\.item\.json:\d+: key '2': empty title"):
    load_lcrec_json(path, "Toy")
  d = load_lcrec_json(path, "Toy", on_empty_title="skip")
  assert [it.item_id for it in d.items] == ["0", "1", "3"]
  assert d.stats["items_empty_title"] == 1
  assert d.stats["interactions_of_skipped_items"] == 2
  # User "0" ([0, 1, 2] minus item 2) became too short; items "3","1","0" renumbered.
  assert d.user_ids == ("1", "2") and d.stats["users_too_short"] == 1
  np.testing.assert_array_equal(d.sequences[0], [2, 1, 0])
  np.testing.assert_array_equal(d.sequences[1], [1, 2, 0])


# --------------------------------------------------------------------------------------
# load_dataset dispatch


def test_load_dataset_dispatch(tmp_path, ml100k):
  d = load_dataset(spec.section_settings("data", {"format": "movielens", "path": "", "name": "ml-100k"}))
  assert d.summary() == ml100k.summary()
  os.makedirs(tmp_path / "rb")
  path = _atomic(tmp_path / "rb", ["1\ti1\t1\t1", "1\ti2\t1\t2", "1\ti3\t1\t3"], ITEMS)
  d = load_dataset(spec.section_settings("data", {"format": "recbole", "path": path, "name": "toy"}))
  assert d.num_items == 4 and d.num_users == 1
  path = _lcrec(tmp_path / "lc")
  d = load_dataset(spec.section_settings("data", {"format": "lcrec", "path": path, "name": "Toy"}))
  assert d.num_users == 3
  with pytest.raises(ValueError, match=r"data.format='csv'"):
    load_dataset(spec.section_settings("data", {"format": "csv", "path": path, "name": "Toy"}))
  with pytest.raises(ValueError, match=r"data.path is empty"):
    load_dataset(spec.section_settings("data", {"format": "lcrec", "path": "", "name": "Toy"}))
  with pytest.raises(ValueError, match=r"on_empty_title"):
    load_dataset(spec.section_settings("data", {"format": "lcrec", "path": path, "name": "Toy", "on_empty_title": "drop"}))


def test_load_dataset_from_config():
  from configs.ml100k_quick import get_config
  d = load_dataset(get_config().data)
  assert (d.num_items, d.num_users) == (1682, 943)


# --- failure safety (issue #12) ------------------------------------------------------------


def test_header_only_or_all_short_interactions_is_a_data_error_at_load(tmp_path):
  """An interaction file with no usable user fails at load, naming the file, instead of
  training dying later on 'no examples to batch'."""
  with pytest.raises(DataError, match=r"toy\.inter: no usable user: 0 users and 0 "
                                      r"interactions read"):
    load_recbole_atomic(_atomic(tmp_path, [], ITEMS), "toy")
  with pytest.raises(DataError, match=r"toy\.inter: no usable user: 2 users and 4 "):
    load_recbole_atomic(_atomic(tmp_path, ["1\ti1\t1\t1", "1\ti2\t1\t2",
                                           "2\ti1\t1\t1", "2\ti3\t1\t2"], ITEMS), "toy")
  path = _lcrec(tmp_path / "lc", inters={})
  with pytest.raises(DataError, match=r"Toy\.inter\.json: no usable user"):
    load_lcrec_json(path, "Toy")


def test_missing_title_column_advice_names_a_real_config_field(tmp_path):
  """The advice names `--config.data.title_field`, and that field exists and works."""
  from configs.ml100k_quick import get_config
  path = _atomic(tmp_path, ["1\ti1\t1\t1", "1\ti2\t1\t2", "1\ti3\t1\t3"],
                 ["i1\tRed\t9.5", "i2\tBlue\t20", "i3\tGreen\t3"],
                 item_header="item_id:token\tlabel:token\tprice:float\n")
  cfg = get_config().data
  cfg.format, cfg.path, cfg.name = "recbole", path, "toy"
  with pytest.raises(DataError, match=r"--config\.data\.title_field=<column>") as e:
    load_dataset(cfg)
  field = str(e.value).split("--config.")[1].split("=")[0]  # "data.title_field"
  assert field == "data.title_field" and "title_field" in cfg
  cfg.title_field = "label"
  d = load_dataset(cfg)
  assert [it.title for it in d.items] == ["Red", "Blue", "Green"]


def test_lcrec_bare_nan_in_item_text_is_refused(tmp_path):
  """Python's json reads a bare NaN as a float, which became the item text "nan"."""
  path = _lcrec(tmp_path)
  with open(os.path.join(path, "Toy.item.json"), "w") as f:
    f.write('{\n  "0": {"title": "Strings", "description": "NaN \\" NaN"},\n'
            '  "1": {"title": "Sticks", "brand": NaN},\n'
            '  "2": {"title": "Capo"},\n  "3": {"title": "Tuner"}\n}\n')
  with pytest.raises(DataError, match=r"Toy\.item\.json:3: not valid json: bare NaN"):
    load_lcrec_json(path, "Toy")
  with open(os.path.join(path, "Toy.item.json"), "w") as f:
    f.write('{"0": {"title": "Strings", "price": -Infinity}}')
  with pytest.raises(DataError, match=r"Toy\.item\.json:1: not valid json: bare -Infinity"):
    load_lcrec_json(path, "Toy")
