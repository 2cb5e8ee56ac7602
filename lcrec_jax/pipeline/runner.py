"""The pipeline runner behind ``python -m lcrec_jax.main``: run stages for a config recipe.

  python -m lcrec_jax.main --config=configs/ml100k_quick.py --workdir=runs/ml100k
  python -m lcrec_jax.main --config=configs/ml100k_quick.py --workdir=runs/ml100k \
      --stages=index --config.rqvae.epochs=50

Before any work the config is resolved and checked against the run spec
(:mod:`lcrec_jax.pipeline.spec`: defaults, types, ranges, cross-field rules, unknown keys), a
relative ``--workdir`` is made absolute, and the plan is logged: for each stage, run or
reuse and why (:mod:`lcrec_jax.pipeline.workdir`). Each stage reads what earlier stages wrote in
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

import errno
import logging as std_logging
import shutil
import tempfile
import time

from absl import flags, logging
from ml_collections import config_flags

from lcrec_jax import cpu_flags, fs, interrupt
from lcrec_jax.pipeline import spec
from lcrec_jax import lock as lock_lib
from lcrec_jax.pipeline import workdir as workdir_lib
from lcrec_jax.errors import ConfigError, Interrupted, UserError, WorkdirError
from lcrec_jax.pipeline.stage import Context
from lcrec_jax.pipeline.stages import REGISTRY

_CONFIG = _WORKDIR = _STAGES = _FORCE = None  # flag holders, set by define_flags
DEFAULT_STAGES = spec.DEFAULT_STAGES


def define_flags(fv: flags.FlagValues = flags.FLAGS,
                 argv: list[str] | None = None) -> flags.FlagValues:
  """Defines the command's flags on ``fv`` (absl's FLAGS when run as a program).

  Importing this module defines no flag, so entry modules that share flag names
  (``--workdir``) can be imported side by side (tests, the server); a test runs the
  command in-process on a fresh ``FlagValues`` (``cli.run_in_process``). ``argv`` is where
  the config flag finds its ``--config.x.y`` overrides (default: ``sys.argv``).
  """
  global _CONFIG, _WORKDIR, _STAGES, _FORCE  # pylint: disable=global-statement
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file with get_config().",
                                            flag_values=fv, lock_config=True, sys_argv=argv)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output of the run.",
                                 flag_values=fv)
  _STAGES = flags.DEFINE_list("stages", list(DEFAULT_STAGES),
                              f"Stages to run ({', '.join(REGISTRY)}); run in pipeline "
                              "order.", flag_values=fv)
  _FORCE = flags.DEFINE_list("force", [], "Stages to re-run even if their outputs are "
                             "complete.", flag_values=fv)
  return fv

def _check_flags(stages: list[str], force: list[str]) -> None:
  for flag, names in (("--stages", stages), ("--force", force)):
    unknown = [s for s in names if s not in REGISTRY]
    if unknown:
      raise ConfigError(f"{flag}: unknown stage(s) {unknown}; known: {list(REGISTRY)}")
  outside = [s for s in force if s not in stages]
  if outside:
    raise ConfigError(f"--force={','.join(outside)}: not among --stages={','.join(stages)}",
                      hint="a forced stage must also be run; add it to --stages")


def _run_step(pipeline: Context, step: workdir_lib.Step, flat_config: dict) -> None:
  """Runs or reuses one stage as the plan says, with its MANIFEST.json around it."""
  workdir = pipeline.workdir
  if step.warning:
    logging.warning("stage %s: %s", step.stage, step.warning)
  if step.run:
    if step.fresh:
      workdir_lib.clear_stage(workdir, step.stage)
    workdir_lib.start_stage(workdir, step.stage)
    workdir_lib.write_manifest(workdir, step.stage, flat_config, finished=False)
  elif step.unchecked:
    logging.warning("stage %s: %s", step.stage, step.reason)
  REGISTRY[step.stage].run(pipeline, step.run)
  interrupt.raise_if_requested()  # a Ctrl-C that something swallowed
  if step.run:
    workdir_lib.write_manifest(workdir, step.stage, flat_config, finished=True)
    fs.barrier(f"manifest_{step.stage}")


def _no_space(e: BaseException) -> bool:
  """Whether ``e`` (or an exception it was raised from) is a full disk (ENOSPC); orbax and
  TensorStore wrap it in their own exceptions, some only in the message."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(e) or "ENOSPC" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _space_needed_mb(config, stage: str | None) -> float:
  """A rough size of what ``stage`` writes (the full-disk message's ``needs ~N MB``).

  train: the trainable float32 params x (params + 2 Adam moments) per kept checkpoint,
  one more being written, and the bf16/f32 export; other stages: a few tens of MB.
  """
  if stage != "train":
    return 50.0
  try:
    from lcrec_jax.pipeline import plan as plan_lib  # pylint: disable=g-import-not-at-top
    n = plan_lib.model_config_for_plan(config).num_params()
  except Exception:  # pylint: disable=broad-except
    return 500.0
  keep = int(config.train.keep_checkpoints)
  return n * 4 * (3 * (keep + 1) + 1) / 1e6 + 50.0


def _free_mb(workdir: str) -> str:
  try:
    return f", {shutil.disk_usage(workdir).free / 1e6:.0f} MB free"
  except OSError:
    return ""


def _resume_point(workdir: str, stage: str | None) -> str:
  """What the next run resumes, for the Ctrl-C line."""
  if stage is None:
    return "the next run starts where this one stopped"
  if stage == "train":
    from lcrec_jax.train import divergence  # pylint: disable=g-import-not-at-top
    steps = divergence.checkpoint_losses(workdir_lib.Layout(workdir).train_checkpoints)
    if steps:
      return f"the next run resumes from step {max(steps)}"
    return "no checkpoint was written yet: the next run starts training at step 0"
  if stage == "index":
    ckpts = fs.join(workdir_lib.Layout(workdir).index_checkpoints, "latest")
    epochs = [int(n) for n in fs.listdir(ckpts) if n.isdigit()] if fs.isdir(ckpts) else []
    if epochs:
      return f"the next run resumes the RQ-VAE from epoch {max(epochs)}"
  return f"the next run runs stage {stage} again (finished stages are reused)"


def _run_stages(pipeline: Context, steps: list[workdir_lib.Step], flat: dict) -> None:
  """The plan's stages in order; Ctrl-C and a full disk become one line."""
  from lcrec_jax.log_filters import quiet_orbax  # pylint: disable=g-import-not-at-top
  workdir, current = pipeline.workdir, None
  try:
    with quiet_orbax():
      for step in steps:
        current = step.stage
        t0 = time.perf_counter()
        logging.info("== stage %s (%s)", step.stage, "run" if step.run else "reuse")
        _run_step(pipeline, step, flat)
        logging.info("== stage %s finished in %.1fs", step.stage, time.perf_counter() - t0)
  except KeyboardInterrupt:
    raise Interrupted(f"interrupted during stage {current}; "
                      f"{_resume_point(workdir, current)}") from None
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not _no_space(e):
      raise
    # chained: the boundary writes the whole traceback to the log file, stderr gets a line
    raise _no_space_error(workdir, pipeline.config, current) from e


def _no_space_error(workdir: str, config, stage: str | None) -> WorkdirError:
  what = f" for stage {stage}" if stage else ""
  return WorkdirError(
      f"no space left on the device holding {workdir} (needs ~"
      f"{_space_needed_mb(config, stage):.0f} MB{what}{_free_mb(workdir)})",
      hint="free space or use a --workdir on a larger disk; the same command then "
           "resumes where this one stopped")


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
  from lcrec_jax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_backend_probe()
  # The whole config is checked before any work: a bad value costs seconds, not a run.
  config = spec.validate(_CONFIG.value, num_devices=jax.device_count(), stages=stages)
  fs.check_backend(workdir)
  try:
    if fs.exists(workdir) and not fs.isdir(workdir):
      raise WorkdirError(f"--workdir={workdir} exists and is not a directory")
    fs.makedirs(workdir)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created: {e}") from None
  # One run at a time: held until the end (before the log file, whose main.INFO link a
  # second run would repoint). Process 0 only: a multi-host run shares its workdir.
  lock = lock_lib.WorkdirLock(workdir) if fs.is_primary() else None
  if lock is not None:
    lock.acquire()
  interrupt.install()
  # A full disk also fails every log write: no "--- Logging error ---" trace for each.
  std_logging.raiseExceptions = False
  try:
    _locked_main(config, workdir, stages, force)
  except OSError as e:  # a full disk outside a stage (config.json, a manifest, the log)
    if not _no_space(e):
      raise
    raise _no_space_error(workdir, config, None) from e
  finally:
    interrupt.uninstall()
    if lock is not None:
      lock.release()


def plan_run(config, workdir: str, stages: list[str], force: list[str]
             ) -> list[workdir_lib.Step]:
  """Cleans a killed run's leftovers, plans, logs the plan, then writes config.json.

  config.json is written only once the plan accepted the run (a refused run leaves the
  file as it was), atomically (:func:`lcrec_jax.fs.write_text`): it is the config of the
  last accepted run.
  """
  if fs.is_primary():
    workdir_lib.remove_leftovers(workdir)
  steps = workdir_lib.plan(workdir, spec.flatten(config), stages, force)
  logging.info("plan for %s:\n%s", workdir, "\n".join("  " + s.line() for s in steps))
  fs.write_text(workdir_lib.Layout(workdir).config_json, config.to_json_best_effort(indent=2))
  return steps


def _locked_main(config, workdir: str, stages: list[str], force: list[str]) -> None:
  """Everything after the workdir lock: log file, plan, config.json, the stages."""
  import jax  # pylint: disable=g-import-not-at-top
  # absl writes its log file with local file calls: a gs:// workdir gets a local log
  # directory, copied to <workdir>/logs/ at the end.
  log_dir = tempfile.mkdtemp(prefix="lcrec-log-") if fs.is_remote(workdir) else workdir
  logging.get_absl_handler().use_absl_log_file("main", log_dir)
  flags.FLAGS.alsologtostderr = True  # the log file and stderr
  try:
    if log_dir != workdir:
      logging.info("log file in %s (absl cannot write to %s); copied to %s at the end",
                   log_dir, workdir, workdir_lib.Layout(workdir).logs_dir)
    if config.mesh.tpu_slice:
      logging.info("recipe sized for a %s slice; %d devices here", config.mesh.tpu_slice,
                   jax.device_count())
    flat = spec.flatten(config)
    steps = plan_run(config, workdir, stages, force)
    _run_stages(Context(config, workdir), steps, flat)
  finally:
    if log_dir != workdir:
      _copy_logs(log_dir, workdir_lib.Layout(workdir).logs_dir)


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

