"""The run directory: where each stage's outputs live, and what they were built from.

Layout (the one place that knows it; local or ``gs://``)::

  <workdir>/config.json            the resolved config of the last run
  <workdir>/cache/                 item embeddings, keyed by a content hash
  <workdir>/index/                 index stage: index.json, report.json, codes.png, DONE
  <workdir>/train/                 train stage: checkpoints, metrics, tokenizer,
                                   examples/ (tokenized task examples, array_record)
  <workdir>/model/                 train stage: the HF export, DONE
  <workdir>/rl/                    rl stage: checkpoints, metrics, summary.json, DONE
  <workdir>/eval/results.json      eval stage (the file is its DONE)
  <workdir>/baselines/results.json baseline stage (the file is its DONE)

Each stage also writes ``<stage dir>/MANIFEST.json`` (stage dirs: ``index/``, ``model/``,
``rl/``, ``eval/``, ``baselines/``)::

  {"stage": "train", "format": 1,
   "reads": {"train.lr": 0.002, ...},        config fields the stage reads (READS, NO_EFFECT)
   "inputs": {"/data/ml-100k.inter": "sha256:..."},  data files it reads (+ index.path)
   "upstream": {"index": "sha256:..."},      hashes of the upstream stages' manifests
   "outputs": {"DONE": "sha256:...", ...},   content hashes of its own outputs
   "finished": "2026-11-30 05:40:12"}

It is written when the stage starts (without ``outputs``/``finished``: the checkpoints in
the stage's directories belong to those inputs) and again when it ends. A downstream
stage records the hash of each upstream manifest, so a re-run upstream (new outputs, new
finish time) makes it stale. :func:`plan` decides, before any work, which stages run:

* named in ``--force``: runs (resuming from its checkpoints, as before);
* an upstream stage runs, or the recorded inputs differ from the config / the data
  files' contents / the upstream manifests: runs from scratch (its old directories are removed first);
* not finished, and only fields of :data:`RESUMABLE` changed (a lower ``train.lr`` after
  a divergence stopped training): runs, resuming from its newest (finite) checkpoint;
* not finished: runs (an interrupted run with the same inputs resumes);
* finished with the same inputs: reused.

A finished stage without a manifest (a workdir from before manifests) is reused with a
warning that its inputs cannot be checked; ``--force=<stage>`` rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from lcrec_jax import fs
from lcrec_jax.errors import WorkdirError

FORMAT = 1
STAGES = ("index", "train", "rl", "eval", "baseline")
UPSTREAM = {"index": (), "train": ("index",), "rl": ("index", "train"),
            "eval": ("index", "train", "rl"), "baseline": ()}
# Upstream stages a stage uses only when they ran: eval evaluates the RL policy when the
# rl stage finished, the SFT model otherwise (a never-run rl stage is not required).
OPTIONAL_UPSTREAM = {"eval": ("rl",)}
# The directory that holds each stage's DONE and MANIFEST.json, and what marks it done.
_STAGE_DIR = {"index": "index", "train": "model", "rl": "rl", "eval": "eval",
              "baseline": "baselines"}
_DONE = {"index": "DONE", "train": "DONE", "rl": "DONE", "eval": "results.json",
         "baseline": "DONE"}
# Directories a from-scratch run removes first (checkpoints included).
_STATE_DIRS = {"index": ("index",), "train": ("train", "model"), "rl": ("rl",),
               "eval": ("eval",), "baseline": ("baselines",)}
# Outputs whose content hash goes into the manifest (files over _HASH_LIMIT: size only).
_OUTPUTS = {"index": ("index.json", "report.json"),
            "train": ("DONE", "config.json", "model.safetensors"),
            "rl": ("DONE", "summary.json"),
            "eval": ("results.json",), "baseline": ("results.json",)}
_HASH_LIMIT = 1 << 28
# Config fields each stage reads ("x." = the whole section, so a key added to a section
# counts unless listed in NO_EFFECT).
READS: dict[str, tuple[str, ...]] = {
    "index": ("seed", "data.", "embed.", "rqvae.", "index."),
    "train": ("seed", "data.", "tasks.", "model.", "train."),
    "rl": ("seed", "data.", "tasks.max_history", "tasks.buckets", "tasks.add_bos", "model.",
           "train.compute_dtype", "train.b1", "train.b2", "train.eps", "rl."),
    "eval": ("data.", "tasks.max_history", "tasks.buckets", "tasks.add_bos", "eval."),
    "baseline": ("seed", "data.", "baseline."),
}
# Fields that change only logging, checkpoint cadence, monitoring or sharding, not a
# stage's outputs: changing them reuses the stage.
NO_EFFECT = frozenset((
    "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint",
    "train.log_every", "train.progress_log_s", "train.eval_every",
    "train.peak_flops_per_device", "train.distributed", "train.tensorboard",
    "train.valid_users", "eval.quick_users", "eval.shard",
    "rl.checkpoint_every", "rl.keep_checkpoints", "rl.eval_every", "rl.rollout_batch_size"))


# Fields whose change does not invalidate an UNFINISHED stage's checkpoints: the way out of
# a divergence is the same command with a lower learning rate, resuming from the newest
# finite checkpoint. A finished stage with a changed value still runs from scratch.
RESUMABLE = frozenset(("train.lr", "train.max_grad_norm", "train.on_nonfinite",
                       "train.max_nonfinite_skips", "rl.lr", "rl.max_grad_norm"))


def absolute(workdir: str) -> str:
  """``workdir`` as an absolute path (``~`` expanded); ``gs://`` paths unchanged."""
  if fs.is_remote(workdir):
    return workdir
  return os.path.abspath(os.path.expanduser(workdir))


def stage_dir(workdir: str, stage: str) -> str:
  """The directory of ``stage``'s DONE marker and MANIFEST.json."""
  return fs.join(workdir, _STAGE_DIR[stage])


def done_path(workdir: str, stage: str) -> str:
  """The file whose presence means ``stage`` finished."""
  return fs.join(stage_dir(workdir, stage), _DONE[stage])


def manifest_path(workdir: str, stage: str) -> str:
  return fs.join(stage_dir(workdir, stage), "MANIFEST.json")


def index_dir(workdir: str) -> str:
  return stage_dir(workdir, "index")


def train_dir(workdir: str) -> str:
  """Checkpoints, metrics and the trained tokenizer of the train stage."""
  return fs.join(workdir, "train")


def examples_dir(workdir: str, process_index: int = 0) -> str:
  """Local directory for the train stage's tokenized examples (array_record, read by grain).

  ``<workdir>/train/examples`` for a local workdir (one copy, written by process 0: a
  local workdir shared by several processes is a shared filesystem). array_record needs
  local files, so for a remote (``gs://``) workdir every process writes its own copy into
  a local cache, ``$TMPDIR/lcrec-examples/<hash of the workdir>/p<process_index>``
  (reused by a resumed run on the same machine; the dataset inside is keyed by a hash of
  its content).
  """
  if not fs.is_remote(workdir):
    return os.path.join(os.fspath(workdir), "train", "examples")
  import tempfile  # pylint: disable=g-import-not-at-top
  key = hashlib.sha256(os.fspath(workdir).rstrip("/").encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "lcrec-examples", key, f"p{int(process_index)}")


def model_dir(workdir: str) -> str:
  """The exported HF model directory."""
  return stage_dir(workdir, "train")


def rl_dir(workdir: str) -> str:
  """The rl stage's checkpoints, metrics and summary."""
  return stage_dir(workdir, "rl")


def rl_finished(workdir: str) -> bool:
  """Whether the rl stage finished: then eval evaluates its policy, not the SFT model."""
  return fs.exists(done_path(workdir, "rl"))


def results_path(workdir: str) -> str:
  return done_path(workdir, "eval")


def baseline_results_path(workdir: str) -> str:
  """Written after every baseline model (an interrupted stage keeps what finished)."""
  return fs.join(stage_dir(workdir, "baseline"), "results.json")


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def reads(stage: str, flat_config: Mapping[str, Any]) -> dict[str, Any]:
  """``{field: value}`` of the config fields ``stage`` reads (see READS)."""
  pats = READS[stage]
  keep = {k: v for k, v in flat_config.items() if k not in NO_EFFECT
          and any(k == p or (p.endswith(".") and k.startswith(p)) for p in pats)}
  return _jsonable(dict(sorted(keep.items())))


def _sha(data: bytes) -> str:
  return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_hash(manifest: Mapping[str, Any]) -> str:
  return _sha(json.dumps(manifest, sort_keys=True).encode())


def read_manifest(workdir: str, stage: str) -> dict[str, Any] | None:
  """The stage's manifest, or None when there is none (a corrupt one raises)."""
  path = manifest_path(workdir, stage)
  if not fs.exists(path):
    return None
  try:
    m = fs.read_json(path)
  except (ValueError, OSError) as e:
    raise WorkdirError(f"{path}: unreadable ({e})",
                       hint=f"--force={stage} rebuilds the stage") from None
  if m.get("format") != FORMAT:
    raise WorkdirError(f"{path}: manifest format {m.get('format')!r}, this lcrec-jax "
                       f"writes {FORMAT}", hint=f"--force={stage} or a new --workdir")
  return m


def _upstream_hashes(workdir: str, stage: str) -> dict[str, str | None]:
  out = {}
  for up in UPSTREAM[stage]:
    m = read_manifest(workdir, up)
    out[up] = manifest_hash(m) if m is not None else None
  return out


def _outputs(workdir: str, stage: str) -> dict[str, str]:
  out = {}
  for name in _OUTPUTS[stage]:
    p = fs.join(stage_dir(workdir, stage), name)
    if not fs.isfile(p):
      continue
    size = fs.path(p).stat().length if fs.is_remote(p) else os.path.getsize(p)
    out[name] = _sha(fs.read_bytes(p)) if size <= _HASH_LIMIT else f"size:{size}"
  return out


def _file_hash(path: str) -> str:
  """Content hash of an input file (over _HASH_LIMIT: size and mtime)."""
  st = os.stat(path)
  if st.st_size > _HASH_LIMIT:
    return f"size:{st.st_size} mtime_ns:{st.st_mtime_ns}"
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return "sha256:" + h.hexdigest()


def input_files(stage: str, flat_config: Mapping[str, Any]) -> dict[str, str]:
  """``{path: content hash}`` of the data files ``stage`` reads (and a provided index).

  Editing a data file in place then re-runs the stages that read it, as a changed
  config field does. Local files only (a ``gs://`` data path is not read by the loaders).
  """
  from lcrec_jax.data import loaders  # the data package imports the whole loader stack
  data = {k[len("data."):]: v for k, v in flat_config.items() if k.startswith("data.")}
  files = loaders.data_files(data)
  if (stage == "index" and flat_config.get("index.source") == "file"
      and flat_config.get("index.path") and os.path.isfile(flat_config["index.path"])):
    files.append(flat_config["index.path"])
  return {os.path.abspath(p): _file_hash(p) for p in files}


def write_manifest(workdir: str, stage: str, flat_config: Mapping[str, Any],
                   finished: bool) -> None:
  """Writes ``<stage dir>/MANIFEST.json`` (process 0): inputs, and outputs once finished."""
  if not fs.is_primary():  # one writer; the others need not hash the outputs
    return
  m = {"stage": stage, "format": FORMAT, "reads": reads(stage, flat_config),
       "inputs": input_files(stage, flat_config),
       "upstream": _upstream_hashes(workdir, stage)}
  if finished:
    m["outputs"] = _outputs(workdir, stage)
    m["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
  fs.makedirs(stage_dir(workdir, stage))
  fs.write_json(manifest_path(workdir, stage), m, indent=2)


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  lines = []
  for k in sorted(set(old) | set(new)):
    if old.get(k, "<unset>") != new.get(k, "<unset>"):
      lines.append(f"{k} {json.dumps(old.get(k, '<unset>'))} -> "
                   f"{json.dumps(new.get(k, '<unset>'))}")
  return lines


def _changes(workdir: str, stage: str, manifest: Mapping[str, Any],
             flat_config: Mapping[str, Any]) -> list[str]:
  """What differs between a manifest and the inputs the stage would have now."""
  out = _diff(manifest.get("reads", {}), reads(stage, flat_config))
  if "inputs" in manifest:  # manifests written before input hashes: not checked
    old, new = manifest["inputs"], input_files(stage, flat_config)
    for path in sorted(set(old) | set(new)):
      if path not in new:
        out.append(f"data file {path} no longer read")
      elif path not in old:
        out.append(f"data file {path} newly read")
      elif old[path] != new[path]:
        out.append(f"data file {path} changed")
  now = _upstream_hashes(workdir, stage)
  for up, h in now.items():
    if manifest.get("upstream", {}).get(up) != h:
      out.append(f"upstream {up} was rebuilt")
  return out


@dataclasses.dataclass(frozen=True)
class Step:
  """One stage's decision: run it (from scratch or resuming) or reuse its outputs.

  ``unchecked``: reused without a manifest (an older workdir): its inputs are unknown.
  """
  stage: str
  run: bool
  fresh: bool
  reason: str
  unchecked: bool = False

  def line(self) -> str:
    what = ("run from scratch" if self.fresh else "run") if self.run else "reuse"
    return f"{self.stage:<9}{what:<17}{self.reason}"


def plan(workdir: str, flat_config: Mapping[str, Any], stages: Sequence[str],
         force: Sequence[str]) -> list[Step]:
  """The decision for each of ``stages`` (pipeline order); see the module docstring.

  Upstream stages not in ``stages`` must be finished with the inputs of this config,
  else :class:`WorkdirError`.
  """
  steps, running = [], set()
  for stage in STAGES:
    needed_by = [s for s in stages if stage in UPSTREAM[s]]
    if stage not in stages and not needed_by:
      continue
    done = fs.exists(done_path(workdir, stage))
    manifest = read_manifest(workdir, stage)
    changes = _changes(workdir, stage, manifest, flat_config) if manifest else []
    if stage not in stages:  # an input of a stage that runs: must be current
      optional = all(stage in OPTIONAL_UPSTREAM.get(s, ()) for s in needed_by)
      if optional and not done:  # e.g. no rl stage: eval evaluates the SFT model
        continue
      rerun = [u for u in UPSTREAM[stage] if u in running]
      if optional and rerun:
        raise WorkdirError(
            f"{stage_dir(workdir, stage)} was built on the {rerun[0]} stage that runs again "
            f"now, and {needed_by[0]} would use it", hint=f"add {stage} to --stages to "
            f"rebuild it, or remove {stage_dir(workdir, stage)}")
      if not done:
        raise WorkdirError(f"{stage_dir(workdir, stage)} is not finished, and "
                           f"{needed_by[0]} needs it", hint=f"add {stage} to --stages")
      if changes:
        raise WorkdirError(
            f"{stage_dir(workdir, stage)} was built from other inputs than this config "
            f"({'; '.join(changes[:3])}), and {needed_by[0]} would use it",
            hint=f"add {stage} to --stages to rebuild it, or use another --workdir")
      continue
    ups = [u for u in UPSTREAM[stage] if u in running]
    if ups:
      step = Step(stage, True, True, f"upstream {ups[0]} runs")
    elif (manifest is not None and changes and not done
          and all(c.split(" ", 1)[0] in RESUMABLE for c in changes)):
      step = Step(stage, True, False, "not finished; resumes from its checkpoints with "
                  + "; ".join(changes))
    elif manifest is not None and changes:
      step = Step(stage, True, True, "inputs changed: " + "; ".join(changes[:4])
                  + (f" (+{len(changes) - 4} more)" if len(changes) > 4 else ""))
    elif stage in force:
      step = Step(stage, True, False, f"--force={stage}" + (
          " (resumes from its checkpoints)" if stage in ("index", "train", "rl") else ""))
    elif not done:
      step = Step(stage, True, False, "not finished" + (
          "; resumes from its checkpoints" if manifest is not None else ""))
    elif manifest is None:
      step = Step(stage, False, False,
                  f"finished, but no MANIFEST.json (an older lcrec-jax): its inputs are not "
                  f"checked; --force={stage} rebuilds it", unchecked=True)
    else:
      step = Step(stage, False, False, "finished with the same inputs")
    if step.run:
      running.add(stage)
    steps.append(step)
  return steps


def clear_stage(workdir: str, stage: str) -> None:
  """Removes the stage's directories (outputs and checkpoints), process 0 only."""
  if fs.is_primary():
    for d in _STATE_DIRS[stage]:
      p = fs.path(fs.join(workdir, d))
      if p.exists():
        logging.info("removing %s (built from other inputs)", p)
        p.rmtree()
  fs.barrier(f"clear_{stage}")
