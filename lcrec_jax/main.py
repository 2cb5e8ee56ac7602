"""lcrec-jax entry point: run pipeline stages for a config recipe.

  python -m lcrec_jax.main --config=configs/ml100k_quick.py --workdir=runs/ml100k
  python -m lcrec_jax.main --config=configs/ml100k_quick.py --workdir=runs/ml100k \
      --stages=index --config.rqvae.epochs=50

Before any work the config is resolved and checked against the run spec
(:mod:`lcrec_jax.spec`: defaults, types, ranges, cross-field rules, unknown keys), a
relative ``--workdir`` is made absolute, and the plan is logged: for each stage, run or
reuse and why (:mod:`lcrec_jax.workdir`). Each stage reads what earlier stages wrote in
``--workdir`` and writes its own outputs there with a ``DONE`` marker and a
``MANIFEST.json`` of what it was built from; a finished stage is reused while its inputs
(the config fields it reads, the upstream manifests) are unchanged. ``--force=X`` runs X
again and every selected stage downstream of it.
``--workdir`` may be a local directory or ``gs://bucket/path`` (every file goes through
:mod:`lcrec_jax.fs`; process 0 writes the shared files). absl cannot write its log file
to ``gs://``: for a bucket workdir the log goes to a local temporary directory and is
copied to ``<workdir>/logs/`` when the run ends.
"""

from __future__ import annotations

import logging as std_logging
import tempfile
import time
from typing import Callable

from absl import flags, logging
from ml_collections import config_flags

from lcrec_jax import cpu_flags, fs, spec
from lcrec_jax import workdir as workdir_lib
from lcrec_jax.errors import ConfigError, WorkdirError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file with get_config().",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output of the run.")
_STAGES = flags.DEFINE_list("stages", ["index", "train", "eval"],
                            "Stages to run (index, train, rl, eval, baseline); run in pipeline "
                            "order.")
_FORCE = flags.DEFINE_list("force", [], "Stages to re-run even if their outputs are complete.")

STAGE_ORDER = ("index", "train", "rl", "eval", "baseline")


class Pipeline:
  """Lazily computed artefacts shared between stages of one run."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self._dataset = None
    self._embeddings = None
    self._index = None

  @property
  def dataset(self):
    if self._dataset is None:
      from lcrec_jax.data.loaders import load_dataset
      self._dataset = load_dataset(self.config.data)
      logging.info("dataset %s: %s", self._dataset.name, self._dataset.summary())
    return self._dataset

  @property
  def embeddings(self):
    if self._embeddings is None:
      from lcrec_jax.encoders.item_embeddings import item_embeddings
      t0 = time.perf_counter()
      self._embeddings = item_embeddings(self.config.embed, self.dataset.item_texts(),
                                         cache_dir=fs.join(self.workdir, "cache"))
      logging.info("item embeddings %s in %.1fs", self._embeddings.shape,
                   time.perf_counter() - t0)
    return self._embeddings

  @property
  def index(self):
    if self._index is None:
      from lcrec_jax.index.stage import index_paths, load_index
      if not fs.exists(index_paths(self.workdir)["done"]):
        raise WorkdirError(f"{self.workdir}/index is not finished",
                           hint="run --stages=index first")
      self._index = load_index(self.workdir, self.dataset)
    return self._index

  def run_index(self, force: bool):
    from lcrec_jax.index.stage import run_index_stage
    provided = self.config.index.source == "file"  # codes from a file: no embeddings
    self._index = run_index_stage(self.config, self.workdir, self.dataset,
                                  None if provided else self.embeddings, force=force)

  def run_train(self, force: bool):
    from lcrec_jax.train.stage import run_train_stage
    run_train_stage(self.config, self.workdir, self.dataset, self.index, force=force)

  def run_rl(self, force: bool):
    from lcrec_jax.rl.stage import run_rl_stage
    run_rl_stage(self.config, self.workdir, self.dataset, self.index, force=force)

  def run_eval(self, force: bool):
    from lcrec_jax.eval.stage import run_eval_stage
    run_eval_stage(self.config, self.workdir, self.dataset, self.index, force=force)

  def run_baseline(self, force: bool):
    from lcrec_jax.baselines.stage import run_baseline_stage
    run_baseline_stage(self.config, self.workdir, self.dataset, force=force)


STAGES: dict[str, Callable[[Pipeline, bool], None]] = {
    "index": Pipeline.run_index,
    "train": Pipeline.run_train,
    "rl": Pipeline.run_rl,
    "eval": Pipeline.run_eval,
    "baseline": Pipeline.run_baseline,
}


def _check_flags(stages: list[str], force: list[str]) -> None:
  for flag, names in (("--stages", stages), ("--force", force)):
    unknown = [s for s in names if s not in STAGES]
    if unknown:
      raise ConfigError(f"{flag}: unknown stage(s) {unknown}; known: {list(STAGE_ORDER)}")
  outside = [s for s in force if s not in stages]
  if outside:
    raise ConfigError(f"--force={','.join(outside)}: not among --stages={','.join(stages)}",
                      hint="a forced stage must also be run; add it to --stages")


def _run_step(pipeline: Pipeline, step: workdir_lib.Step, flat_config: dict) -> None:
  """Runs or reuses one stage as the plan says, with its MANIFEST.json around it."""
  workdir = pipeline.workdir
  if step.run:
    if step.fresh:
      workdir_lib.clear_stage(workdir, step.stage)
    workdir_lib.write_manifest(workdir, step.stage, flat_config, finished=False)
  elif step.unchecked:
    logging.warning("stage %s: %s", step.stage, step.reason)
  STAGES[step.stage](pipeline, step.run)
  if step.run:
    workdir_lib.write_manifest(workdir, step.stage, flat_config, finished=True)
    fs.barrier(f"manifest_{step.stage}")


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments: {argv[1:]}")
  cpu_flags.apply_recommended()  # XLA:CPU flags, before JAX computes anything
  if _CONFIG.value is None:
    raise ConfigError("--config is required, e.g. --config=configs/ml100k_quick.py")
  if not _WORKDIR.value:
    raise ConfigError("--workdir is required, e.g. --workdir=runs/ml100k")
  stages, force = list(_STAGES.value), list(_FORCE.value)
  _check_flags(stages, force)
  # Absolute once, here, for every consumer (orbax refuses relative checkpoint paths).
  workdir = workdir_lib.absolute(_WORKDIR.value)
  # Multi-host: join the other processes before anything touches JAX (fs.is_primary
  # below, the index stage's kernels); train.distributed or LCREC_DISTRIBUTED=1.
  from lcrec_jax.train.mesh import maybe_initialize_distributed
  maybe_initialize_distributed(bool(_CONFIG.value.train.get("distributed", False)) or None)
  import jax  # pylint: disable=g-import-not-at-top
  # JAX's backend probe ("Unable to initialize backend 'tpu'") would precede a config
  # error's one line on stderr; the log file is not open yet.
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
  # The whole config is checked before any work: a bad value costs seconds, not a run.
  config = spec.validate(_CONFIG.value, num_devices=jax.device_count(), stages=stages)
  fs.check_backend(workdir)
  try:
    if fs.exists(workdir) and not fs.isdir(workdir):
      raise WorkdirError(f"--workdir={workdir} exists and is not a directory")
    fs.makedirs(workdir)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created: {e}") from None
  # absl writes its log file with local file calls: a gs:// workdir gets a local log
  # directory, copied to <workdir>/logs/ at the end.
  log_dir = tempfile.mkdtemp(prefix="lcrec-log-") if fs.is_remote(workdir) else workdir
  logging.get_absl_handler().use_absl_log_file("main", log_dir)
  flags.FLAGS.alsologtostderr = True  # the log file and stderr
  if log_dir != workdir:
    logging.info("log file in %s (absl cannot write to %s); copied to %s at the end",
                 log_dir, workdir, fs.join(workdir, "logs"))
  if config.mesh.tpu_slice:
    logging.info("recipe sized for a %s slice; %d devices here", config.mesh.tpu_slice,
                 jax.device_count())
  fs.write_text(fs.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  flat = spec.flatten(config)
  steps = workdir_lib.plan(workdir, flat, stages, force)
  logging.info("plan for %s:\n%s", workdir, "\n".join("  " + s.line() for s in steps))
  pipeline = Pipeline(config, workdir)
  from lcrec_jax.log_filters import quiet_orbax
  try:
    with quiet_orbax():
      for step in steps:
        t0 = time.perf_counter()
        logging.info("== stage %s (%s)", step.stage, "run" if step.run else "reuse")
        _run_step(pipeline, step, flat)
        logging.info("== stage %s finished in %.1fs", step.stage, time.perf_counter() - t0)
  finally:
    if log_dir != workdir:
      _copy_logs(log_dir, fs.join(workdir, "logs"))


def _copy_logs(log_dir: str, dest: str) -> None:
  """Copies this process's absl log files (not the ``main.*`` symlinks) to ``dest``."""
  logging.flush()
  try:  # file names carry host and pid, so every process copies its own
    fs.upload_local_files(log_dir, dest, all_processes=True)
  except OSError as e:
    logging.warning("could not copy the log files of %s to %s: %s", log_dir, dest, e)


def _main(argv):
  """The entry boundary (lcrec_jax.cli): expected errors are one line and exit status 2."""
  from lcrec_jax import cli  # pylint: disable=g-import-not-at-top
  cli.check_workdir(_WORKDIR.value)
  return main(argv)


if __name__ == "__main__":
  from lcrec_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(_main, "main")
