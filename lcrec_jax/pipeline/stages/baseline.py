"""The baseline stage: popularity, SASRec and GRU4Rec on the same split, both protocols.

Writes ``<workdir>/baselines/results.json``, one entry per model, each under both
protocols::

  {"popularity": {"unmasked": {"valid": {...}, "test": {...}}, "masked": {...},
                  "seconds": ..., "seed": 0, "data": {...}},
   "sasrec": {"unmasked": {"valid", "test", "best_epoch"}, "masked": {...},
              "history": [...], "config": {...}, "epochs_run": ..., "seconds": ...,
              "seed": 0, "data": {"name", "items", "valid_users", "test_users"}},
   "gru4rec": {... as sasrec ...}}

``"unmasked"`` ranks every item (LC-Rec's paper, and RecBole's full-sort evaluation of
sequential models such as its SASRec and GRU4Rec; the eval stage's ``"all_items"``
protocol); ``"masked"`` removes each user's already-seen items from the ranking (RecBole
masks history only for general recommenders; the eval stage's ``"seen_excluded"``,
``eval.exclude_seen``).
MovieLens-100K has no repeated user-item pairs, so masking is a large, legitimate gain;
compare each model only with peers under the same protocol.

The file is rewritten (atomically, :mod:`lcrec_jax.fs`) as soon as each model finishes, so
a stopped stage keeps what it finished; the next run trains only the models of
``baseline.models`` the file lacks (``--force=baseline`` trains all again).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import ml_collections
from absl import logging

from lcrec_jax import fs
from lcrec_jax.pipeline import workdir as workdir_lib
from lcrec_jax.baselines import gru4rec, popularity, sasrec
from lcrec_jax.data.dataset import Dataset
from lcrec_jax.errors import ConfigError
from lcrec_jax.pipeline import spec
from lcrec_jax.pipeline.stage import as_settings

MODELS = spec.BY_NAME["baseline.models"].choices
NAMES = {"popularity": "popularity", "sasrec": "SASRec", "gru4rec": "GRU4Rec"}
PROTOCOL_HEADERS = {"unmasked": "all items ranked", "masked": "seen items excluded"}


def results_path(workdir: str) -> str:
  return workdir_lib.Layout(workdir).baseline_results


def _popularity(dataset: Dataset, config: ml_collections.ConfigDict) -> dict[str, Any]:
  del config
  return {"unmasked": popularity.evaluate_popularity(dataset, exclude_seen=False),
          "masked": popularity.evaluate_popularity(dataset, exclude_seen=True)}


def _sequential(module, config_cls, key: str):
  def run(dataset: Dataset, config: ml_collections.ConfigDict) -> dict[str, Any]:
    fields = dataclasses.asdict(getattr(config.baseline, key))
    try:
      cfg = config_cls(**fields)
    except TypeError as e:
      raise ConfigError(f"config baseline.{key}: {e}") from None
    return module.train_and_evaluate(dataset, cfg, seed=config.seed)
  return run


RUNNERS = {"popularity": _popularity,
           "sasrec": _sequential(sasrec, sasrec.SASRecConfig, "sasrec"),
           "gru4rec": _sequential(gru4rec, gru4rec.GRU4RecConfig, "gru4rec")}


def data_summary(dataset: Dataset) -> dict[str, Any]:
  """What a like-for-like comparison must share: the dataset and its split's users."""
  split = dataset.split()
  return {"name": dataset.name, "items": int(dataset.num_items),
          "valid_users": len(split.valid), "test_users": len(split.test)}


def configured_models(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """``baseline.models`` (default: all of :data:`MODELS`), checked."""
  models = tuple(as_settings(config).baseline.models)
  bad = [m for m in models if m not in MODELS]
  if bad or not models:
    raise ConfigError(f"config baseline.models={models}: each must be one of {MODELS}")
  return models


def summary_lines(results: Mapping[str, Any]) -> list[str]:
  """One line per model and protocol, test HR@10 / NDCG@10, the protocol named."""
  lines = []
  for protocol, header in PROTOCOL_HEADERS.items():
    for model in MODELS:
      res = results.get(model, {}).get(protocol)
      if res is not None:
        t = res["test"]
        label = f"({header})"
        lines.append(f"baseline {NAMES[model]:<10} {label:<21} test HR@10 {t['HR@10']:.4f}  "
                     f"NDCG@10 {t['NDCG@10']:.4f}")
  return lines


def run_baseline_stage(config: ml_collections.ConfigDict, workdir: str, dataset: Dataset,
                       force: bool = False) -> dict:
  config = as_settings(config)
  path = results_path(workdir)
  done = workdir_lib.Layout(workdir).baseline_done
  models = configured_models(config)
  out: dict[str, Any] = {}
  if fs.exists(path) and (not force or not fs.exists(done)):
    # finished: reuse; interrupted (no DONE): keep the models it finished, train the rest
    out = fs.read_json(path)
    if all(m in out for m in models) and not force:
      logging.info("baseline stage: %s has %s, skipping", path, ", ".join(models))
      return out
    logging.info("baseline stage: %s has %s; training the rest", path, ", ".join(out) or "none")
  fs.remove(done)  # until every model is in results.json
  for model in models:
    if model in out:
      continue
    t0 = time.perf_counter()
    out[model] = RUNNERS[model](dataset, config)
    out[model].update(seconds=time.perf_counter() - t0, seed=int(config.seed),
                      data=data_summary(dataset))
    fs.write_json(path, out, indent=2)  # after every model; atomic; process 0 only
    for line in summary_lines({model: out[model]}):
      logging.info("%s (%.0f s)", line, out[model]["seconds"])
  fs.write_text(done, " ".join(models) + "\n")
  fs.barrier("baseline_stage_written")
  return out


def run(ctx, force: bool) -> dict:
  """The stage (:class:`lcrec_jax.pipeline.stage.Stage`)."""
  return run_baseline_stage(ctx.settings, ctx.workdir, ctx.dataset, force=force)
