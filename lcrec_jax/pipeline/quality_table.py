"""The like-for-like quality table of finished workdirs: every model, both protocols, seeds.

Reads, from each workdir, ``baselines/results.json`` (popularity, SASRec, GRU4Rec under
``"unmasked"`` and ``"masked"``, each entry with its ``seed`` and ``data``) and
``eval/results.json`` (lcrec-jax under the one protocol its run used,
``eval.exclude_seen``; its seed from the results or the workdir's ``config.json``; a run
whose eval restored the rl stage's policy is its own model, ``lcrec-jax + RL``), and
gives one markdown table per protocol: each model's test HR@5 / NDCG@5 / HR@10 / NDCG@10
as mean ± sample sd (``ddof=1``) over the seeds found.

Protocols, with the names both stages use:

* **all items ranked** (baselines ``"unmasked"``, eval ``"all_items"``): every item is
  ranked, seen ones included. LC-Rec's paper, and RecBole's full-sort evaluation of
  sequential models (it passes no history to mask for them).
* **seen items excluded** (``"masked"``, ``"seen_excluded"``): each user's history is
  removed from the ranking (RecBole does this for general, non-sequential recommenders).

Runs are compared only when they share the dataset, its catalogue and the test users
(:func:`collect` refuses otherwise, one line naming both workdirs), and lcrec-jax runs only
when they share the eval settings; a (model, protocol, seed) found twice is refused too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from lcrec_jax.errors import WorkdirError
from lcrec_jax.pipeline.workdir import Layout

PROTOCOLS = ("all_items", "seen_excluded")
HEADERS = {"all_items": "all items ranked", "seen_excluded": "seen items excluded"}
_BASELINE_PROTOCOL = {"unmasked": "all_items", "masked": "seen_excluded"}
BASELINES = {"popularity": "popularity", "sasrec": "SASRec", "gru4rec": "GRU4Rec"}
LCREC = "lcrec-jax"
LCREC_RL = "lcrec-jax + RL"  # eval of the rl stage's policy (results settings.policy = "rl")
MODELS = (LCREC, LCREC_RL) + tuple(BASELINES.values())
METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10")
# eval settings lcrec-jax runs must share to be averaged together
_EVAL_SAME = ("num_beams_used", "template_ids", "primary_mode", "max_history", "max_users")


@dataclasses.dataclass(frozen=True)
class Run:
  """One model's test metrics under one protocol, from one workdir."""
  model: str
  protocol: str
  seed: Any
  metrics: Mapping[str, float]
  workdir: str
  data: tuple[str, int, int] = ("?", -1, -1)   # (dataset name, items, users of the split)


def _read(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path}: unreadable ({e})") from None


def _need(entry: Mapping[str, Any], key: str, where: str) -> Any:
  if key not in entry:
    raise WorkdirError(f"{where}: no {key!r} (written before results recorded it)",
                       hint="rerun that stage with --force=<stage>")
  return entry[key]


def _baseline_runs(workdir: str, split: str) -> tuple[list[Run], list[tuple[str, Any]]]:
  path = Layout(workdir).baseline_results
  runs, data = [], []
  if not os.path.exists(path):
    return runs, data
  for key, entry in _read(path).items():
    if key not in BASELINES:
      continue
    where = f"{path} {key}"
    seed = _need(entry, "seed", where)
    d = _need(entry, "data", where)
    key_data = (d["name"], int(d["items"]), int(d[f"{split}_users"]))
    data.append((where, key_data))
    for name, protocol in _BASELINE_PROTOCOL.items():
      metrics = _need(_need(entry, name, where), split, f"{where} {name}")
      runs.append(Run(BASELINES[key], protocol, seed, metrics, workdir, key_data))
  return runs, data


def _eval_run(workdir: str, split: str
              ) -> tuple[Run | None, tuple[str, Any] | None, dict[str, Any] | None]:
  path = Layout(workdir).results
  if not os.path.exists(path):
    return None, None, None
  res = _read(path)
  if split not in res:
    return None, None, None
  part, settings = res[split], res.get("settings", {})
  protocol = _need(part, "protocol", f"{path} {split}")
  if protocol not in PROTOCOLS:
    raise WorkdirError(f"{path}: unknown protocol {protocol!r} (known: {PROTOCOLS})")
  cfg_path = Layout(workdir).config_json
  cfg = _read(cfg_path) if os.path.exists(cfg_path) else {}
  seed = res.get("seed")
  if seed is None:
    if "seed" not in cfg:
      raise WorkdirError(f"{path}: no seed, and {cfg_path} has none either")
    seed = {"seed": cfg["seed"], "train_seed": cfg.get("train", {}).get("seed")}
  seed = f"{seed['seed']}/{seed['train_seed']}" if isinstance(seed, Mapping) else seed
  name = cfg.get("data", {}).get("name", "?")
  key_data = (name, int(settings.get("num_items", -1)), int(part["num_users"]))
  same = {k: settings.get(k) for k in _EVAL_SAME}
  model = LCREC_RL if settings.get("policy") == "rl" else LCREC
  return (Run(model, protocol, seed, part["mean"], workdir, key_data),
          (f"{path} {split}", key_data), same)


def collect(workdirs: Sequence[str], split: str = "test") -> list[Run]:
  """Every run of ``workdirs`` under ``split``; raises WorkdirError when they disagree."""
  runs: list[Run] = []
  data: list[tuple[str, Any]] = []
  evals: dict[str, tuple[str, dict[str, Any]]] = {}
  for w in workdirs:
    if not os.path.isdir(w):
      raise WorkdirError(f"--workdirs: {w} is not a directory")
    b_runs, b_data = _baseline_runs(w, split)
    runs += b_runs
    data += b_data
    run, d, same = _eval_run(w, split)
    if run is not None:
      first = evals.setdefault(run.protocol, (w, same))
      if first[1] != same:
        diff = sorted(k for k in same if same[k] != first[1][k])
        raise WorkdirError(f"lcrec-jax eval settings differ between {first[0]} and {w} "
                           f"({', '.join(diff)}): not averaged together")
      runs.append(run)
      data.append(d)
  if not runs:
    raise WorkdirError(f"no baselines/results.json or eval/results.json with a {split!r} "
                       f"split in {', '.join(workdirs)}")
  for where, d in data[1:]:
    if d != data[0][1]:
      raise WorkdirError(f"not like for like: {data[0][0]} has (dataset, items, {split} users)"
                         f" = {data[0][1]}, {where} has {d}")
  seen: dict[tuple[str, str, str], str] = {}
  for r in runs:
    key = (r.model, r.protocol, str(r.seed))
    if key in seen:
      raise WorkdirError(f"{r.model} ({HEADERS[r.protocol]}) seed {r.seed} is in both "
                         f"{seen[key]} and {r.workdir}")
    seen[key] = r.workdir
  return runs


def aggregate(runs: Sequence[Run]) -> dict[str, dict[str, dict[str, Any]]]:
  """``{protocol: {model: {"seeds": [...], metric: (mean, sd or None)}}}``."""
  out: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in PROTOCOLS}
  for p in PROTOCOLS:
    for m in MODELS:
      group = [r for r in runs if r.model == m and r.protocol == p]
      if not group:
        continue
      row: dict[str, Any] = {"seeds": [r.seed for r in group]}
      for k in METRICS:
        v = np.asarray([float(r.metrics[k]) for r in group], np.float64)
        row[k] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None)
      out[p][m] = row
  return out


def _cell(mean_sd: tuple[float, float | None]) -> str:
  mean, sd = mean_sd
  return f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f}"


def markdown(runs: Sequence[Run], split: str = "test") -> str:
  """One table per protocol, the protocol and the shared users named in its header."""
  table = aggregate(runs)
  name, items, users = runs[0].data
  lines = []
  for p in PROTOCOLS:
    rows = table[p]
    if not rows:
      continue
    lines += [f"**{HEADERS[p]}**: {name} {split} split, {users} users, full ranking over "
              f"{items} items; mean ± sd over seeds (sample sd; one seed: no sd)", "",
              "| model | seeds | " + " | ".join(METRICS) + " |",
              "|---" * (2 + len(METRICS)) + "|"]
    for m, row in rows.items():
      seeds = ", ".join(str(s) for s in row["seeds"])
      lines.append(f"| {m} | {len(row['seeds'])} ({seeds}) | "
                   + " | ".join(_cell(row[k]) for k in METRICS) + " |")
    lines.append("")
  return "\n".join(lines).rstrip() + "\n"
