"""The baseline stage: popularity and SASRec on the same split and protocol.

Writes ``<workdir>/baselines/results.json``:
``{"popularity": {"unmasked": {"valid": {...}, "test": {...}}, "masked": ...},
"sasrec": {"valid": ..., "test": ..., "history": [...], "config": {...}}}``. "masked"
removes each user's already-seen items from the ranking (a large, legitimate gain on
MovieLens-100K, which has no repeated user-item pairs; reported separately). The
generative model's beams are not masked, so compare it with the unmasked rows.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
from absl import logging

from lcrec_jax.baselines import popularity, sasrec
from lcrec_jax.data.dataset import Dataset


def _atomic_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def run_baseline_stage(config: ml_collections.ConfigDict, workdir: str, dataset: Dataset,
                       force: bool = False) -> dict:
  path = os.path.join(workdir, "baselines", "results.json")
  if os.path.exists(path) and not force:
    logging.info("baseline stage: %s exists, skipping", path)
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  out = {"popularity": {
      "unmasked": popularity.evaluate_popularity(dataset, exclude_seen=False),
      "masked": popularity.evaluate_popularity(dataset, exclude_seen=True)}}
  bc = config.get("baseline", ml_collections.ConfigDict())
  fields = {k: bc.sasrec[k] for k in bc.sasrec} if "sasrec" in bc else {}
  t0 = time.perf_counter()
  out["sasrec"] = sasrec.train_and_evaluate(dataset, sasrec.SASRecConfig(**fields),
                                            seed=config.seed)
  out["sasrec"]["seconds"] = time.perf_counter() - t0
  _atomic_json(path, out)
  for name, res in (("popularity", out["popularity"]["unmasked"]),
                    ("popularity (seen masked)", out["popularity"]["masked"]),
                    ("sasrec", out["sasrec"])):
    t = res["test"]
    logging.info("baseline %-25s test HR@10 %.4f NDCG@10 %.4f", name, t["HR@10"], t["NDCG@10"])
  return out
