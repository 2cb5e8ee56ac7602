"""The like-for-like quality table: mean/sd against numpy on fabricated results files, each
run under its own protocol, and one-line refusals when workdirs are not comparable."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lcrec_jax.errors import WorkdirError
from lcrec_jax.pipeline import quality_table as qt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")


def _metrics(rng):
  return {k: float(rng.uniform(0.01, 0.3)) for k in KEYS}


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _baselines(workdir, seed, rng, users=943, items=1682, name="ml-100k"):
  data = {"name": name, "items": items, "valid_users": users, "test_users": users}
  out = {m: {"unmasked": {"valid": _metrics(rng), "test": _metrics(rng), "best_epoch": 3},
             "masked": {"valid": _metrics(rng), "test": _metrics(rng), "best_epoch": 4},
             "seed": seed, "data": data} for m in ("popularity", "sasrec", "gru4rec")}
  _write(os.path.join(workdir, "baselines", "results.json"), out)
  return out


def _eval(workdir, seed, rng, protocol="all_items", users=943, beams=20, in_results=True):
  res = {"settings": {"num_items": 1682, "num_beams_used": beams, "template_ids": [0, 1],
                      "primary_mode": "trie", "max_history": 20, "max_users": 0,
                      "protocol": protocol},
         "test": {"num_users": users, "protocol": protocol, "mean": _metrics(rng),
                  "min": _metrics(rng), "max": _metrics(rng)}}
  if in_results:
    res["seed"] = {"seed": seed, "train_seed": 0}
  _write(os.path.join(workdir, "eval", "results.json"), res)
  _write(os.path.join(workdir, "config.json"), {"seed": seed, "train": {"seed": 0},
                                                "data": {"name": "ml-100k"}})
  return res


def test_mean_and_sd_match_numpy_per_model_and_protocol(tmp_path):
  rng = np.random.default_rng(0)
  dirs = [str(tmp_path / f"s{s}") for s in range(3)]
  base = [_baselines(d, s, rng) for s, d in enumerate(dirs)]
  evals = [_eval(d, s, rng, in_results=s != 2) for s, d in enumerate(dirs[:2])]
  evals.append(_eval(dirs[2], 2, rng, in_results=False))  # seed from config.json
  runs = qt.collect(dirs)
  table = qt.aggregate(runs)
  for proto, key in (("all_items", "unmasked"), ("seen_excluded", "masked")):
    for model, name in qt.BASELINES.items():
      row = table[proto][name]
      assert row["seeds"] == [0, 1, 2]
      for k in qt.METRICS:
        v = np.array([b[model][key]["test"][k] for b in base])
        np.testing.assert_allclose(row[k], (v.mean(), v.std(ddof=1)), rtol=1e-12)
  lc = table["all_items"][qt.LCREC]
  assert lc["seeds"] == ["0/0", "1/0", "2/0"] and qt.LCREC not in table["seen_excluded"]
  v = np.array([e["test"]["mean"]["NDCG@10"] for e in evals])
  np.testing.assert_allclose(lc["NDCG@10"], (v.mean(), v.std(ddof=1)), rtol=1e-12)
  text = qt.markdown(runs)
  assert "**all items ranked**: ml-100k test split, 943 users" in text
  assert "**seen items excluded**" in text
  assert text.count("| lcrec-jax | 3 (0/0, 1/0, 2/0) |") == 1
  assert text.count("| GRU4Rec | 3 (0, 1, 2) |") == 2
  m, sd = table["seen_excluded"]["GRU4Rec"]["HR@10"]
  assert f"{m:.4f} ± {sd:.4f}" in text


def test_one_seed_has_no_sd_and_eval_under_seen_excluded(tmp_path):
  rng = np.random.default_rng(1)
  d = str(tmp_path / "a")
  _baselines(d, 7, rng)
  e = _eval(d, 7, rng, protocol="seen_excluded")
  table = qt.aggregate(qt.collect([d]))
  assert table["seen_excluded"][qt.LCREC]["HR@10"] == (e["test"]["mean"]["HR@10"], None)
  assert qt.LCREC not in table["all_items"]
  rows = [ln for ln in qt.markdown(qt.collect([d])).splitlines() if ln.startswith("| ")]
  assert len(rows) == 2 + 3 + 4 and not any(" ± " in ln for ln in rows)  # 2 headers


@pytest.mark.parametrize("case", ["users", "dataset", "items", "eval_users", "beams",
                                  "duplicate", "no_seed", "protocol", "empty"])
def test_refuses_workdirs_that_are_not_like_for_like(tmp_path, case):
  rng = np.random.default_rng(2)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _baselines(a, 0, rng)
  _eval(a, 0, rng)
  if case == "users":
    _baselines(b, 1, rng, users=900)
  elif case == "dataset":
    _baselines(b, 1, rng, name="ml-1m")
  elif case == "items":
    _baselines(b, 1, rng, items=1000)
  elif case == "eval_users":
    _eval(b, 1, rng, users=128)
  elif case == "beams":
    _eval(b, 1, rng, beams=50)
  elif case == "duplicate":
    _baselines(b, 0, rng)
  elif case == "no_seed":
    out = _baselines(b, 1, rng)
    del out["sasrec"]["seed"]
    _write(os.path.join(b, "baselines", "results.json"), out)
  elif case == "protocol":
    _eval(b, 1, rng, protocol="toolkit")
  else:
    os.makedirs(b)
    a = b
  with pytest.raises(WorkdirError) as e:
    qt.collect([a, b])
  assert "\n" not in str(e.value)
  want = {"users": "not like for like", "dataset": "not like for like",
          "items": "not like for like", "eval_users": "not like for like",
          "beams": "num_beams_used", "duplicate": "seed 0 is in both",
          "no_seed": "no 'seed'", "protocol": "unknown protocol", "empty": "no baselines"}
  assert want[case] in str(e.value)


@pytest.mark.slow
def test_command_prints_table_and_refuses_with_one_line(tmp_path):
  rng = np.random.default_rng(3)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _baselines(a, 0, rng)
  _baselines(b, 1, rng)
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "quality_table.py")]
  out = tmp_path / "t.md"
  ok = subprocess.run(cmd + [f"--workdirs={a},{b}", f"--out={out}"], capture_output=True,
                      text=True, check=True)
  assert "| SASRec | 2 (0, 1) |" in ok.stdout and out.read_text() == ok.stdout
  _baselines(b, 0, rng)
  bad = subprocess.run(cmd + [f"--workdirs={a},{b}"], capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.startswith("quality_table: error: ")
  assert "seed 0 is in both" in bad.stderr and "Traceback" not in bad.stderr


def test_rl_policy_runs_are_their_own_row_under_each_protocol(tmp_path):
  """SFT and RL evaluations of the same seeds, under both protocols, in one call: four
  lcrec rows, each the numpy mean of its own two workdirs."""
  rng = np.random.default_rng(3)
  res = {}
  for seed in (42, 43):
    for policy, proto in (("sft", "all_items"), ("sft", "seen_excluded"),
                          ("rl", "all_items"), ("rl", "seen_excluded")):
      d = str(tmp_path / f"s{seed}_{policy}_{proto}")
      r = _eval(d, seed, rng, protocol=proto)
      r["settings"]["policy"] = policy
      _write(os.path.join(d, "eval", "results.json"), r)
      res.setdefault((policy, proto), []).append((d, r))
  dirs = [d for v in res.values() for d, _ in v]
  table = qt.aggregate(qt.collect(dirs))
  for (policy, proto), v in res.items():
    row = table[proto][qt.LCREC_RL if policy == "rl" else qt.LCREC]
    assert row["seeds"] == ["42/0", "43/0"]
    want = np.mean([r["test"]["mean"]["NDCG@10"] for _, r in v])
    assert row["NDCG@10"][0] == pytest.approx(want, abs=1e-12)
  assert "| lcrec-jax + RL | 2 (42/0, 43/0) |" in qt.markdown(qt.collect(dirs))
