"""The baseline stage: popularity and SASRec on the same split and protocol.

Writes ``<workdir>/baselines/results.json``:
``{"popularity": {"unmasked": {"valid": {...}, "test": {...}}, "masked": ...},
"sasrec": {"valid": ..., "test": ..., "history": [...], "config": {...}}}``. "masked"
removes each user's already-seen items from the ranking (a large, legitimate gain on
MovieLens-100K, which has no repeated user-item pairs; reported separately). The
generative model's beams are not masked, so compare it with the unmasked rows.
"""

from __future__ import annotations

import time

import ml_collections
from absl import logging

from lcrec_jax import fs
from lcrec_jax import workdir as workdir_lib
from lcrec_jax.baselines import popularity, sasrec
from lcrec_jax.data.dataset import Dataset


def run_baseline_stage(config: ml_collections.ConfigDict, workdir: str, dataset: Dataset,
                       force: bool = False) -> dict:
  path = workdir_lib.baseline_results_path(workdir)
  if fs.exists(path) and not force:
    logging.info("baseline stage: %s exists, skipping", path)
    return fs.read_json(path)
  out = {"popularity": {
      "unmasked": popularity.evaluate_popularity(dataset, exclude_seen=False),
      "masked": popularity.evaluate_popularity(dataset, exclude_seen=True)}}
  bc = config.get("baseline", ml_collections.ConfigDict())
  fields = {k: bc.sasrec[k] for k in bc.sasrec} if "sasrec" in bc else {}
  t0 = time.perf_counter()
  out["sasrec"] = sasrec.train_and_evaluate(dataset, sasrec.SASRecConfig(**fields),
                                            seed=config.seed)
  out["sasrec"]["seconds"] = time.perf_counter() - t0
  fs.write_json(path, out, indent=2)  # atomic; process 0 only (local or gs://)
  fs.barrier("baseline_stage_written")
  for name, res in (("popularity", out["popularity"]["unmasked"]),
                    ("popularity (seen masked)", out["popularity"]["masked"]),
                    ("sasrec", out["sasrec"])):
    t = res["test"]
    logging.info("baseline %-25s test HR@10 %.4f NDCG@10 %.4f", name, t["HR@10"], t["NDCG@10"])
  return out
