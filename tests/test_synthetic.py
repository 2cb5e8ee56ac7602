"""The synthetic LC-Rec json generator: sizes as asked, loads with the lcrec loader, and
its sequences carry structure a simple model learns (beats popularity by a wide margin)."""

import collections
import json

import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.data import synthetic
from lcrec_jax.data.loaders import load_dataset
from lcrec_jax.errors import ConfigError
from tests import entry

SPEC = synthetic.SyntheticSpec(users=1500, items=600, interactions=12500, text_chars=500,
                               num_groups=30, seed=3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synth"))
  synthetic.write(SPEC, out, "Synth")
  return out, load_dataset(spec.section_settings("data", {"format": "lcrec", "path": out, "name": "Synth"}))


def test_sizes_and_lengths_as_asked(synth):
  _, ds = synth
  assert (ds.num_users, ds.num_items, ds.num_interactions) == (1500, 600, 12500)
  assert ds.stats.get("users_too_short", 0) == 0
  assert ds.stats["repeat_interactions"] == 0
  lengths = np.asarray([len(s) for s in ds.sequences])
  assert lengths.min() >= 5  # LC-Rec's 5-core data
  assert 5 <= np.median(lengths) <= 7  # Amazon's median is 6 at a mean of 8.3
  for s in ds.sequences:
    assert len(set(s.tolist())) == len(s)
  chars = np.asarray([len(it.title) + len(it.fields["description"]) for it in ds.items])
  assert abs(chars.mean() - 500) < 50
  assert chars.max() > 2 * 500  # a long tail, as real descriptions have
  assert all(it.fields["brand"] and it.fields["categories"].count(", ") == 1
             for it in ds.items)


def test_same_seed_same_files(tmp_path):
  spec = synthetic.SyntheticSpec(users=50, items=40, interactions=400, seed=7)
  a = synthetic.write(spec, str(tmp_path / "a"), "S")
  b = synthetic.write(spec, str(tmp_path / "b"), "S")
  for k in ("inter", "item"):
    assert open(a[k], "rb").read() == open(b[k], "rb").read()
  c = synthetic.write(synthetic.SyntheticSpec(50, 40, 400, seed=8), str(tmp_path / "c"), "S")
  assert open(a["inter"], "rb").read() != open(c["inter"], "rb").read()


def _hr10(rank_lists, targets):
  return float(np.mean([t in r[:10] for r, t in zip(rank_lists, targets)]))


def test_structure_is_learnable(synth):
  """Next item from the last item's group (read off its text) vs popularity, test split."""
  _, ds = synth
  split = ds.split()
  group = [it.fields["categories"].split(", ")[1] for it in ds.items]
  pop = collections.Counter(int(i) for s in split.train for i in s)
  popular = [i for i, _ in pop.most_common()]
  trans = collections.defaultdict(collections.Counter)  # group -> next group counts
  in_group = collections.defaultdict(list)              # group -> items by popularity
  for i in popular:
    in_group[group[i]].append(i)
  for s in split.train:
    for a, b in zip(s[:-1], s[1:]):
      trans[group[int(a)]][group[int(b)]] += 1
  ranked_pop, ranked_tr, targets = [], [], []
  for ex in split.test:
    seen = set(ex.history.tolist())
    ranked_pop.append([i for i in popular if i not in seen][:10])
    out = []
    for g, _ in trans[group[int(ex.history[-1])]].most_common():
      out += [i for i in in_group[g] if i not in seen][:10 - len(out)]
      if len(out) >= 10:
        break
    ranked_tr.append(out)
    targets.append(ex.target)
  hr_pop, hr_tr = _hr10(ranked_pop, targets), _hr10(ranked_tr, targets)
  assert hr_tr > 3 * hr_pop and hr_tr > 0.1, (hr_tr, hr_pop)
  # and the text reflects the group: a group's descriptions share most of their words
  words = collections.defaultdict(collections.Counter)
  for it, g in zip(ds.items, group):
    words[g].update(it.fields["description"].lower().replace(".", "").split())
  g0, g1 = sorted(words)[:2]
  top0 = {w for w, _ in words[g0].most_common(20)}
  top1 = {w for w, _ in words[g1].most_common(20)}
  assert len(top0 & top1) < 5


def test_impossible_sizes_name_the_flag():
  with pytest.raises(ConfigError, match="--interactions"):
    synthetic.generate(synthetic.SyntheticSpec(users=10, items=50, interactions=20))
  with pytest.raises(ConfigError, match="--interactions"):
    synthetic.generate(synthetic.SyntheticSpec(users=2, items=4, interactions=9))


def test_cli_writes_loadable_files(tmp_path):
  r = entry.run("synthetic", f"--out={tmp_path}", "--name=Tiny", "--users=30", "--items=25",
                "--interactions=200", "--text_chars=100", "--seed=1")
  assert r.returncode == 0, r.stderr
  ds = load_dataset(spec.section_settings("data", {"format": "lcrec", "path": str(tmp_path), "name": "Tiny"}))
  assert (ds.num_users, ds.num_items, ds.num_interactions) == (30, 25, 200)
  assert json.load(open(tmp_path / "Tiny.inter.json"))["0"] == [
      int(ds.items[i].item_id) for i in ds.sequences[0]]


def test_cli_bad_size_is_one_line_and_exit_2(tmp_path):
  r = entry.run("synthetic", f"--out={tmp_path}", "--users=10", "--items=50",
                "--interactions=20")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: --interactions=20: every user needs >= 3 interactions, so >= 30 for 10 users"]
