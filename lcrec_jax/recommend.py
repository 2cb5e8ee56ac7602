"""Top-K items for a history, from a finished run.

  python -m lcrec_jax.recommend --workdir=runs/ml100k --history="Toy Story; Heat; 50"
  python -m lcrec_jax.recommend --workdir=runs/ml100k --history="Cape Fear (1991); 50" \
      --k=5 --json

A history is ``;``-separated, oldest first; each entry is an item id or a title. An entry
matches, in this order: an item id exactly (also as ``[id]``); a title, or ``Title (year)``,
equal up to case and spacing; a title containing the text (case-insensitive); a close
spelling (difflib).
Several items at the first stage that matches is an error listing them (use the id or
``Title (year)``). Items the history holds are left out of the answer unless
``--include_history``.

A finished run directory holds (written by ``lcrec_jax.main``):

* ``config.json``: the run config (``ConfigDict.to_json()``);
* ``index/``: the index stage outputs (``index.json``, ``report.json``, ``DONE``);
* ``model/DONE``: the train stage finished;
* ``train/checkpoints/<step>/`` (or, when the rl stage finished, ``rl/checkpoints/``): the
  params, restored as the eval stage restores them
  (:func:`lcrec_jax.pipeline.stages.eval.load_trained`: the same policy, the recipe's
  ``config.mesh`` over every device, sharded by ``config.mesh.axis_rules``, in
  ``train.compute_dtype``), so an answer is the eval stage's decode of that history;
* ``model/``: the HF-style export (``config.json``, ``model.safetensors``, ``tokenizer.json``
  with the item-code tokens), read only with ``--params=export`` (one device): for a
  workdir whose checkpoints were deleted to save space (they hold the optimizer state,
  2x the params). On an rl run the export is the SFT model, not the rl policy.
"""

from __future__ import annotations

import difflib
import json
import math
from typing import Any, NamedTuple, Sequence

from absl import app, flags
import ml_collections
import numpy as np

from lcrec_jax import cli, fs
from lcrec_jax.errors import UserError
from lcrec_jax.data.dataset import Dataset, Item
from lcrec_jax.index.item_index import ItemIndex

MAX_LISTED = 10
PARAMS_SOURCES = ("checkpoint", "export")  # --params
FUZZY_CUTOFF = 0.75
SUGGEST_CUTOFF = 0.45


class RecommendError(UserError, ValueError):
  """A user-facing problem: bad history, unknown item, unfinished run."""


class FinishedRun(NamedTuple):
  """What :func:`load_finished_run` returns."""

  model: Any            # lcrec_jax.llm.model.Llama
  params: Any           # its parameter pytree
  tokenizer: Any        # lcrec_jax.llm.tokenizer.LCRecTokenizer with the code tokens
  dataset: Dataset
  index: ItemIndex
  config: ml_collections.ConfigDict
  mesh: Any = None      # the ('data', 'fsdp', 'tensor') mesh the params live on; None: export
  source: str = "export"  # "train" / "rl" (the checkpoint eval evaluates) or "export"
  params_path: str = ""   # the checkpoint directory or the export directory
  step: int | None = None  # the checkpoint's step


def describe_params(run: FinishedRun) -> str:
  """One line: where ``run``'s params come from (the server's start-up log)."""
  if run.source == "export":
    return (f"the HF export {run.params_path} on one device (--params=export; the eval "
            "stage evaluates the checkpoint instead)")
  what = "rl policy" if run.source == "rl" else "train checkpoint"
  return (f"{what} step {run.step} from {run.params_path}, on mesh "
          f"{dict(run.mesh.shape)} ({run.config.train.compute_dtype}), as the eval stage "
          "restores it")


def run_paths(workdir: str) -> dict[str, str]:
  """Files of a finished run that recommend reads (local or ``gs://``; from the
  workdir :class:`~lcrec_jax.pipeline.workdir.Layout`)."""
  from lcrec_jax.pipeline.workdir import Layout  # pylint: disable=g-import-not-at-top
  lay = Layout(workdir)
  return {"config": lay.config_json, "model": lay.model_dir, "model_done": lay.model_done,
          "index_done": lay.index_done}


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the finished model and index were built from.

  ``config.json`` (the last accepted ``main`` run) with the fields the index and train
  stages read taken from their manifests (:func:`lcrec_jax.pipeline.workdir.resolved_config`): a
  later run with other values, or a hand edit, cannot change what the model is asked. A
  field where config.json disagrees is named in one warning line.

  Raises:
    RecommendError: config.json is not valid JSON, or a manifest is unreadable.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  from lcrec_jax.pipeline import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from lcrec_jax.errors import WorkdirError  # pylint: disable=g-import-not-at-top
  try:
    config, diffs = workdir_lib.resolved_config(workdir, ("index", "train"))
  except WorkdirError as e:
    raise RecommendError(str(e), hint=e.hint) from None
  if diffs:
    logging.warning("%s/config.json disagrees with the finished stages (%s%s); using the "
                    "values the model was built with", workdir, diffs[0],
                    f"; +{len(diffs) - 1} more" if len(diffs) > 1 else "")
  return config


def load_finished_run(workdir: str, params: str = "checkpoint") -> FinishedRun:
  """Loads the run config, dataset, item index, model, params and tokenizer of ``workdir``.

  ``params``: ``"checkpoint"`` (the eval stage's params, restored onto the recipe's mesh:
  :func:`restore_checkpoint`) or ``"export"`` (the HF export ``model/``, one device).

  Raises:
    RecommendError: ``workdir`` is not a run directory, its index or model is not
      finished, or it has no checkpoint (names the missing file and the command that
      makes it).
    lcrec_jax.runtime.finite.NonFiniteError: the params hold NaN/inf values.
  """
  if params not in PARAMS_SOURCES:
    raise RecommendError(f"--params={params}: must be one of {', '.join(PARAMS_SOURCES)}")
  paths = run_paths(workdir)
  if not fs.isdir(workdir):
    raise RecommendError(f"--workdir={workdir}: no such directory")
  if not fs.isfile(paths["config"]):
    raise RecommendError(f"{paths['config']} not found: {workdir} is not a run directory "
                         "(run python -m lcrec_jax.main --config=... --workdir=... first)")
  for key, what in (("index_done", "index"), ("model_done", "model")):
    if not fs.isfile(paths[key]):
      raise RecommendError(
          f"{paths[key]} not found: {workdir} has no finished {what}; run "
          f"python -m lcrec_jax.main --config=<recipe> --workdir={workdir} to finish it")
  config = run_config(workdir)
  # Heavy imports only once the run is known to be usable.
  from lcrec_jax.data.loaders import load_dataset  # pylint: disable=g-import-not-at-top
  from lcrec_jax.pipeline.stages.index import load_index  # pylint: disable=g-import-not-at-top

  dataset = load_dataset(config.data)
  index = load_index(workdir, dataset)
  if params == "export":
    return _load_export(workdir, paths["model"], config, dataset, index)
  return restore_checkpoint(workdir, config, dataset, index)


def restore_checkpoint(workdir: str, config: ml_collections.ConfigDict, dataset: Dataset,
                       index: ItemIndex) -> FinishedRun:
  """The run with the eval stage's params: :func:`~lcrec_jax.pipeline.stages.eval.load_trained`
  (the rl policy when the rl stage finished, else the newest train checkpoint; on
  ``config.mesh`` over every device).

  Raises:
    RecommendError: no finished checkpoint (names it, the command that makes it and
      ``--params=export``), or ``config.mesh`` does not fit the devices here.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from lcrec_jax.eval import restore as restore_lib  # pylint: disable=g-import-not-at-top
  from lcrec_jax.pipeline.stages import eval as eval_stage  # pylint: disable=g-import-not-at-top
  from lcrec_jax.pipeline.workdir import Layout, absolute  # pylint: disable=g-import-not-at-top
  from lcrec_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  workdir = absolute(workdir)  # orbax restores only absolute paths; `--workdir=runs/x` is usual
  lay = Layout(workdir)
  source = eval_stage.policy_source(workdir)
  ckpt_dir = lay.rl_checkpoints if source == "rl" else lay.train_checkpoints
  step = restore_lib.latest_checkpoint_step(ckpt_dir)
  if step is None:
    stages = "index,train,rl,eval" if source == "rl" else "index,train,eval"
    raise RecommendError(
        f"{ckpt_dir}: no finished checkpoint (the params the eval stage evaluates); make it "
        f"with python -m lcrec_jax.main --config=<recipe> --workdir={workdir} "
        f"--stages={stages} --force={source}, or pass --params=export to use the HF export "
        f"{lay.model_dir}")
  m = config.mesh
  try:
    mesh_lib.resolve_mesh_shape((m.data, m.fsdp, m.tensor), jax.device_count())
  except ValueError as e:
    raise RecommendError(f"{lay.config_json}: {e} (the recipe's mesh; pass --params=export "
                         "to decode the HF export on one device)") from None
  model, params, tokenizer = eval_stage.load_trained(config, workdir, index, source=source)
  return FinishedRun(model, params, tokenizer, dataset, index, config,
                     mesh=eval_stage.params_mesh(params), source=source,
                     params_path=ckpt_dir, step=step)


def _load_export(workdir: str, model_dir: str, config: ml_collections.ConfigDict,
                 dataset: Dataset, index: ItemIndex) -> FinishedRun:
  """The run with the params of the HF export ``model_dir`` (host arrays, one device)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from lcrec_jax.llm import safetensors_io  # pylint: disable=g-import-not-at-top
  from lcrec_jax.llm.model import Llama  # pylint: disable=g-import-not-at-top
  from lcrec_jax.llm.tokenizer import LCRecTokenizer  # pylint: disable=g-import-not-at-top
  from lcrec_jax.pipeline import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from lcrec_jax.runtime.finite import check_finite  # pylint: disable=g-import-not-at-top

  with fs.local_copy(model_dir) as local:  # gs://: downloaded to a temp dir
    params, model_cfg = safetensors_io.load_hf_dir(local)
    tokenizer = LCRecTokenizer.from_dir(local)
  check_finite(params, f"{model_dir}: params")
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise RecommendError(f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens but "
                         f"the model only {model_cfg.vocab_size} embedding rows")
  if workdir_lib.rl_finished(workdir):
    logging.warning("%s is the SFT model: the eval stage evaluates the rl stage's policy "
                    "(%s)", model_dir, workdir_lib.Layout(workdir).rl_checkpoints)
  return FinishedRun(Llama(model_cfg), params, tokenizer, dataset, index, config,
                     params_path=model_dir)


# --- item names ---------------------------------------------------------------------------


def display_title(item: Item) -> str:
  """``"Title (year)"`` when the item has a year field, else the title."""
  year = str(item.fields.get("year", "") or "").strip()
  return f"{item.title} ({year})" if year else item.title


def _norm(text: str) -> str:
  return " ".join(text.casefold().split())


class ItemMatcher:
  """Resolves history entries (ids or titles) to item numbers; see the module docstring."""

  def __init__(self, dataset: Dataset):
    self.dataset = dataset
    self.by_id = dataset.item_number()
    self.titles = [display_title(it) for it in dataset.items]
    self.keys = [(_norm(it.title), _norm(t)) for it, t in zip(dataset.items, self.titles)]
    self.by_key: dict[str, list[int]] = {}
    for i, pair in enumerate(self.keys):
      for key in set(pair):
        self.by_key.setdefault(key, []).append(i)

  def describe(self, i: int) -> str:
    return f"[{self.dataset.items[i].item_id}] {self.titles[i]}"

  def _ambiguous(self, query: str, items: Sequence[int], how: str) -> RecommendError:
    items = sorted(set(items), key=lambda i: self.titles[i])
    listed = "; ".join(self.describe(i) for i in items[:MAX_LISTED])
    more = f"; and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return RecommendError(f"history item {query!r} is ambiguous: {how} {len(items)} items: "
                          f"{listed}{more}. Give the item id (in brackets above) or the exact "
                          "'Title (year)'")

  def resolve(self, query: str) -> int:
    """Item number of one history entry.

    Raises:
      RecommendError: empty entry, several matches (listed) or none (closest listed).
    """
    q = query.strip()
    if not q:
      raise RecommendError("empty history item (two ';' in a row?)")
    if q.startswith("[") and q.endswith("]") and q[1:-1].strip() in self.by_id:
      return self.by_id[q[1:-1].strip()]  # an id as the error messages print it
    if q in self.by_id:
      return self.by_id[q]
    nq = _norm(q)
    exact = self.by_key.get(nq, [])
    if len(exact) == 1:
      return exact[0]
    if exact:
      raise self._ambiguous(q, exact, "its title names")
    contains = [i for i, (t, d) in enumerate(self.keys) if nq in d]
    if len(contains) == 1:
      return contains[0]
    if contains:
      raise self._ambiguous(q, contains, "it appears in the titles of")
    close = difflib.get_close_matches(nq, list(self.by_key), n=MAX_LISTED, cutoff=FUZZY_CUTOFF)
    close_items = list(dict.fromkeys(i for key in close for i in self.by_key[key]))
    if len(close_items) == 1:
      return close_items[0]
    if close_items:
      raise self._ambiguous(q, close_items, "it is spelled close to")
    near = difflib.get_close_matches(nq, list(self.by_key), n=5, cutoff=SUGGEST_CUTOFF)
    near_items = list(dict.fromkeys(i for key in near for i in self.by_key[key]))[:5]
    hint = ("; closest: " + "; ".join(self.describe(i) for i in near_items)) if near_items else ""
    raise RecommendError(f"history item {q!r}: no item has this id or title "
                         f"({self.dataset.num_items} items in {self.dataset.name!r}){hint}")

  def parse_history(self, history: str | Sequence[str]) -> list[int]:
    """Item numbers of a ``;``-separated history (or a list of entries), oldest first."""
    entries = history.split(";") if isinstance(history, str) else list(history)
    if not any(e.strip() for e in entries):
      raise RecommendError("the history is empty: give item ids or titles separated by ';', "
                           "e.g. --history=\"Toy Story; Heat; 50\"")
    # A trailing ';' is harmless; an empty entry between two items is not.
    while entries and not entries[-1].strip():
      entries.pop()
    return [self.resolve(e) for e in entries]

  def search(self, query: str, limit: int = MAX_LISTED) -> list[int]:
    """Item numbers for ``query``, best first: the item with this id; else the titles equal
    to it, then those containing it; else close spellings (the cut-offs of :meth:`resolve`,
    then its looser suggestion cut-off)."""
    q = query.strip()
    if not q:
      return []
    ident = q[1:-1].strip() if q.startswith("[") and q.endswith("]") else q
    if ident in self.by_id:
      return [self.by_id[ident]]
    nq = _norm(q)
    exact = self.by_key.get(nq, [])
    found = exact + [i for i, (_, d) in enumerate(self.keys) if nq in d and i not in exact]
    if not found:
      for cutoff in (FUZZY_CUTOFF, SUGGEST_CUTOFF):
        close = difflib.get_close_matches(nq, list(self.by_key), n=limit, cutoff=cutoff)
        found = list(dict.fromkeys(i for key in close for i in self.by_key[key]))
        if found:
          break
    return found[:limit]


# --- recommending -------------------------------------------------------------------------


def recommend(run: FinishedRun, history: Sequence[int], k: int = 10, *,
              template_id: int | None = None, mode: str = "trie",
              include_history: bool = False, decoder: Any = None) -> list[dict[str, Any]]:
  """Top-``k`` items for a history of item numbers, best first.

  Args:
    run: from :func:`load_finished_run`.
    history: item numbers, oldest first (the last ``tasks.max_history`` are shown).
    k: how many items.
    template_id: seqrec template; default the first of ``eval.template_ids`` (else 0).
    mode: ``"trie"`` or ``"position"`` mask.
    include_history: allow items of the history in the answer.
    decoder: a reusable :class:`lcrec_jax.eval.evaluate.Decoder`.

  Returns:
    ``[{"rank", "item_id", "title", "score" (log-probability of the code), "prob"}]``,
    fewer than ``k`` only when the catalogue (minus the history) is smaller.
  """
  from lcrec_jax.eval import evaluate as ev  # pylint: disable=g-import-not-at-top

  if k < 1:
    raise RecommendError(f"--k must be >= 1, got {k}")
  if not history:
    raise RecommendError("the history is empty")
  template_id = check_template(run, template_id)
  prompt = history_prompt(run, history, template_id)
  if decoder is None:
    decoder = ev.Decoder(run.model, run.tokenizer, run.index, run.config.tasks.buckets,
                         mesh=run.mesh)
  # History items are banned inside the beam search (trie mode), so every beam is a
  # candidate; the position mask drops them after the search, hence the extra beams.
  skip = [] if include_history else sorted(set(int(i) for i in history))
  extra = len(skip) if mode == "position" else 0
  items, scores = decoder.rank(run.params, [prompt], num_beams=beam_width(run, k + extra),
                               mode=mode, batch_size=1, exclude=[skip] if skip else None)
  return ranked_items(run, items[0], scores[0], k)


# --- shared with lcrec_jax.serve ----------------------------------------------------------


def check_template(run: FinishedRun, template_id: int | None) -> int:
  """The seqrec template to use: ``template_id``, else the first of ``eval.template_ids``
  (else 0); an out-of-range one is a :class:`RecommendError` naming ``--template``."""
  from lcrec_jax.tasks import prompts  # pylint: disable=g-import-not-at-top
  if template_id is None:
    tids = run.config.eval.template_ids
    template_id = int(tids[0]) if tids else 0
  num_templates = len(prompts.templates("seqrec"))
  if not 0 <= int(template_id) < num_templates:
    raise RecommendError(f"--template={template_id}: there are {num_templates} seqrec "
                         f"templates, numbered 0 to {num_templates - 1}")
  return int(template_id)


def history_prompt(run: FinishedRun, history: Sequence[int], template_id: int) -> np.ndarray:
  """``[len]`` int32 seqrec prompt ids for item numbers ``history`` (oldest first; the last
  ``tasks.max_history`` are shown), exactly as the eval stage builds them."""
  from lcrec_jax.eval import evaluate as ev  # pylint: disable=g-import-not-at-top
  from lcrec_jax.tasks import prompts  # pylint: disable=g-import-not-at-top
  cfg_tasks = run.config.tasks
  max_history = int(cfg_tasks.max_history)
  shown = [int(i) for i in history][-max_history:]
  codes = prompts.HISTORY_SEP.join(run.index.item_code_str(i) for i in shown)
  instruction, _ = prompts.templates("seqrec")[template_id].render({"history": codes,
                                                                    "item": ""})
  return ev.eval_prompt_ids(run.tokenizer, instruction, cfg_tasks, run.index.num_levels)


def beam_width(run: FinishedRun, k: int) -> int:
  """Beams of the search for ``k`` answers: ``eval.num_beams`` (20), more for a larger ``k``,
  at most the catalogue."""
  base = int(run.config.eval.num_beams)
  return min(run.index.num_items, max(base, k))


def ranked_items(run: FinishedRun, items: Sequence[int], scores: Sequence[float], k: int
                 ) -> list[dict[str, Any]]:
  """The answer rows for one ``[beams]`` row of items (``-1`` = none) and scores."""
  out = []
  for item, score in zip(np.asarray(items).tolist(), np.asarray(scores).tolist()):
    if item < 0:
      continue
    it = run.dataset.items[item]
    out.append({"rank": len(out) + 1, "item_id": it.item_id, "title": display_title(it),
                "score": float(score), "prob": math.exp(score)})
    if len(out) == k:
      break
  return out


def format_text(history: Sequence[int], recs: Sequence[dict[str, Any]],
                matcher: ItemMatcher) -> str:
  """The human-readable answer."""
  lines = ["History (oldest first):"]
  lines += [f"  {matcher.describe(i)}" for i in history]
  lines.append(f"Top {len(recs)} recommendations (log-probability of the item's code):")
  width = max((len(r["item_id"]) for r in recs), default=1) + 2
  for r in recs:
    lines.append(f"  {r['rank']:>2}. {'[' + r['item_id'] + ']':<{width}} {r['title']:<50} "
                 f"{r['score']:9.4f}")
  return "\n".join(lines)


def run_command(workdir: str, history: str, k: int = 10, as_json: bool = False, *,
                template_id: int | None = None, mode: str = "trie",
                include_history: bool = False, params: str = "checkpoint") -> str:
  """What the CLI prints (text or json); raises :class:`RecommendError` on bad input.

  ``params``: see :func:`load_finished_run`.
  """
  if not any(e.strip() for e in (history or "").split(";")):
    raise RecommendError("the history is empty: give item ids or titles separated by ';', "
                         "e.g. --history=\"Toy Story; Heat; 50\"")
  run = load_finished_run(workdir, params)
  matcher = ItemMatcher(run.dataset)
  hist = matcher.parse_history(history)
  recs = recommend(run, hist, k, template_id=template_id, mode=mode,
                   include_history=include_history)
  if as_json:
    return json.dumps({
        "workdir": workdir, "k": k, "mode": mode,
        "params": {"source": run.source, "path": run.params_path, "step": run.step},
        "history": [{"item_id": run.dataset.items[i].item_id, "title": matcher.titles[i]}
                    for i in hist],
        "recommendations": recs}, indent=2, ensure_ascii=False)
  return format_text(hist, recs, matcher)


_WORKDIR = _HISTORY = _K = _JSON = _TEMPLATE = _MODE = _INCLUDE = _PARAMS = None  # define_flags


def define_flags(fv: flags.FlagValues = flags.FLAGS,
                 argv: list[str] | None = None) -> flags.FlagValues:
  """Defines the command's flags on ``fv``; importing the module defines none
  (see :func:`lcrec_jax.main.define_flags`)."""
  del argv  # no config flag
  global _WORKDIR, _HISTORY, _K, _JSON, _TEMPLATE, _MODE, _INCLUDE, _PARAMS  # pylint: disable=global-statement
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished run directory (lcrec_jax.main).",
                                 flag_values=fv)
  _HISTORY = flags.DEFINE_string("history", None,
                                 "Item ids or titles, ';'-separated, oldest first.",
                                 flag_values=fv)
  _K = flags.DEFINE_integer("k", 10, "How many items to recommend.", flag_values=fv)
  _JSON = flags.DEFINE_bool("json", False, "Print json instead of a table.", flag_values=fv)
  _TEMPLATE = flags.DEFINE_integer(
      "template", None, "seqrec prompt template (default: eval.template_ids[0] or 0).",
      flag_values=fv)
  _MODE = flags.DEFINE_enum("mode", "trie", ["trie", "position"],
                            "Decoding mask: the item trie or LC-Rec's per-position mask.",
                            flag_values=fv)
  _INCLUDE = flags.DEFINE_bool("include_history", False,
                               "Allow items of the history among the recommendations.",
                               flag_values=fv)
  _PARAMS = define_params_flag(fv)
  return fv


def define_params_flag(fv: flags.FlagValues):
  """``--params`` (also the server's)."""
  return flags.DEFINE_enum(
      "params", "checkpoint", list(PARAMS_SOURCES),
      "checkpoint: the params the eval stage evaluates (the rl policy when the rl stage "
      "finished, else the newest train checkpoint), on the recipe's mesh; export: the HF "
      "export <workdir>/model/ on one device (a workdir whose checkpoints were deleted).",
      flag_values=fv)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  print(run_command(_WORKDIR.value, _HISTORY.value or "", _K.value, _JSON.value,
                    template_id=_TEMPLATE.value, mode=_MODE.value,
                    include_history=_INCLUDE.value, params=_PARAMS.value))


if __name__ == "__main__":
  define_flags()
  cli.run(main, "recommend")
