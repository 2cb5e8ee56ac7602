"""The run directory: where each stage's outputs live, and what they were built from.

Layout (:class:`Layout`, the one place that knows it; local or ``gs://``)::

  <workdir>/.lock                  held by the running main (pid, host, start time)
  <workdir>/config.json            the resolved config of the last accepted run
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
the stage's directories belong to those inputs; the stage's DONE marker is removed then)
and again when it ends, with the size (and, up to 64 MiB, the content hash) of every
output the downstream stages read (:data:`_OUTPUTS`: ``index/index.json``, the whole
``model/``, ``train/tokenizer/``, the newest train checkpoint, ...). A downstream stage
records the hash of each upstream manifest, so a re-run upstream (new outputs, new
finish time) makes it stale. :func:`plan` decides, before any work, which stages run:

* an upstream stage runs: runs from scratch;
* named in ``--force``: runs from scratch (the start-over: its outputs and checkpoints
  are removed first);
* its manifest is unreadable: counted as not finished, runs (a warning names the file);
* not finished, and only fields of :data:`RESUMABLE` changed (a lower ``train.lr`` after
  a divergence stopped training): runs, resuming from its newest healthy checkpoint
  (:mod:`lcrec_jax.train.divergence`);
* the recorded inputs differ from the config / the data files' contents / the upstream
  manifests: runs from scratch (its old directories are removed first);
* finished, but an output no longer matches its manifest (size first, then content
  hash): runs again, resuming from its checkpoints, with a warning naming the file;
  everything downstream runs from scratch;
* not finished (no DONE, or a manifest without ``finished``): runs (an interrupted run
  with the same inputs resumes);
* finished with the same inputs and outputs: reused.

A stage outside ``--stages`` that a selected one reads must be finished, current and
undamaged, else one :class:`WorkdirError` says which and why. A finished stage without a
manifest (a workdir from before manifests) is reused with a warning that its inputs
cannot be checked; ``--force=<stage>`` rebuilds it.

``main`` holds ``<workdir>/.lock`` (:mod:`lcrec_jax.lock`) for the whole run, removes a
killed run's leftovers (:func:`remove_leftovers`) and writes ``config.json`` only after
the plan accepted the run; read-only consumers use :func:`resolved_config`.
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
from lcrec_jax.pipeline import stages as _stages

FORMAT = 1
STAGES = _stages.NAMES
UPSTREAM = {n: st.upstream for n, st in _stages.REGISTRY.items()}
# Upstream stages a stage uses only when they ran: eval evaluates the RL policy when the
# rl stage finished, the SFT model otherwise (a never-run rl stage is not required).
OPTIONAL_UPSTREAM = {n: st.optional_upstream for n, st in _stages.REGISTRY.items()
                     if st.optional_upstream}
# The directory that holds each stage's DONE and MANIFEST.json, and what marks it done.
_STAGE_DIR = {n: st.dir for n, st in _stages.REGISTRY.items()}
_DONE = {n: st.done for n, st in _stages.REGISTRY.items()}
# Directories a from-scratch run removes first (checkpoints included).
_STATE_DIRS = {n: st.state_dirs for n, st in _stages.REGISTRY.items()}
# Outputs whose sizes (and content hashes, files up to _OUTPUT_HASH_LIMIT) go into the
# manifest when the stage finishes and are checked before it is reused: what the
# downstream stages and `recommend` read (Stage.outputs).
_OUTPUTS = {n: st.output_patterns for n, st in _stages.REGISTRY.items()}
_HASH_LIMIT = 1 << 28  # input files
_OUTPUT_HASH_LIMIT = 1 << 26  # outputs: bigger ones are checked by size (plan-time cost)
# What an unfinished stage's re-run keeps (the plan line says it).
_RESUMES = {n: st.resumes for n, st in _stages.REGISTRY.items() if st.resumes}
# Config fields each stage reads ("x." = the whole section, so a key added to a section
# counts unless listed in NO_EFFECT).
READS: dict[str, tuple[str, ...]] = {n: st.reads for n, st in _stages.REGISTRY.items()}
# Fields that change only logging, checkpoint cadence, monitoring or sharding, not a
# stage's outputs: changing them reuses the stage.
NO_EFFECT = frozenset((
    "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint",
    "train.log_every", "train.progress_log_s", "train.eval_every",
    "train.peak_flops_per_device", "train.distributed", "train.tensorboard",
    "train.valid_users", "eval.quick_users", "eval.shard",
    "rl.checkpoint_every", "rl.keep_checkpoints", "rl.eval_every", "rl.rollout_batch_size"))

# Fields added after manifests were already written, with the value that reproduces the
# behaviour before they existed: a manifest without the field reads as that value, so a
# default-off option does not re-run finished stages of older workdirs.
ADDED_DEFAULTS: dict[str, Any] = {
    "tasks.pack_length": 0, "tasks.pack_rows": "fixed",              # issue 23 levers
    "tasks.seqrec_windows": False,
    "rqvae.cf_weight": 0.0, "rqvae.cf_embeddings": "", "rqvae.diversity_weight": 0.0,
    "rqvae.diversity_clusters": 10,
    "rl.reward_collab": 0.0, "rl.collab_sasrec": "",                 # issue 21: collab reward
}

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


class Layout:
  """Every path of a run directory (local or ``gs://``); the one place that knows them.

  ``Layout(workdir).index_json`` etc.; stages, ``recommend`` and the server take their
  paths from here, the library is handed the paths (an ``out_dir``, a ``ckpt_dir``).
  """

  def __init__(self, workdir: str):
    self.root = os.fspath(workdir)
    j = lambda *p: fs.join(self.root, *p)
    self.lock = j(".lock")
    self.config_json = j("config.json")
    self.logs_dir = j("logs")
    self.cache_dir = j("cache")
    # index stage
    self.index_dir = j("index")
    self.index_json = j("index", "index.json")
    self.index_report = j("index", "report.json")
    self.index_plot = j("index", "codes.png")
    self.index_metrics = j("index", "metrics.jsonl")
    self.index_done = j("index", "DONE")
    self.index_checkpoints = j("index", "checkpoints")
    # train stage
    self.train_dir = j("train")
    self.train_checkpoints = j("train", "checkpoints")
    self.tokenizer_dir = j("train", "tokenizer")
    self.model_dir = j("model")
    self.model_done = j("model", "DONE")
    # rl stage
    self.rl_dir = j("rl")
    self.rl_checkpoints = j("rl", "checkpoints")
    self.rl_summary = j("rl", "summary.json")
    self.rl_done = j("rl", "DONE")
    # eval and baseline stages
    self.eval_dir = j("eval")
    self.results = j("eval", "results.json")
    self.baselines_dir = j("baselines")
    self.baseline_results = j("baselines", "results.json")
    self.baseline_done = j("baselines", "DONE")

  def stage_dir(self, stage: str) -> str:
    """The directory of ``stage``'s DONE marker and MANIFEST.json."""
    return fs.join(self.root, _STAGE_DIR[stage])

  def done_path(self, stage: str) -> str:
    """The file whose presence means ``stage`` finished."""
    return fs.join(self.stage_dir(stage), _DONE[stage])

  def manifest_path(self, stage: str) -> str:
    return fs.join(self.stage_dir(stage), "MANIFEST.json")

  def state_dirs(self, stage: str) -> list[str]:
    """What a from-scratch run of ``stage`` removes (outputs and checkpoints)."""
    return [fs.join(self.root, d) for d in _STATE_DIRS[stage]]

  def rel(self, path: str) -> str:
    """``path`` relative to the workdir (for messages); remote paths unchanged."""
    return path if fs.is_remote(self.root) else os.path.relpath(path, self.root)

  def examples_dir(self, process_index: int = 0) -> str:
    """Local directory for the train stage's tokenized examples (array_record, grain).

    ``<workdir>/train/examples`` for a local workdir (one copy, written by process 0: a
    local workdir shared by several processes is a shared filesystem). array_record needs
    local files, so for a remote (``gs://``) workdir every process writes its own copy
    into a local cache, ``$TMPDIR/lcrec-examples/<hash of the workdir>/p<process_index>``
    (reused by a resumed run on the same machine; the dataset inside is keyed by a hash
    of its content).
    """
    if not fs.is_remote(self.root):
      return os.path.join(self.root, "train", "examples")
    import tempfile  # pylint: disable=g-import-not-at-top
    key = hashlib.sha256(self.root.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "lcrec-examples", key, f"p{int(process_index)}")


def stage_dir(workdir: str, stage: str) -> str:
  """The directory of ``stage``'s DONE marker and MANIFEST.json."""
  return Layout(workdir).stage_dir(stage)


def done_path(workdir: str, stage: str) -> str:
  """The file whose presence means ``stage`` finished."""
  return Layout(workdir).done_path(stage)


def manifest_path(workdir: str, stage: str) -> str:
  return Layout(workdir).manifest_path(stage)


def examples_dir(workdir: str, process_index: int = 0) -> str:
  """:meth:`Layout.examples_dir`."""
  return Layout(workdir).examples_dir(process_index)


def rl_finished(workdir: str) -> bool:
  """Whether the rl stage finished: then eval evaluates its policy, not the SFT model."""
  return fs.exists(Layout(workdir).rl_done)


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
    if not isinstance(m, dict):
      raise ValueError("not a JSON object")
  except (ValueError, OSError) as e:
    raise WorkdirError(f"{path}: unreadable ({e})",
                       hint=f"--force={stage} rebuilds the stage") from None
  if m.get("format") != FORMAT:
    raise WorkdirError(f"{path}: manifest format {m.get('format')!r}, this lcrec-jax "
                       f"writes {FORMAT}", hint=f"--force={stage} or a new --workdir")
  return m


def _try_manifest(workdir: str, stage: str) -> tuple[dict[str, Any] | None, str | None]:
  """``(manifest, None)``, or ``(None, why)`` when it exists but cannot be used."""
  try:
    return read_manifest(workdir, stage), None
  except WorkdirError as e:
    return None, str(e)


def _upstream_hashes(workdir: str, stage: str) -> dict[str, str | None]:
  out = {}
  for up in UPSTREAM[stage]:
    m, _ = _try_manifest(workdir, up)
    out[up] = manifest_hash(m) if m is not None else None
  return out


def _size(p: str) -> int:
  return fs.path(p).stat().length if fs.is_remote(p) else os.path.getsize(p)


def output_files(workdir: str, stage: str) -> dict[str, str]:
  """``{path relative to the workdir: path}`` of the outputs :data:`_OUTPUTS` names."""
  out = {}
  for rel in _OUTPUTS.get(stage, ()):
    if "{latest}" in rel:
      parent = fs.join(workdir, rel.split("{latest}")[0])
      steps = [int(n) for n in fs.listdir(parent) if n.isdigit()] if fs.isdir(parent) else []
      if not steps:
        continue
      rel = rel.replace("{latest}", str(max(steps)))
    p = fs.join(workdir, rel)
    if not rel.endswith("/"):
      if fs.isfile(p):
        out[rel] = p
      continue
    if not fs.isdir(p):
      continue
    for sub in _walk_files(p):
      name = sub.rsplit("/", 1)[-1]
      if name == "MANIFEST.json" or name.startswith(".tmp-"):
        continue
      out[rel + sub] = fs.join(p, sub)
  return out


def _walk_files(directory: str, prefix: str = "") -> list[str]:
  """Relative paths (``a/b``) of every file under ``directory``, sorted."""
  out = []
  for name in fs.listdir(fs.join(directory, prefix) if prefix else directory):
    sub = f"{prefix}{name}"
    if fs.isdir(fs.join(directory, sub)):
      out.extend(_walk_files(directory, sub + "/"))
    else:
      out.append(sub)
  return out


def _outputs(workdir: str, stage: str) -> dict[str, dict[str, Any]]:
  """``{relative path: {"size", "sha256" (files up to _OUTPUT_HASH_LIMIT)}}``."""
  out = {}
  for rel, p in output_files(workdir, stage).items():
    size = _size(p)
    rec: dict[str, Any] = {"size": size}
    if size <= _OUTPUT_HASH_LIMIT:
      rec["sha256"] = _sha(fs.read_bytes(p))
    out[rel] = rec
  return out


def _mb(n: int) -> str:
  return f"{n / 1e6:.1f} MB" if n >= 10_000_000 else f"{n:,} bytes"


def damaged_output(workdir: str, stage: str, manifest: Mapping[str, Any]) -> str | None:
  """What differs between a finished stage's outputs and its manifest, or None.

  Sizes first (cheap); content hashes of the files the manifest hashed. Manifests of
  older lcrec-jax (``{name in the stage dir: "sha256:..." | "size:N"}``) are checked too.
  """
  for name, rec in (manifest.get("outputs") or {}).items():
    if isinstance(rec, str):  # older manifests: names in the stage dir
      p = fs.join(stage_dir(workdir, stage), name)
      want_size = int(rec[5:]) if rec.startswith("size:") else None
      want_hash = rec if rec.startswith("sha256:") else None
    else:
      p = fs.join(workdir, name)
      want_size, want_hash = rec.get("size"), rec.get("sha256")
    if not fs.isfile(p):
      return f"{p} is missing"
    size = _size(p)
    if want_size is not None and size != want_size:
      return f"{p} is {_mb(size)}, {_mb(want_size)} when {stage} finished"
    if want_hash is not None and size <= _HASH_LIMIT and _sha(fs.read_bytes(p)) != want_hash:
      return f"{p} changed since {stage} finished (content hash)"
  return None


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
  cf = flat_config.get("rqvae.cf_embeddings")
  if stage == "index" and (flat_config.get("rqvae.cf_weight") or 0) > 0 and cf and (
      os.path.isfile(cf)):
    files.append(cf)  # LETTER's collaborative embeddings
  sas = flat_config.get("rl.collab_sasrec")
  if stage == "rl" and (flat_config.get("rl.reward_collab") or 0) > 0 and sas and (
      os.path.isfile(sas)):
    files.append(sas)  # the SASRec of the collaborative reward
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
  old = {**{k: v for k, v in ADDED_DEFAULTS.items() if k in new}, **old}
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
  ``warning``: a problem the run repairs (a damaged output, an unreadable manifest),
  logged as a warning before the stage.
  """
  stage: str
  run: bool
  fresh: bool
  reason: str
  unchecked: bool = False
  warning: str | None = None

  def line(self) -> str:
    what = ("run from scratch" if self.fresh else "run") if self.run else "reuse"
    return f"{self.stage:<9}{what:<17}{self.reason}"


@dataclasses.dataclass(frozen=True)
class _State:
  """What the workdir says about one stage before the plan decides."""
  done: bool               # DONE marker present and the manifest (if any) says finished
  manifest: dict[str, Any] | None
  unreadable: str | None   # why an existing manifest cannot be used
  damaged: str | None      # a recorded output that no longer matches


def _stage_state(workdir: str, stage: str) -> _State:
  manifest, unreadable = _try_manifest(workdir, stage)
  done = (fs.exists(done_path(workdir, stage)) and unreadable is None
          and (manifest is None or "finished" in manifest))
  damaged = damaged_output(workdir, stage, manifest) if done and manifest else None
  return _State(done and damaged is None, manifest, unreadable, damaged)


def _resume_note(workdir: str, stage: str) -> str:
  """What an unfinished stage's re-run resumes from (the plan's words)."""
  note = _RESUMES.get(stage, "")
  if stage == "train":
    from lcrec_jax.train import divergence  # pylint: disable=g-import-not-at-top
    choice = divergence.choose(Layout(workdir).train_dir)
    if choice is not None:
      return choice.describe()
  return note


def _needed_input(workdir: str, stage: str, st: _State, changes: list[str],
                  needed_by: str) -> None:
  """A stage outside --stages that ``needed_by`` reads must be finished and current."""
  where = stage_dir(workdir, stage)
  if st.unreadable:
    raise WorkdirError(f"{needed_by} needs {stage}, but {st.unreadable}",
                       hint=f"add {stage} to --stages to rebuild it")
  if st.damaged:
    raise WorkdirError(f"{needed_by} needs {stage}, but {st.damaged}",
                       hint=f"add {stage} to --stages to rebuild it")
  if not st.done:
    raise WorkdirError(f"{where} is not finished, and {needed_by} needs it",
                       hint=f"add {stage} to --stages")
  if changes:
    raise WorkdirError(
        f"{where} was built from other inputs than this config "
        f"({'; '.join(changes[:3])}), and {needed_by} would use it",
        hint=f"add {stage} to --stages to rebuild it, or use another --workdir")


def _decide(workdir: str, stage: str, st: _State, changes: list[str], ups: list[str],
            forced: bool) -> Step:
  """The step of a selected stage (rules in the module docstring, in this order)."""
  manifest, done = st.manifest, st.done
  if ups:
    return Step(stage, True, True, f"upstream {ups[0]} runs")
  if forced:
    return Step(stage, True, True, f"--force={stage} (its outputs and checkpoints are "
                "removed first)")
  if st.unreadable:
    why = f"{st.unreadable}: counted as not finished"
    return Step(stage, True, False, why, warning=why)
  if (manifest is not None and changes and not done
      and all(c.split(" ", 1)[0] in RESUMABLE for c in changes)):
    note = _resume_note(workdir, stage) or "resumes from its checkpoints"
    return Step(stage, True, False, f"not finished; {note} with " + "; ".join(changes))
  if manifest is not None and changes:
    return Step(stage, True, True, "inputs changed: " + "; ".join(changes[:4])
                + (f" (+{len(changes) - 4} more)" if len(changes) > 4 else ""))
  if st.damaged:
    why = f"finished, but {st.damaged}: runs again"
    return Step(stage, True, False, why, warning=why)
  if not done:
    note = _resume_note(workdir, stage) if manifest is not None else ""
    return Step(stage, True, False, "not finished" + (f"; {note}" if note else ""))
  if manifest is None:
    return Step(stage, False, False,
                f"finished, but no MANIFEST.json (an older lcrec-jax): its inputs are not "
                f"checked; --force={stage} rebuilds it", unchecked=True)
  return Step(stage, False, False, "finished with the same inputs")


def plan(workdir: str, flat_config: Mapping[str, Any], stages: Sequence[str],
         force: Sequence[str]) -> list[Step]:
  """The decision for each of ``stages`` (pipeline order); see the module docstring.

  Upstream stages not in ``stages`` must be finished with the inputs of this config,
  and their outputs as recorded, else :class:`WorkdirError`.
  """
  steps, running = [], set()
  for stage in STAGES:
    needed_by = [s for s in stages if stage in UPSTREAM[s]]
    if stage not in stages and not needed_by:
      continue
    st = _stage_state(workdir, stage)
    changes = (_changes(workdir, stage, st.manifest, flat_config)
               if st.manifest else [])
    if stage not in stages:  # an input of a stage that runs: must be current
      optional = all(stage in OPTIONAL_UPSTREAM.get(s, ()) for s in needed_by)
      if optional and not st.done:  # e.g. no rl stage: eval evaluates the SFT model
        continue
      rerun = [u for u in UPSTREAM[stage] if u in running]
      if optional and rerun:
        raise WorkdirError(
            f"{stage_dir(workdir, stage)} was built on the {rerun[0]} stage that runs again "
            f"now, and {needed_by[0]} would use it", hint=f"add {stage} to --stages to "
            f"rebuild it, or remove {stage_dir(workdir, stage)}")
      _needed_input(workdir, stage, st, changes, needed_by[0])
      continue
    step = _decide(workdir, stage, st, changes, [u for u in UPSTREAM[stage] if u in running],
                   stage in force)
    if step.run:
      running.add(stage)
    steps.append(step)
  return steps


def start_stage(workdir: str, stage: str) -> None:
  """Before a stage runs: its DONE marker goes (process 0), so a run killed from here on
  leaves the stage unfinished whatever the old manifest said."""
  fs.remove(done_path(workdir, stage))


def clear_stage(workdir: str, stage: str) -> None:
  """Removes the stage's directories (outputs and checkpoints), process 0 only."""
  if fs.is_primary():
    for d in Layout(workdir).state_dirs(stage):
      p = fs.path(d)
      if p.exists():
        logging.info("removing %s (built from other inputs)", p)
        p.rmtree()
  fs.barrier(f"clear_{stage}")


def remove_leftovers(workdir: str) -> list[str]:
  """Removes what killed runs leave behind (local workdirs; the caller holds the lock):
  ``.tmp-*`` files of interrupted atomic writes (:mod:`lcrec_jax.fs`) and TFDS's
  ``incomplete.*`` directories of an interrupted ``download_and_prepare``. Returns them."""
  if fs.is_remote(workdir) or not os.path.isdir(workdir):
    return []
  import shutil  # pylint: disable=g-import-not-at-top
  removed = []
  for root, dirs, files in os.walk(workdir):
    for d in list(dirs):
      if d.startswith("incomplete."):
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        dirs.remove(d)
        removed.append(os.path.join(root, d))
    for f in files:
      if f.startswith(".tmp-"):
        try:
          os.remove(os.path.join(root, f))
          removed.append(os.path.join(root, f))
        except OSError:
          pass
  if removed:
    logging.info("removed %d leftover(s) of an interrupted run: %s", len(removed),
                 ", ".join(os.path.relpath(p, workdir) for p in removed[:5])
                 + (" ..." if len(removed) > 5 else ""))
  return removed


def _set_dotted(config: Any, key: str, value: Any) -> None:
  import ml_collections  # pylint: disable=g-import-not-at-top
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node or node[part] is None:
      node[part] = ml_collections.ConfigDict()
    node = node[part]
  node[leaf] = value


def resolved_config(workdir: str, stages: Sequence[str] = ("index", "train")
                    ) -> tuple[Any, list[str]]:
  """The run config a read-only consumer (``recommend``, a server) should use.

  ``<workdir>/config.json`` (the config of the last accepted run) with every field the
  finished ``stages`` read replaced by the value their manifests recorded: the model
  and index were built from those, whatever a later run or a hand edit left in
  config.json. Returns ``(ConfigDict, differences)``, ``differences`` naming each field
  where config.json disagreed (``"tasks.max_history 2 in config.json, 20 in
  model/MANIFEST.json"``).

  Raises:
    WorkdirError: config.json is missing or not a JSON object (one line naming it), or a
      manifest is unreadable.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = Layout(workdir).config_json
  if not fs.isfile(path):
    raise WorkdirError(f"{path} not found: {workdir} is not a run directory",
                       hint="run python -m lcrec_jax.main --config=... --workdir=... first")
  try:
    raw = fs.read_json(path)
    if not isinstance(raw, dict):
      raise ValueError("not a JSON object")
  except (ValueError, UnicodeDecodeError) as e:
    raise WorkdirError(f"{path}: not a valid run config ({e})",
                       hint="re-run python -m lcrec_jax.main with the run's --config and "
                            f"--workdir={workdir}: it rewrites the file") from None
  config = ml_collections.ConfigDict(raw)
  from lcrec_jax.pipeline import spec  # pylint: disable=g-import-not-at-top
  for key in spec.KEYS:  # an older config.json lacks later keys: the spec's defaults
    if _get_dotted(config, key.name) is _MISSING:
      _set_dotted(config, key.name, ml_collections.ConfigDict(key.default)
                  if isinstance(key.default, Mapping) else key.default)
  have = {k: _jsonable(v) for k, v in _flat_json(raw).items()}
  diffs = []
  for stage in stages:
    m = read_manifest(workdir, stage)
    if m is None:
      continue
    for key, value in m.get("reads", {}).items():
      if have.get(key, "<unset>") != value:
        if key in have:
          rel = os.path.relpath(manifest_path(workdir, stage), workdir) if not \
              fs.is_remote(workdir) else manifest_path(workdir, stage)
          diffs.append(f"{key} {json.dumps(have[key])} in config.json, "
                       f"{json.dumps(value)} in {rel}")
        _set_dotted(config, key, value)
        have[key] = value
  return config, diffs


_MISSING = object()


def _get_dotted(config: Any, key: str) -> Any:
  node = config
  for part in key.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


def _flat_json(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Dotted leaves of a nested dict; a dict that the spec declares as a mapping value
  (e.g. ``tasks.sample_nums``) is compared as a whole where a manifest records it."""
  out = {}
  for k, v in d.items():
    key = prefix + k
    out[key] = v
    if isinstance(v, Mapping):
      out.update(_flat_json(v, key + "."))
  return out
