"""The index stage: item embeddings -> RQ-VAE -> conflict-free ``ItemIndex`` on disk.

Writes under ``<workdir>/index/``: ``metrics.jsonl`` and ``checkpoints/`` (trainer),
``index.json`` (LC-Rec format, keyed by the dataset's external item ids),
``report.json``, ``codes.png`` and, last, ``DONE``. With ``DONE`` present the stage
loads and returns the saved index instead of running again (``force=True`` runs it
again; training then resumes from, or reuses, the checkpoints present: delete
``<workdir>/index`` to train from scratch).

Which parameters assign the codes is ``c.index.checkpoint``: ``"best_collision"``
(LC-Rec's choice: the evaluation with the lowest argmax collision rate, ties to the
later epoch), ``"best_loss"``, or ``"final"``.

With ``c.index.source = "file"`` no RQ-VAE is trained: the codes come from LC-Rec's
``X.index.json`` at ``c.index.path``, checked against the dataset and made unique
(:mod:`lcrec_jax.index.provided`), and the same ``index.json``, ``report.json``,
``codes.png`` and ``DONE`` are written. With ``c.index.source = "rqkmeans"`` the codes are
residual k-means of the embeddings (:mod:`lcrec_jax.index.rqkmeans`, balanced by Sinkhorn
on levels with ``rqvae.sk_epsilons > 0``), repaired like an RQ-VAE's; no checkpoints.
"""

from __future__ import annotations

import json
import time

from absl import logging
import ml_collections
import numpy as np

from lcrec_jax import fs
from lcrec_jax.pipeline import workdir as workdir_lib
from lcrec_jax.data.dataset import Dataset
from lcrec_jax.errors import ConfigError
from lcrec_jax.index import assign
from lcrec_jax.index import provided
from lcrec_jax.index import report as report_lib
from lcrec_jax.index import rqkmeans
from lcrec_jax.index import trainer
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.pipeline import spec
from lcrec_jax.pipeline.stage import as_settings

CHECKPOINT_CHOICES = spec.BY_NAME["index.checkpoint"].choices


def index_paths(workdir: str) -> dict[str, str]:
  """Paths of the stage's outputs under ``<workdir>/index`` (from the workdir ``Layout``)."""
  lay = workdir_lib.Layout(workdir)
  return {"dir": lay.index_dir, "index": lay.index_json, "report": lay.index_report,
          "plot": lay.index_plot, "metrics": lay.index_metrics, "done": lay.index_done}


def load_index(workdir: str, dataset: Dataset) -> ItemIndex:
  """The saved index of a finished stage, rows in the dataset's item order."""
  paths = index_paths(workdir)
  try:
    level_sizes = fs.read_json(paths["report"])["level_sizes"]
  except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
    raise ValueError(f"{paths['report']}: cannot read level_sizes ({e}); "
                     f"rerun the index stage with force") from None
  return ItemIndex.load(paths["index"], item_ids=[it.item_id for it in dataset.items],
                        level_sizes=level_sizes)


def run_index_stage(config: ml_collections.ConfigDict, workdir: str, dataset: Dataset,
                    embeddings: np.ndarray, force: bool = False) -> ItemIndex:
  """Trains (or resumes) the RQ-VAE, assigns conflict-free codes, writes the outputs
  (or, for ``c.index.source = "file"``, reads and checks the codes of ``c.index.path``).

  Args:
    config: the whole run config (uses ``c.seed``, ``c.rqvae``, ``c.index``).
    workdir: run directory.
    dataset: the dataset; row ``i`` of ``embeddings`` is ``dataset.items[i]``.
    embeddings: ``[num_items, dim]`` item embeddings (unused, may be None, for
      ``c.index.source = "file"``: the codes come from ``c.index.path``,
      :mod:`lcrec_jax.index.provided`).
    force: run even if ``<workdir>/index/DONE`` exists.

  Returns:
    The conflict-free :class:`ItemIndex`.
  """
  config = as_settings(config)
  paths = index_paths(workdir)
  if fs.exists(paths["done"]) and not force:
    index = load_index(workdir, dataset)
    logging.info("index stage: %s exists, loaded %d item codes from %s", paths["done"],
                 index.num_items, paths["index"])
    return index
  fs.remove(paths["done"])  # process 0 only, like every write below
  if config.index.source == "file":
    return _run_provided(config, paths, dataset)
  if config.index.source not in ("rqvae", "rqkmeans"):
    raise ConfigError(f"config index.source must be 'rqvae', 'rqkmeans' or 'file', got "
                      f"{config.index.source!r}")

  x = np.asarray(embeddings, np.float32)
  if x.ndim != 2 or x.shape[0] != dataset.num_items:
    raise ValueError(f"embeddings have shape {x.shape}, expected [{dataset.num_items}, dim] "
                     f"for dataset {dataset.name!r}")
  if config.index.source == "rqkmeans":
    return _run_rqkmeans(config, paths, dataset, x)
  which = str(config.index.checkpoint)
  if which not in CHECKPOINT_CHOICES:
    raise ValueError(f"index.checkpoint must be one of {CHECKPOINT_CHOICES}, got {which!r}")

  t0 = time.time()
  cf = None
  if trainer.letter_weights(config.rqvae)[0] > 0:  # LETTER's collaborative term
    cf = _load_cf(str(config.rqvae.cf_embeddings))
  model, variables, history = trainer.train_rqvae(config.rqvae, x, paths["dir"],
                                                  seed=int(config.seed), cf_embeddings=cf)
  train_s = time.time() - t0
  if which == "final":
    used_epoch = int(history[-1]["epoch"]) if history else int(config.rqvae.epochs)
  else:
    variables, meta = trainer.load_checkpoint_variables(paths["dir"], which, model, variables,
                                                        config.rqvae)
    used_epoch = int(meta["epoch"])

  t1 = time.time()
  item_ids = [it.item_id for it in dataset.items]
  index, stats, encoded = assign.build_item_index(
      model, variables, x, item_ids, repair_rounds=int(config.index.repair_rounds),
      repair_sk_epsilon=float(config.index.repair_sk_epsilon))
  assign_s = time.time() - t1

  last = history[-1] if history else {}
  extra = {
      "dataset": dataset.name,
      "embedding_dim": int(x.shape[1]),
      "checkpoint": which,
      "checkpoint_epoch": used_epoch,
      "epochs": int(config.rqvae.epochs),
      "final_train_loss": last.get("loss"),
      "final_train_recon_mse": last.get("recon_mse"),
      "seconds": {"train": round(train_s, 2), "assign": round(assign_s, 2)},
  }
  rep = report_lib.build_report(index, stats, encoded,
                                codebook_size=int(config.rqvae.codebook_size), extra=extra)
  _write(paths, index, rep, history)
  return index


def _load_cf(path: str) -> np.ndarray:
  """``rqvae.cf_embeddings``: a local .npy of ``[num_items, e_dim]`` (shape checked later)."""
  if not path:
    raise ConfigError("rqvae.cf_weight > 0 needs rqvae.cf_embeddings (a .npy of "
                      "[num_items, e_dim], e.g. from benchmarks/export_sasrec_embeddings.py)")
  try:
    return np.load(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"rqvae.cf_embeddings: cannot read {path} as .npy ({e})") from None


def _write(paths: dict[str, str], index: ItemIndex, rep: dict, history: list[dict]) -> None:
  """``index.json``, ``report.json``, ``codes.png``, then ``DONE``; logs the summary."""
  index.save(paths["index"])
  report_lib.write_json_atomic(paths["report"], rep)
  report_lib.plot_codes(paths["plot"], history, index.codes, index.level_sizes)
  report_lib.write_json_atomic(paths["done"], {"num_items": index.num_items,
                                               "time": time.strftime("%Y-%m-%d %H:%M:%S")})
  fs.barrier("index_stage_written")  # later stages may read what process 0 wrote
  _log_summary(rep, paths["dir"])


def _run_rqkmeans(config: ml_collections.ConfigDict, paths: dict[str, str],
                  dataset: Dataset, x: np.ndarray) -> ItemIndex:
  """``index.source = "rqkmeans"``: residual k-means codes of ``x [N, D]``, repaired."""
  r = config.rqvae
  k = int(r.codebook_size)
  t0 = time.time()
  res = rqkmeans.rq_kmeans(x, num_levels=int(r.num_levels), codebook_size=k,
                           sk_epsilons=tuple(float(e) for e in r.sk_epsilons),
                           iters=int(r.kmeans_iters), sk_iters=int(r.sk_iters),
                           seed=int(config.seed))
  fit_s = time.time() - t0
  t1 = time.time()
  final, _, stats = assign.assign_codes(
      res.codes, res.last_distances, rounds=int(config.index.repair_rounds),
      sk_epsilon=float(config.index.repair_sk_epsilon), sk_iters=int(r.sk_iters))
  level_sizes = [k] * int(r.num_levels)
  if stats.extra_level_added:
    level_sizes.append(stats.extra_level_size)
  index = ItemIndex(tuple(it.item_id for it in dataset.items), final, tuple(level_sizes))
  if not index.is_conflict_free():  # make_unique guarantees this; never ship otherwise
    raise AssertionError(f"assignment left {index.num_collisions()} colliding items")
  encoded = assign.EncodedItems(res.codes, x, res.last_distances, res.recon_sq_err)
  extra = {"dataset": dataset.name, "embedding_dim": int(x.shape[1]), "source": "rqkmeans",
           "sk_epsilons": [float(e) for e in r.sk_epsilons],
           "seconds": {"train": round(fit_s, 2), "assign": round(time.time() - t1, 2)}}
  rep = report_lib.build_report(index, stats, encoded, codebook_size=k, extra=extra)
  _write(paths, index, rep, [])
  return index


def _run_provided(config: ml_collections.ConfigDict, paths: dict[str, str],
                  dataset: Dataset) -> ItemIndex:
  """``index.source = "file"``: the codes of ``index.path``, checked and made unique."""
  if not config.index.path:
    raise ConfigError("config index.source='file' needs index.path (an LC-Rec "
                      "X.index.json); set --config.index.path=...")
  index, rep = provided.provided_index(config.index.path, dataset,
                                       int(config.index.level_size))
  index.save(paths["index"])
  report_lib.write_json_atomic(paths["report"], rep)
  report_lib.plot_codes(paths["plot"], [], index.codes, index.level_sizes)
  report_lib.write_json_atomic(paths["done"], {"num_items": index.num_items,
                                               "time": time.strftime("%Y-%m-%d %H:%M:%S")})
  fs.barrier("index_stage_written")
  r = rep["repair"]
  logging.info("index stage: %d item codes read from %s, levels %s; collision rate %.4f -> "
               "%.4f; %d items moved by the uniqueness step, %s; outputs in %s",
               index.num_items, config.index.path, rep["level_sizes"],
               rep["collision_rate_before"], rep["collision_rate_after"], r["items_moved"],
               f"extra level of {r['extra_level_size']}" if r["extra_level_added"]
               else "no extra level", paths["dir"])
  return index


def _log_summary(rep: dict, where: str) -> None:
  r = rep["repair"]
  levels = ", ".join(f"{chr(ord('a') + l)} {n}/{k} (ppl {p:.1f})" for l, (n, k, p) in
                     enumerate(zip(rep["codes_used"], rep["level_sizes"], rep["perplexity"])))
  source = (f"rqkmeans, sk_epsilons {rep['sk_epsilons']}" if rep.get("source") == "rqkmeans"
            else f"checkpoint {rep['checkpoint']}, epoch {rep['checkpoint_epoch']}")
  logging.info(
      "index stage: %d items, levels %s; collision rate %.4f (argmax) -> %.4f (after %d "
      "repair rounds) -> %.4f; %d items moved, %s; codes used %s; distinct prefixes %s; "
      "reconstruction mse %.5f (%s); outputs in %s",
      rep["num_items"], rep["level_sizes"], rep["collision_rate_before"],
      rep["collision_rate_after_repair"], r["repair_rounds_used"], rep["collision_rate_after"],
      r["items_moved"],
      f"extra level of {r['extra_level_size']}" if r["extra_level_added"] else "no extra level",
      levels, rep["distinct_prefixes"], rep["reconstruction_mse"], source, where)


def run(ctx, force: bool) -> ItemIndex:
  """The stage (:class:`lcrec_jax.pipeline.stage.Stage`): codes from the item embeddings
  (none are computed for ``index.source = "file"``); the index is kept on ``ctx``."""
  provided = ctx.settings.index.source == "file"  # codes from a file: no embeddings
  ctx.index = run_index_stage(ctx.settings, ctx.workdir, ctx.dataset,
                              None if provided else ctx.embeddings, force=force)
  return ctx.index
