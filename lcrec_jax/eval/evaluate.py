"""Full-ranking evaluation: batched constrained beam search over seqrec prompts.

For each split (``"valid"``, ``"test"``) and each seqrec template, every user's prompt is
built exactly as training builds it (:func:`lcrec_jax.tasks.batching.encode_prompt`, cut
from the left to fit the largest bucket together with the code response and EOS),
left-padded to the smallest bucket of ``cfg_tasks.buckets`` that holds it, and decoded in
batches of a fixed size (the last batch of a bucket is filled with copies of its first
row), so each (bucket, mode) pair compiles once. The beams, best first, are the ranked
list: HR@1/5/10 and NDCG@5/10 over the whole catalogue (:mod:`lcrec_jax.eval.metrics`),
then mean/min/max over templates as LC-Rec reports them.

Masks: ``"trie"`` (every beam is an item) and ``"position"`` (LC-Rec's per-level mask;
beams that spell no item count as misses). The share of non-empty beams that are real
items is reported per mode: 1.0 for the trie by construction.

Protocols (``eval.exclude_seen``), named in ``results[split]["protocol"]`` and never
mixed: ``"all_items"`` (False: every item is ranked, seen ones included; LC-Rec's paper,
and RecBole's full-sort evaluation of sequential models) and ``"seen_excluded"`` (True;
RecBole masks history this way for general recommenders only: each user's history items are
banned inside the constrained beam search, :func:`constrained_beam_search` ``banned``, so
every beam is an unseen item; the position mask, which has no items, drops them after the
search). Under ``"all_items"`` the seen items dropped from the finished beams are also
reported (``seen_excluded``, a post-hoc figure: fewer than ``num_beams`` candidates remain,
so it is below the in-search protocol). MovieLens-100K has no repeated user-item pairs, so
excluding seen items is a large, legitimate gain that must be labelled as such.

Results layout (json-ready)::

  results["test"]["protocol"]                    # "all_items" | "seen_excluded"
  results["test"]["mean"]["NDCG@10"]            # primary mode (first of cfg_eval.modes)
  results["test"]["min"] / ["max"]
  results["test"]["per_template"]["3"]["HR@5"]
  results["test"]["valid_beam_share"]["position"]
  results["test"]["modes"]["position"]["mean"]["HR@10"]
  results["test"]["seen_excluded"]["mean"]["NDCG@10"]   # "all_items" only: dropped afterwards
  results["settings"], results["seconds"]
  results["seed"]                # {"seed", "train_seed"} of the run (the eval stage adds it)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from lcrec_jax import fs
from lcrec_jax import progress as progress_lib
from lcrec_jax.data.dataset import Dataset
from lcrec_jax.decode.beam_search import codes_to_items, constrained_beam_search
from lcrec_jax.decode.trie import Trie, build_trie, position_mask
from lcrec_jax.eval.metrics import DEFAULT_KS, DEFAULT_NDCG_KS, summarize_templates, topk_metrics
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm.model import Llama
from lcrec_jax.tasks import batching
from lcrec_jax.tasks.builders import num_templates, seqrec_eval_examples

MODES = ("trie", "position")
PROTOCOLS = {False: "all_items", True: "seen_excluded"}  # eval.exclude_seen -> name
SPLITS = ("valid", "test")


def _get(cfg: Any, key: str) -> Any:
  """``cfg.key`` for settings / a ConfigDict, ``cfg[key]`` for a dict; the section must
  hold the field (its default is the run spec's, :mod:`lcrec_jax.pipeline.spec`)."""
  try:
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)
  except (KeyError, AttributeError, TypeError):
    raise ValueError(f"evaluation settings: no field {key!r} (pass a complete eval / tasks "
                     "section: lcrec_jax.pipeline.spec.section_settings)") from None


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The evaluation settings, checked (from the config's ``eval`` section)."""

  num_beams: int
  batch_size: int
  splits: tuple[str, ...]
  template_ids: tuple[int, ...]
  modes: tuple[str, ...]
  max_users: int
  seed: int
  shard: bool
  exclude_seen: bool

  @classmethod
  def from_config(cls, cfg_eval: Any) -> "EvalSettings":
    """Reads ``num_beams``, ``batch_size``, ``splits``, ``template_ids`` (None = all seqrec
    templates), ``modes``, ``max_users`` (0 = all), ``seed``, ``shard`` (split each
    batch over all devices, :class:`Decoder`) and ``exclude_seen`` (the protocol, see the
    module docstring) from ``cfg_eval``."""
    n_tmpl = num_templates("seqrec")
    tids = _get(cfg_eval, "template_ids")
    tids = tuple(range(n_tmpl)) if tids is None else tuple(int(t) for t in tids)
    out = cls(num_beams=int(_get(cfg_eval, "num_beams")),
              batch_size=int(_get(cfg_eval, "batch_size")),
              splits=tuple(_get(cfg_eval, "splits")),
              template_ids=tids, modes=tuple(_get(cfg_eval, "modes")),
              max_users=int(_get(cfg_eval, "max_users")),
              seed=int(_get(cfg_eval, "seed")),
              shard=bool(_get(cfg_eval, "shard")),
              exclude_seen=_get(cfg_eval, "exclude_seen"))
    if not isinstance(out.exclude_seen, bool):
      raise ValueError(f"config eval.exclude_seen must be True or False, got "
                       f"{out.exclude_seen!r}")
    need = max(DEFAULT_KS + DEFAULT_NDCG_KS)
    if out.num_beams < need:
      raise ValueError(f"config eval.num_beams={out.num_beams}: full-ranking metrics up to "
                       f"K={need} need at least {need} beams")
    if out.batch_size < 1:
      raise ValueError(f"config eval.batch_size must be >= 1, got {out.batch_size}")
    bad = [s for s in out.splits if s not in SPLITS]
    if bad or not out.splits:
      raise ValueError(f"config eval.splits={out.splits}: each must be one of {SPLITS}")
    bad = [m for m in out.modes if m not in MODES]
    if bad or not out.modes:
      raise ValueError(f"config eval.modes={out.modes}: each must be one of {MODES}")
    bad = [t for t in out.template_ids if not 0 <= t < n_tmpl]
    if bad or not out.template_ids:
      raise ValueError(f"config eval.template_ids={out.template_ids}: seqrec has templates "
                       f"0..{n_tmpl - 1}")
    if out.max_users < 0:
      raise ValueError(f"config eval.max_users must be >= 0 (0 = all), got {out.max_users}")
    return out


def prompt_max_len(cfg_tasks: Any, num_levels: int) -> int:
  """Longest prompt training keeps: the largest bucket minus the code response and EOS."""
  buckets = tuple(int(b) for b in _get(cfg_tasks, "buckets"))
  if not buckets:
    raise ValueError("config tasks.buckets is empty: evaluation needs the bucket lengths")
  return max(buckets) - num_levels - 1


def eval_prompt_ids(tokenizer: Any, instruction: str, cfg_tasks: Any, num_levels: int
                    ) -> np.ndarray:
  """``[len]`` int32 prompt ids, identical to the prompt part of a training sequence."""
  return batching.encode_prompt(tokenizer, instruction, prompt_max_len(cfg_tasks, num_levels),
                                add_bos=_get(cfg_tasks, "add_bos"))


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis ``("data",)`` mesh over ``devices`` (default: every device of every host)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


class Decoder:
  """Everything constant across evaluation calls: code token table, trie, position mask.

  Call :meth:`rank` with prompts of any lengths; it buckets, pads and batches them.

  Sharding: with a ``mesh`` (one ``"data"`` axis, :func:`data_mesh`), each batch of users
  is split over the ``data`` axis and the parameters are replicated, so every chip
  decodes ``batch_size / data`` users of each call (the batch is rounded up to a multiple
  of the axis size). With the training mesh ``('data', 'fsdp', 'tensor')`` the params
  must already be placed on it (sharded as in training, :mod:`lcrec_jax.eval.restore`)
  and are used as they are; each batch is split over ``data`` x ``fsdp``. Every process
  passes the same prompts and gets every result back, so this also runs on multi-host
  pods. Without a mesh, one device decodes everything.
  """

  def __init__(self, model: Llama, tokenizer: Any, index: ItemIndex,
               buckets: Sequence[int], trie: Trie | None = None, mesh: Mesh | None = None):
    names = None if mesh is None else tuple(mesh.axis_names)
    if names not in (None, ("data",), ("data", "fsdp", "tensor")):
      raise ValueError(f"evaluation mesh must have the single axis ('data',) or the training "
                       f"axes ('data', 'fsdp', 'tensor'), got {names}")
    self.mesh = mesh
    # Params replicated for the call on a ("data",) mesh; used in place on a training mesh.
    self._batch_axes = ("data",) if names == ("data",) else ("data", "fsdp")
    self._replicated_params: tuple[Any, Any] | None = None
    self.model = model
    self.index = index
    self.buckets = tuple(sorted(int(b) for b in buckets))
    self.pad_id = int(tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    self.code_ids = jnp.asarray(tokenizer.code_token_ids(index))
    vocab = model.config.vocab_size
    if int(np.max(np.asarray(self.code_ids))) >= vocab:
      raise ValueError(f"the tokenizer's code tokens reach id {int(np.max(self.code_ids))} but "
                       f"the model's vocab_size is {vocab}: grow the embeddings first")
    self.trie = build_trie(index) if trie is None else trie
    self.allowed = jnp.asarray(position_mask(index))
    self.lookup = index.lookup()

  def bucket_of(self, length: int) -> int:
    """Smallest bucket holding ``length`` tokens (a longer prompt: an error naming it)."""
    for b in self.buckets:
      if length <= b:
        return b
    raise ValueError(f"a {length}-token prompt exceeds the largest bucket {self.buckets[-1]} "
                     "(config tasks.buckets)")

  def rank(self, params: Any, prompts: Sequence[np.ndarray], *, num_beams: int, mode: str,
           batch_size: int, lora: Any = None, progress: bool = False, desc: str = "decode",
           exclude: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top beams of every prompt.

    Args:
      params: model parameters.
      prompts: per user a ``[len]`` int32 prompt (no padding).
      num_beams: beams per user (static).
      mode: ``"trie"`` or ``"position"``.
      batch_size: users per beam-search call (fixed; the last batch is padded).
      lora: optional LoRA adapters.
      progress: report users done (:class:`lcrec_jax.progress.Progress`).
      desc: its label.
      exclude: optional per prompt the item numbers it must not get (e.g. its user's
        history). Trie mode bans them inside the search (every beam is an allowed item);
        position mode drops them from the finished beams.

    Returns:
      ``(items [N, num_beams] int64, scores [N, num_beams] float32)``; items are ``-1``
      for beams that spell no item or are empty (also when fewer than ``num_beams``
      allowed items remain).
    """
    if exclude is not None and len(exclude) != len(prompts):
      raise ValueError(f"exclude has {len(exclude)} rows for {len(prompts)} prompts")
    n = len(prompts)
    if self.mesh is not None:
      ways = int(np.prod([self.mesh.shape[a] for a in self._batch_axes]))
      batch_size = -(-batch_size // ways) * ways
      if self._batch_axes == ("data",):
        params, lora = self._replicate(params, lora)
    items = np.full((n, num_beams), -1, np.int64)
    scores = np.full((n, num_beams), -np.inf, np.float32)
    lengths = np.asarray([len(p) for p in prompts], np.int64)
    plan = []
    by_bucket: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
      by_bucket.setdefault(self.bucket_of(int(length)), []).append(i)
    for b in sorted(by_bucket):
      rows = by_bucket[b]
      for s in range(0, len(rows), batch_size):
        plan.append((b, rows[s:s + batch_size]))
    bar = progress_lib.Progress(n, desc, "user", enabled=progress)
    for b, rows in plan:
      tok = np.full((batch_size, b), self.pad_id, np.int32)
      mask = np.zeros((batch_size, b), np.int32)
      for r in range(batch_size):
        p = prompts[rows[r] if r < len(rows) else rows[0]]
        tok[r, b - len(p):] = p
        mask[r, b - len(p):] = 1
      banned = None
      if exclude is not None and mode == "trie":
        ban = np.zeros((batch_size, self.index.num_items), bool)  # [batch, items]
        for r in range(batch_size):
          ban[r, np.asarray(exclude[rows[r] if r < len(rows) else rows[0]], np.int64)] = True
        banned = self._batch(ban)
      res = constrained_beam_search(
          self.model, params, self._batch(tok), self._batch(mask), self.code_ids,
          self.trie if mode == "trie" else None, self.allowed if mode == "position" else None,
          num_beams=num_beams, mode=mode, lora=lora, banned=banned)
      res = self._gather(res)
      k = len(rows)
      sc = np.asarray(res.scores[:k], np.float32)
      if mode == "trie":
        it = np.asarray(res.items[:k], np.int64)
      else:
        it = codes_to_items(res.codes[:k], sc, self.lookup)
        if exclude is not None:
          it, sc = _drop_excluded(it, sc, [exclude[i] for i in rows])
      items[rows], scores[rows] = it, sc
      bar.update(k)
    bar.close()
    return items, scores


  def _replicate(self, params: Any, lora: Any) -> tuple[Any, Any]:
    """``params`` (and ``lora``) on every device of the mesh; cached for the same objects."""
    cached = self._replicated_params
    if cached is not None and cached[0] is params and cached[1] is lora:
      return cached[2], cached[3]
    rep = NamedSharding(self.mesh, PartitionSpec())
    def one(x):
      if isinstance(x, jax.Array):  # e.g. training params sharded over another mesh
        return jax.device_put(x, rep)
      return jax.make_array_from_callback(np.shape(x), rep, lambda idx: np.asarray(x)[idx])
    put = lambda tree: None if tree is None else jax.tree_util.tree_map(one, tree)
    out = (put(params), put(lora))
    self._replicated_params = (params, lora, *out)
    return out

  def _batch(self, rows: np.ndarray) -> jax.Array:
    """``[batch, len]`` host rows as a device array, split over the batch axes with a mesh."""
    if self.mesh is None:
      return jnp.asarray(rows)
    sharding = NamedSharding(self.mesh, PartitionSpec(self._batch_axes))
    return jax.make_array_from_callback(rows.shape, sharding, lambda idx: rows[idx])

  def _gather(self, tree: Any) -> Any:
    """Every row of a (possibly multi-host) result on this host, as numpy."""
    if self.mesh is None or jax.process_count() == 1:
      return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _drop_excluded(items: np.ndarray, scores: np.ndarray, seen: Sequence[Sequence[int]]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """``items, scores [N, W]`` without each row's ``seen`` items, the rest moved up."""
  out_i, out_s = np.full_like(items, -1), np.full_like(scores, -np.inf)
  for r in range(items.shape[0]):
    keep = ~np.isin(items[r], np.asarray(seen[r], np.int64)) | (items[r] < 0)
    keep &= np.isfinite(scores[r])
    out_i[r, :keep.sum()], out_s[r, :keep.sum()] = items[r][keep], scores[r][keep]
  return out_i, out_s


def valid_beam_share(items: np.ndarray, scores: np.ndarray) -> float:
  """Share of non-empty beams (finite score) that are real items."""
  live = np.isfinite(scores)
  return float((items[live] >= 0).sum() / max(int(live.sum()), 1))


def exclude_seen(items: np.ndarray, seen: Sequence[Sequence[int]]) -> np.ndarray:
  """``items [N, W]`` with each user's ``seen`` items removed, the rest moved up (``-1`` fill)."""
  out = np.full_like(items, -1)
  for r, row in enumerate(items):
    s = set(int(i) for i in seen[r])
    keep = [int(i) for i in row if i >= 0 and int(i) not in s]
    out[r, :len(keep)] = keep
  return out


def sample_users(num_users: int, max_users: int, seed: int = 0) -> np.ndarray:
  """Sorted user numbers: all when ``max_users`` is 0 or covers everyone, else a seeded sample."""
  if max_users <= 0 or max_users >= num_users:
    return np.arange(num_users)
  rng = np.random.default_rng([int(seed), 20240])
  return np.sort(rng.choice(num_users, size=max_users, replace=False))


def _aggregate(per_template: dict[int, dict[str, float]]) -> dict[str, Any]:
  agg = summarize_templates(list(per_template.values()))
  return {**agg, "per_template": {str(t): m for t, m in per_template.items()}}


def evaluate(model: Llama, params: Any, tokenizer: Any, dataset: Dataset, index: ItemIndex,
             cfg_eval: Any, cfg_tasks: Any, *, lora: Any = None, progress: bool = True,
             decoder: Decoder | None = None) -> dict[str, Any]:
  """Full-ranking HR/NDCG of the model on every configured split, template and mask.

  Args:
    model: the Flax LLaMA whose vocabulary holds the item-code tokens.
    params: its parameters.
    tokenizer: an :class:`lcrec_jax.llm.tokenizer.LCRecTokenizer` (or alike) with the codes.
    dataset: the dataset (leave-one-out split taken from it).
    index: its conflict-free item index.
    cfg_eval: the config's ``eval`` section (see :class:`EvalSettings`).
    cfg_tasks: the config's ``tasks`` section (``buckets``, ``add_bos``, ``max_history``).
    lora: optional LoRA adapters, applied on the fly.
    progress: report users done per split, template and mode (lcrec_jax.progress).
    decoder: a prebuilt :class:`Decoder` to reuse (tables and compiled shapes).

  Returns:
    The results dict described in the module docstring.
  """
  st = EvalSettings.from_config(cfg_eval)
  t0 = time.perf_counter()
  max_history = int(_get(cfg_tasks, "max_history"))
  if decoder is None:
    mesh = data_mesh() if st.shard and jax.device_count() > 1 else None
    decoder = Decoder(model, tokenizer, index, _get(cfg_tasks, "buckets"), mesh=mesh)
  num_beams = min(st.num_beams, index.num_items)  # more beams than items: nothing to add
  users = sample_users(dataset.num_users, st.max_users, st.seed)
  split_data = dataset.split()
  results: dict[str, Any] = {"settings": {
      **dataclasses.asdict(st), "num_beams_used": num_beams, "num_users": int(len(users)),
      "num_items": index.num_items, "max_history": max_history,
      "buckets": list(decoder.buckets), "primary_mode": st.modes[0],
      "protocol": PROTOCOLS[st.exclude_seen]}}
  for split in st.splits:
    rows = split_data.valid if split == "valid" else split_data.test
    seen = [np.asarray(rows[u].history) for u in users]
    per_mode: dict[str, dict[int, dict[str, float]]] = {m: {} for m in st.modes}
    shares: dict[str, dict[int, float]] = {m: {} for m in st.modes}
    seen_excl: dict[int, dict[str, float]] = {}
    for t in st.template_ids:
      examples = seqrec_eval_examples(dataset, index, split, t, max_history)
      examples = [examples[int(u)] for u in users]
      prompts = [eval_prompt_ids(tokenizer, ex.instruction, cfg_tasks, index.num_levels)
                 for ex in examples]
      targets = np.asarray([ex.meta["target"] for ex in examples], np.int64)
      for m in st.modes:
        items, scores = decoder.rank(params, prompts, num_beams=num_beams, mode=m,
                                     batch_size=st.batch_size, lora=lora, progress=progress,
                                     desc=f"eval {split} template {t} {m}",
                                     exclude=seen if st.exclude_seen else None)
        ranked = _at_least(items, max(DEFAULT_KS + DEFAULT_NDCG_KS))
        per_mode[m][t] = topk_metrics(ranked, targets)
        shares[m][t] = valid_beam_share(items, scores)
        if m == st.modes[0] and not st.exclude_seen:
          seen_excl[t] = topk_metrics(_at_least(exclude_seen(items, seen), ranked.shape[1]),
                                      targets)
    primary = _aggregate(per_mode[st.modes[0]])
    results[split] = {
        "num_users": int(len(users)),
        "protocol": PROTOCOLS[st.exclude_seen],
        "mode": st.modes[0],
        **primary,
        "valid_beam_share": {m: float(np.mean(list(shares[m].values()))) for m in st.modes},
        "modes": {m: {**_aggregate(per_mode[m]),
                      "valid_beam_share": {str(t): s for t, s in shares[m].items()}}
                  for m in st.modes},
    }
    if seen_excl:
      results[split]["seen_excluded"] = _aggregate(seen_excl)
  results["seconds"] = time.perf_counter() - t0
  return results


def _at_least(items: np.ndarray, width: int) -> np.ndarray:
  """Pads ``[N, W]`` ranked lists with ``-1`` to at least ``width`` columns (tiny catalogues)."""
  if items.shape[1] >= width:
    return items
  return np.concatenate([items, np.full((items.shape[0], width - items.shape[1]), -1,
                                        items.dtype)], 1)


def quick_metrics(model: Llama, params: Any, tokenizer: Any, dataset: Dataset,
                  index: ItemIndex, cfg_eval: Any, cfg_tasks: Any, *, lora: Any = None,
                  max_users: int | None = None, split: str = "valid",
                  template_id: int = 0, mode: str = "trie", progress: bool = False,
                  decoder: Decoder | None = None) -> dict[str, float]:
  """Flat HR/NDCG on a seeded sample of users, one template and one mask.

  For the trainer's validation hook. ``max_users`` defaults to ``cfg_eval.quick_users``
  (else 128); returns e.g. ``{"HR@10": ..., "NDCG@10": ..., "valid_beam_share": 1.0}``.
  """
  if max_users is None:
    max_users = int(_get(cfg_eval, "quick_users"))
  # shard=True: a call without a decoder splits its users over every device
  cfg = {"num_beams": _get(cfg_eval, "num_beams"),
         "batch_size": _get(cfg_eval, "batch_size"), "splits": (split,),
         "template_ids": (template_id,), "modes": (mode,), "max_users": max_users,
         "seed": _get(cfg_eval, "seed"), "shard": True,
         "exclude_seen": _get(cfg_eval, "exclude_seen")}
  res = evaluate(model, params, tokenizer, dataset, index, cfg, cfg_tasks, lora=lora,
                 progress=progress, decoder=decoder)[split]
  return {**res["mean"], "valid_beam_share": res["valid_beam_share"][mode]}


def validation_hook(model: Llama, tokenizer: Any, dataset: Dataset, index: ItemIndex,
                    cfg_eval: Any, cfg_tasks: Any, *,
                    params_fn: Callable[[Any], Any] = lambda state: state.params,
                    lora_fn: Callable[[Any], Any] | None = None, **kwargs
                    ) -> Callable[[int, Any], dict[str, float]]:
  """A ``(step, state) -> metrics`` callback for ``lcrec_jax.train.trainer.train``.

  ``params_fn`` / ``lora_fn`` pull the base params and the adapters out of the train
  state; ``kwargs`` go to :func:`quick_metrics`. Tables and compiled shapes are reused
  across calls; with several devices and ``eval.shard`` (default) the users are split
  over the training mesh's ``data`` x ``fsdp`` with the parameters used where they are
  (sharded as in training, never gathered), or, for params on no such mesh, over a
  ``data`` mesh of all devices with the parameters replicated for the call.
  """
  shard = bool(_get(cfg_eval, "shard")) and jax.device_count() > 1
  decoder = None  # built at the first call, on the mesh the params live on

  def hook(step: int, state: Any) -> dict[str, float]:
    nonlocal decoder
    del step
    params = params_fn(state)
    if decoder is None:
      mesh = (_training_mesh(params) or data_mesh()) if shard else None
      decoder = Decoder(model, tokenizer, index, _get(cfg_tasks, "buckets"), mesh=mesh)
    lora = lora_fn(state) if lora_fn is not None else None
    return quick_metrics(model, params, tokenizer, dataset, index, cfg_eval,
                         cfg_tasks, lora=lora, decoder=decoder, **kwargs)

  return hook


def _training_mesh(params: Any) -> Mesh | None:
  """The ``('data', 'fsdp', 'tensor')`` mesh ``params`` are sharded on, else None."""
  leaves = jax.tree.leaves(params)
  sharding = getattr(leaves[0], "sharding", None) if leaves else None
  mesh = getattr(sharding, "mesh", None)
  if isinstance(mesh, Mesh) and tuple(mesh.axis_names) == ("data", "fsdp", "tensor"):
    return mesh
  return None


def write_results(results: Mapping[str, Any], path: str) -> str:
  """Writes ``results`` to ``path`` (the eval stage's ``<workdir>/eval/results.json``)
  atomically (temp file + rename); returns the path.

  Local or ``gs://`` (:mod:`lcrec_jax.fs`); only process 0 writes.
  """
  fs.write_json(path, results, indent=2, sort_keys=False)
  return path


def load_results(path: str) -> dict[str, Any]:
  """Reads what :func:`write_results` wrote."""
  try:
    return fs.read_json(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no evaluation results (run the eval stage)") from None
