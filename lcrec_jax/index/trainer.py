"""RQ-VAE training loop: k-means init, AdamW with warmup, orbax checkpoints and resume.

Layout under ``out_dir`` (the index stage's ``<workdir>/index/``)::

  metrics.jsonl                 one json object per epoch (see :func:`train_rqvae`)
  checkpoints/latest/<epoch>/   every ``checkpoint_every`` epochs and at the end
  checkpoints/best_collision/   the lowest argmax collision rate seen at an evaluation
  checkpoints/best_loss/        the lowest epoch loss seen at an evaluation (LC-Rec keeps both)

A checkpoint holds the parameters, batch-norm statistics, optimizer state, step counter
and the base PRNG key, plus a json ``meta`` (epoch, best values so far, the config).
Randomness is a pure function of ``(seed, epoch, step)``: the shuffle of epoch ``e`` is
``numpy.random.default_rng([seed, e])`` and step ``s`` uses dropout key
``fold_in(base_key, s)``. Hence an interrupted run resumed from its latest checkpoint
ends with exactly the parameters of an uninterrupted run.

As in LC-Rec (``index/trainer.py``): AdamW, linear warmup then linear decay to 0
(HF ``get_linear_schedule_with_warmup``) or constant, gradient norm clipped at 1.0
(:data:`GRAD_CLIP`, LC-Rec's value; not a config key), every batch of an epoch used (the last one may be
smaller), Sinkhorn on during training, collision rate from argmax codes of all items.

Failure safety (as in the LLM trainer): a step whose loss or updated state is NaN/inf
is not applied (the choice is made inside the jitted step); at the end of that epoch
training stops with a :class:`NonFiniteError` naming the newest checkpoint, which is
finite. On resume, a newest ``latest`` checkpoint that does not load (or holds NaN/inf)
is moved aside to ``<epoch>.corrupt-<n>`` and the next older one is used
(:func:`lcrec_jax.runtime.checkpoint.restore_newest`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from lcrec_jax import fs, interrupt
from lcrec_jax import progress as progress_lib
from lcrec_jax.errors import ConfigError
from lcrec_jax.index import assign
from lcrec_jax.index import rqvae
from lcrec_jax.log_filters import quiet_orbax
from lcrec_jax.runtime import checkpoint as ckpt_lib
from lcrec_jax.runtime import finite
from lcrec_jax.runtime import loop as loop_lib

# Config fields that may change between a run and its resumption without changing the
# result.
_BOOKKEEPING_FIELDS = ("eval_every", "checkpoint_every", "keep_checkpoints")
CHECKPOINT_KINDS = ("latest", "best_collision", "best_loss")
# rqvae fields added after checkpoints existed, at the value that reproduces the old runs
GRAD_CLIP = 1.0  # global-norm clip of the RQ-VAE gradients (LC-Rec's)
_ADDED_FIELDS = {"cf_weight": 0.0, "cf_embeddings": "", "diversity_weight": 0.0,
                 "diversity_clusters": 10}


def make_model(cfg: ml_collections.ConfigDict, in_dim: int) -> rqvae.RQVAE:
  """The :class:`RQVAE` described by ``cfg`` (``c.rqvae``) for ``in_dim``-wide inputs."""
  return rqvae.RQVAE(
      in_dim=int(in_dim),
      encoder_layers=tuple(int(w) for w in cfg.encoder_layers),
      e_dim=int(cfg.e_dim),
      num_levels=int(cfg.num_levels),
      codebook_size=int(cfg.codebook_size),
      dropout=float(cfg.dropout),
      batch_norm=bool(cfg.batch_norm),
      beta=float(cfg.beta),
      sk_epsilons=tuple(float(e) for e in cfg.sk_epsilons),
      sk_iters=int(cfg.sk_iters),
  )


def make_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup over ``warmup_epochs``, then linear decay to 0 or constant."""
  return _optimizer(_opt_spec(cfg, steps_per_epoch))[1]


def make_optimizer(cfg: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (``lr``, ``weight_decay``) on :func:`make_schedule`, after norm clipping."""
  return _optimizer(_opt_spec(cfg, steps_per_epoch))


def _opt_spec(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple:
  if cfg.schedule not in ("linear", "constant"):
    raise ValueError(f"rqvae.schedule must be 'linear' or 'constant', got {cfg.schedule!r}")
  return (float(cfg.lr), float(cfg.weight_decay), float(cfg.warmup_epochs), int(cfg.epochs),
          str(cfg.schedule), GRAD_CLIP, int(steps_per_epoch))


@functools.lru_cache(maxsize=16)
def _optimizer(spec: tuple) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Cached per hyper-parameters, so equal configs reuse one jitted train step."""
  lr, wd, warmup_epochs, epochs, kind, clip, steps_per_epoch = spec
  warm = int(round(warmup_epochs * steps_per_epoch))
  total = epochs * steps_per_epoch
  if kind == "linear":
    after = optax.linear_schedule(lr, 0.0, max(total - warm, 1))
  else:
    after = optax.constant_schedule(lr)
  schedule = after if warm <= 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warm), after], [warm])
  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  parts.append(optax.adamw(schedule, weight_decay=wd))
  return optax.chain(*parts), schedule


def letter_weights(cfg: ml_collections.ConfigDict) -> tuple[float, float]:
  """``(rqvae.cf_weight, rqvae.diversity_weight)``; (0, 0) = plain LC-Rec RQ-VAE."""
  return float(cfg.cf_weight), float(cfg.diversity_weight)


def _letter_terms(model: rqvae.RQVAE, params: Any, out: rqvae.RQVAEOutput, batch: Mapping,
                  key: jax.Array, letter: tuple[float, float]
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted LETTER terms of one batch (``rqvae`` module docstring) and their metrics."""
  cf_w, div_w = letter
  extra, metrics = jnp.zeros((), jnp.float32), {}
  if cf_w > 0:
    cf = rqvae.cf_infonce(out.z_q, batch["cf"])
    extra, metrics["cf_loss"] = extra + cf_w * cf, cf
  if div_w > 0:
    codebooks = rqvae.get_codebooks({"params": params}, model.num_levels)
    keys = jax.random.split(jax.random.fold_in(key, 1), model.num_levels)
    div = []
    for l, cb in enumerate(codebooks):
      codes = jax.lax.stop_gradient(out.codes[:, l])
      pos, valid = rqvae.sample_cluster_positives(keys[l], codes, batch["clusters"][l])
      div.append(rqvae.diversity_loss(cb, codes, pos, valid))
    div = jnp.mean(jnp.stack(div))
    extra, metrics["diversity_loss"] = extra + div_w * div, div
  return extra, metrics


@functools.lru_cache(maxsize=16)
def _make_train_step(model: rqvae.RQVAE, tx: optax.GradientTransformation,
                     letter: tuple[float, float] | None = None):
  """Jitted ``(state, x [B, D]) -> (state, metrics)``; ``state`` is donated.

  With ``letter = (cf_weight, diversity_weight)`` the batch is a dict: ``x [B, D]``,
  ``cf [B, e_dim]`` (the items' collaborative embeddings, when cf_weight > 0) and
  ``clusters [L, K]`` (each level's code clusters, when diversity_weight > 0); the
  weighted LETTER terms join the loss. None = the batch is ``x``, LC-Rec's step.

  A step whose loss or updated params / optimizer state / batch statistics hold NaN or
  inf leaves them as they were (``step`` still advances) and reports ``is_finite`` 0.
  """
  mutable = ["batch_stats"] if model.batch_norm else False

  def step(state, batch):
    key = jax.random.fold_in(state["rng"], state["step"])
    x = batch["x"] if letter is not None else batch

    def loss(params):
      variables = {"params": params}
      if model.batch_norm:
        variables["batch_stats"] = state["batch_stats"]
      res = model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=mutable)
      out, updates = res if mutable else (res, {})
      total, metrics = rqvae.loss_fn(out, x)
      if letter is not None:
        extra, more = _letter_terms(model, params, out, batch, key, letter)
        total, metrics = total + extra, {**metrics, **more}
      return total, (metrics, updates)

    (total, (metrics, updates)), grads = jax.value_and_grad(loss, has_aux=True)(
        state["params"])
    upd, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = dict(state)
    new["params"] = optax.apply_updates(state["params"], upd)
    new["opt_state"] = opt_state
    new["step"] = state["step"] + 1
    if model.batch_norm:
      new["batch_stats"] = updates["batch_stats"]
    changed = [k for k in ("params", "opt_state", "batch_stats") if k in new]
    ok = jnp.isfinite(total) & finite.all_finite([new[k] for k in changed])
    for k in changed:
      new[k] = finite.select_tree(ok, new[k], state[k])
    return new, {"loss": total, **metrics, "is_finite": ok.astype(jnp.float32)}

  return jax.jit(step, donate_argnums=0)


def state_variables(state: Mapping[str, Any]) -> dict[str, Any]:
  """The model variables (``params`` and ``batch_stats`` if any) of a train state."""
  out = {"params": state["params"]}
  if "batch_stats" in state:
    out["batch_stats"] = state["batch_stats"]
  return out


def evaluate_codes(model: rqvae.RQVAE, variables: Any, x: np.ndarray) -> dict[str, Any]:
  """Argmax codes of all items: LC-Rec collision rate and per-level utilization."""
  codes = assign.argmax_codes(model, variables, x)
  k = model.codebook_size
  util = [float(len(np.unique(codes[:, l]))) / k for l in range(codes.shape[1])]
  return {"collision_rate": assign.collision_rate(codes), "utilization": util}


def _config_dict(cfg: Any) -> dict[str, Any]:
  """The rqvae settings as JSON values (checkpoint meta; compared on resume)."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
  return json.loads(json.dumps(d, default=list))


def _managers(ckpt_dir: str, keep: int) -> dict[str, ocp.CheckpointManager]:
  # orbax takes epath paths: gs:// directories go through epath, arrays through tensorstore
  out = {}
  for kind in CHECKPOINT_KINDS:
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep)) if kind == "latest" else 1, create=True,
        # multi-host: three managers' async commits interleave their cross-process
        # barriers differently on each host and hang (seen with two processes)
        enable_async_checkpointing=jax.process_count() == 1)
    out[kind] = ocp.CheckpointManager(fs.path(ckpt_dir) / kind, options=opts)
  return out


def _save(mngr: ocp.CheckpointManager, epoch: int, state: Any, meta: dict) -> None:
  if jax.process_count() > 1:  # every process trains the same copy on its own device;
    state = jax.device_get(state)  # orbax refuses host-local arrays, numpy it takes
  mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           meta=ocp.args.JsonSave(meta)), force=True)


def _restore(mngr: ocp.CheckpointManager, epoch: int, like: Any) -> tuple[Any, dict]:
  if jax.process_count() > 1:  # restored as numpy (see _save)
    abstract = jax.device_get(like)
  else:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  res = mngr.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    meta=ocp.args.JsonRestore()))
  return res["state"], res["meta"]


def _read_history(path: str, upto_epoch: int | None = None) -> list[dict]:
  if not fs.exists(path):
    return []
  rows = []
  for line in fs.read_text(path).splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by an interruption
      continue
    if upto_epoch is None or row.get("epoch", 0) <= upto_epoch:
      rows.append(row)
  return rows


def _write_history(path: str, rows: list[dict]) -> None:
  fs.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))  # process 0 only


def _check_resumable(meta: Mapping[str, Any], cfg: ml_collections.ConfigDict,
                     x: np.ndarray, seed: int, where: str) -> None:
  now = _config_dict(cfg)
  # a checkpoint written before the LETTER options had them off
  saved = {**{k: v for k, v in _ADDED_FIELDS.items() if k in now}, **dict(meta.get("config", {}))}
  diff = sorted(k for k in set(saved) | set(now)
                if k not in _BOOKKEEPING_FIELDS and saved.get(k) != now.get(k))
  problems = [f"rqvae.{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff]
  if meta.get("num_items") != x.shape[0] or meta.get("in_dim") != x.shape[1]:
    problems.append(f"embeddings: checkpoint [{meta.get('num_items')}, {meta.get('in_dim')}]"
                    f" vs now {list(x.shape)}")
  if meta.get("seed") != seed:
    problems.append(f"seed: checkpoint {meta.get('seed')} vs now {seed}")
  if problems:
    raise ConfigError(f"cannot resume from {where}: " + "; ".join(problems),
                      hint="use another --workdir or delete that directory to retrain")


def train_rqvae(cfg: ml_collections.ConfigDict, embeddings: np.ndarray, out_dir: str, *,
                seed: int, cf_embeddings: np.ndarray | None = None
                ) -> tuple[rqvae.RQVAE, dict[str, Any], list[dict]]:
  """Trains (or resumes training of) the RQ-VAE on all item embeddings.

  Args:
    cfg: the ``c.rqvae`` config (see ``configs/ml100k_quick.py``).
    embeddings: ``[N, D]`` float32 item embeddings (the training set: every item).
    out_dir: where ``metrics.jsonl`` and ``checkpoints/`` go (resumed when present).
    seed: seeds parameter init, k-means, shuffling and dropout.
    cf_embeddings: ``[N, e_dim]`` collaborative item embeddings (row i = item i), needed
      when ``rqvae.cf_weight > 0`` (LETTER's collaborative term). With
      ``rqvae.diversity_weight > 0`` each level's codes are re-clustered into
      ``rqvae.diversity_clusters`` at the start of every epoch (as LETTER does).

  Returns:
    ``(model, variables, history)``: the final variables (``params``, and
    ``batch_stats`` with batch norm) and the per-epoch metrics, the same rows as
    ``metrics.jsonl``: ``epoch``, ``step``, ``loss``, ``recon_mse``, ``quant_loss``
    (means over the epoch's items), ``lr`` (at the epoch's last step), ``time_s``, and
    at evaluation epochs ``collision_rate`` and ``utilization`` (per level; else null).
  """
  with quiet_orbax():
    return _train_rqvae(cfg, embeddings, out_dir, seed=seed, cf_embeddings=cf_embeddings)


def _check_cf(cfg: ml_collections.ConfigDict, cf: np.ndarray | None, n: int) -> np.ndarray | None:
  """The collaborative embeddings as float32 ``[n, e_dim]`` when cf_weight > 0, else None."""
  if letter_weights(cfg)[0] <= 0:
    return None
  if cf is None:
    raise ConfigError("rqvae.cf_weight > 0 needs collaborative item embeddings "
                      "(rqvae.cf_embeddings: a .npy of [num_items, e_dim])")
  cf = np.asarray(cf, np.float32)
  if cf.shape != (n, int(cfg.e_dim)):
    raise ConfigError(f"rqvae.cf_embeddings: shape {list(cf.shape)}, expected [{n}, "
                      f"{int(cfg.e_dim)}] (num_items, rqvae.e_dim)")
  if not np.all(np.isfinite(cf)):
    raise ConfigError("rqvae.cf_embeddings: contains NaN or inf")
  return cf


def _train_rqvae(cfg: ml_collections.ConfigDict, embeddings: np.ndarray, out_dir: str, *,
                 seed: int, cf_embeddings: np.ndarray | None = None
                 ) -> tuple[rqvae.RQVAE, dict[str, Any], list[dict]]:
  """:func:`train_rqvae` without the orbax log filter.

  Longer than the ~80-line rule on purpose: the epoch loop's closures (train epoch, the
  collision evaluation, the three checkpoint series) share its state. It keeps its own
  orbax managers rather than :class:`lcrec_jax.runtime.checkpoint.Checkpointer`: it saves
  three series (``latest`` keep-N, ``best_collision``, ``best_loss``) per epoch, and
  moving them would change the checkpoint layout existing workdirs resume from.
  """
  x = np.asarray(embeddings, np.float32)
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"embeddings must be [num_items, dim], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("embeddings contain NaN or inf")
  n, dim = x.shape
  cf = _check_cf(cfg, cf_embeddings, n)
  letter = letter_weights(cfg) if any(w > 0 for w in letter_weights(cfg)) else None
  epochs = int(cfg.epochs)
  bs = max(1, min(int(cfg.batch_size), n))
  steps_per_epoch = math.ceil(n / bs)
  eval_every = max(1, int(cfg.eval_every))
  ckpt_every = max(1, int(cfg.checkpoint_every))

  index_dir = out_dir
  fs.makedirs(index_dir)
  metrics_path = fs.join(index_dir, "metrics.jsonl")
  mngrs = _managers(fs.join(index_dir, "checkpoints"), cfg.keep_checkpoints)

  model = make_model(cfg, dim)
  tx, schedule = make_optimizer(cfg, steps_per_epoch)
  root = jax.random.PRNGKey(seed)
  k_init, k_kmeans, k_dropout = jax.random.split(root, 3)
  variables = model.init({"params": k_init, "dropout": k_init}, jnp.asarray(x[:bs]),
                         train=False)
  variables = jax.tree.map(jnp.asarray, dict(variables))
  state = {"params": variables["params"], "opt_state": tx.init(variables["params"]),
           "step": jnp.zeros((), jnp.int32), "rng": k_dropout}
  if model.batch_norm:
    state["batch_stats"] = variables["batch_stats"]

  latest_dir = fs.path(index_dir) / "checkpoints" / "latest"

  def load(step: int) -> tuple[Any, dict]:
    # A checkpoint of another run is a config error, not a corrupt checkpoint: checked
    # on its meta first, so that other shapes never reach orbax.
    saved = mngrs["latest"].restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    _check_resumable(saved, cfg, x, seed, str(latest_dir / str(step)))
    return _restore(mngrs["latest"], step, state)

  try:
    start, restored = ckpt_lib.restore_newest(
        mngrs["latest"], latest_dir, load, "rqvae",
        is_finite=lambda out: bool(finite.all_finite(out[0])))
  except BaseException:
    for m in mngrs.values():
      m.close()
    raise

  meta = {"epoch": 0, "best_collision_rate": None, "best_loss": None,
          "num_items": n, "in_dim": dim, "seed": int(seed), "config": _config_dict(cfg)}
  if start is not None:
    where = str(latest_dir / str(start))
    state, meta = restored
    start = int(meta["epoch"])
    for kind in ("best_collision", "best_loss"):  # written after `start`: redone below
      for s in mngrs[kind].all_steps():
        if s > start:
          mngrs[kind].delete(s)
    history = _read_history(metrics_path, upto_epoch=start)
    logging.info("rqvae: resuming from %s (epoch %d of %d)", where, start, epochs)
  else:
    start = 0
    if cfg.kmeans_init:
      t0 = time.time()
      variables = rqvae.init_codebooks_kmeans(variables, model, jnp.asarray(x), k_kmeans,
                                              int(cfg.kmeans_iters))
      state["params"] = variables["params"]
      logging.info("rqvae: k-means codebook init in %.1fs", time.time() - t0)
      state["opt_state"] = tx.init(state["params"])
    history = []
  _write_history(metrics_path, history)

  x_dev = jnp.asarray(x)
  cf_dev = None if cf is None else jnp.asarray(cf)
  k_clusters = jax.random.fold_in(root, 0x4C4554)  # LETTER's per-epoch code clusters

  def clusters(e: int) -> jax.Array:
    """``[L, K]`` each level's code clusters from the current codebooks (epoch e + 1)."""
    cbs = rqvae.get_codebooks({"params": loop.state["params"]}, model.num_levels)
    return jnp.stack([rqvae.cluster_codes(jax.random.fold_in(k_clusters, e * 64 + l), cb,
                                          int(cfg.diversity_clusters))
                      for l, cb in enumerate(cbs)])

  def batches(e: int, pos: int):
    """Item rows of epoch e + 1 (LC-Rec counts from 1), shuffled by (seed, e + 1)."""
    perm = np.random.default_rng([int(seed), e + 1]).permutation(n)
    labels = clusters(e) if letter is not None and letter[1] > 0 else None
    for b in range(pos, steps_per_epoch):
      idx = jnp.asarray(perm[b * bs:(b + 1) * bs])
      if letter is None:
        yield x_dev[idx]
        continue
      batch = {"x": x_dev[idx]}
      if cf_dev is not None:
        batch["cf"] = cf_dev[idx]
      if labels is not None:
        batch["clusters"] = labels
      yield batch

  row: dict[str, Any] = {}

  def on_epoch(info: loop_lib.EpochInfo) -> None:  # one metrics read per epoch
    nonlocal row
    bad = sum(1 for s in info.steps if s.metrics["is_finite"] < 1.0)
    if bad:
      for m in mngrs.values():
        m.wait_until_finished()
      last = mngrs["latest"].latest_step()
      where = (f"the last checkpoint (finite) is epoch {last} under {latest_dir}"
               if last is not None else "no checkpoint was written yet")
      raise finite.NonFiniteError(
          f"rqvae: {bad} of {steps_per_epoch} steps of epoch {info.number} had a NaN/inf loss "
          f"or update (not applied); training stops; {where}",
          hint="re-run with a lower --config.rqvae.lr in a new --workdir (an RQ-VAE run "
               "resumes only with the config it started with)")
    sizes = [min(bs, n - (s.pos - 1) * bs) for s in info.steps]  # the last batch is short
    row = {"epoch": info.number, "step": info.step,
           **{k: info.mean(k, sizes) for k in info.steps[0].metrics if k != "is_finite"},
           "lr": float(schedule(info.step - 1)), "collision_rate": None, "utilization": None}
    bar.set_postfix(loss=row["loss"])

  def evaluate(info: loop_lib.EpochInfo) -> None:  # and keep the best two checkpoints
    row.update(evaluate_codes(model, state_variables(loop.state), x))
    cr, loss = row["collision_rate"], row["loss"]
    if meta["best_collision_rate"] is None or cr <= meta["best_collision_rate"]:
      meta.update(best_collision_rate=cr, epoch=info.number)
      _save(mngrs["best_collision"], info.number, loop.state, dict(meta))
    if meta["best_loss"] is None or loss < meta["best_loss"]:
      meta.update(best_loss=loss, epoch=info.number)
      _save(mngrs["best_loss"], info.number, loop.state, dict(meta))
    bar.set_postfix(loss=loss, collisions=cr)
    logging.info("rqvae epoch %d/%d: loss %.5f (recon %.5f, quant %.5f), lr %.2e, "
                 "collision rate %.4f, code usage per level %s", info.number, epochs, loss,
                 row["recon_mse"], row["quant_loss"], row["lr"], cr,
                 " ".join(f"{u:.0%}" for u in row["utilization"]))

  def record(info: loop_lib.EpochInfo) -> None:
    history.append({**row, "time_s": round(info.elapsed_s(), 4)})
    mfile.write(json.dumps(history[-1]) + "\n")
    mfile.flush()

  def save_latest(info: loop_lib.EpochInfo) -> None:
    meta["epoch"] = info.number
    mfile.flush(force=True)  # the rows up to a checkpoint are on disk before it
    _save(mngrs["latest"], info.number, loop.state, dict(meta))
    interrupt.raise_if_requested()  # a Ctrl-C orbax swallowed while it waited on a save

  bar = progress_lib.Progress(epochs, "rqvae", "epoch", initial=start)
  loop = loop_lib.Loop(
      _make_train_step(model, tx, letter), batches, state, num_steps=epochs * steps_per_epoch,
      steps_per_epoch=steps_per_epoch, start=loop_lib.Position(start * steps_per_epoch, start),
      fetch="epoch", on_epoch=on_epoch, epoch_actions=[
          loop_lib.Periodic(evaluate, every=eval_every, at_end=True),
          loop_lib.Periodic(record, every=1),
          loop_lib.Periodic(save_latest, every=ckpt_every, at_end=True)],
      progress=bar, name="rqvae")
  try:
    with fs.AppendLog(metrics_path) as mfile:  # process 0 only; gs:// rewrites, throttled
      loop.run()
  finally:
    for m in mngrs.values():
      m.wait_until_finished()
      m.close()
  interrupt.raise_if_requested()
  if start >= epochs:
    logging.info("rqvae: training already complete (%d epochs)", epochs)
  return model, state_variables(loop.state), history


def load_checkpoint_variables(out_dir: str, kind: str, model: rqvae.RQVAE,
                              like: Mapping[str, Any], cfg: ml_collections.ConfigDict
                              ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Variables of a saved checkpoint: ``kind`` in ``latest``, ``best_collision``, ``best_loss``.

  Args:
    out_dir: the directory given to :func:`train_rqvae`.
    kind: which checkpoint directory.
    model: the trained model (its optimizer-state structure is rebuilt from ``cfg``).
    like: variables with the right structure (e.g. what :func:`train_rqvae` returned).
    cfg: the ``c.rqvae`` config the run used.

  Returns:
    ``(variables, meta)``; ``meta["epoch"]`` is the epoch the checkpoint was taken at.

  Raises:
    lcrec_jax.errors.WorkdirError: the checkpoint does not load or holds NaN/inf.
  """
  with quiet_orbax():
    return _load_checkpoint_variables(out_dir, kind, model, like, cfg)


def _load_checkpoint_variables(out_dir, kind, model, like, cfg):
  """:func:`load_checkpoint_variables` without the orbax log filter."""
  if kind not in CHECKPOINT_KINDS:
    raise ValueError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
  path = fs.path(out_dir) / "checkpoints" / kind
  mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
  step = mngr.latest_step()
  if step is None:
    mngr.close()
    raise FileNotFoundError(f"no checkpoint under {path}")
  n = 1  # the optimizer state's shapes do not depend on the number of items
  tx, _ = make_optimizer(cfg, n)
  like = dict(like)
  state = {"params": like["params"], "opt_state": tx.init(like["params"]),
           "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0)}
  if model.batch_norm:
    state["batch_stats"] = like["batch_stats"]
  try:  # a broken checkpoint is one WorkdirError line, not an orbax traceback
    _, (state, meta) = ckpt_lib.restore_newest(
        mngr, path, lambda s: _restore(mngr, s, state), f"rqvae {kind}",
        is_finite=lambda out: bool(finite.all_finite(out[0])))
  finally:
    mngr.close()
  return state_variables(state), meta
