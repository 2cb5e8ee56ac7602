"""The fine-tuning loop: sharded state, resumable data position, checkpoints, metrics.

    result = train(config, out_dir, model, params, batches, steps_per_epoch)

`batches(epoch, start_step)` must yield the batches of `epoch` from step
`start_step` on, deterministically (same arguments, same batches), as dicts of
`[batch, len]` numpy arrays with keys `tokens`, `labels`, `attention_mask`,
`positions` (see `step.py` for the label convention). A resumed run asks for
exactly the batches the interrupted run had not yet consumed. With several
processes each yields only its own `train.batch_size / process_count` rows, process p
rows `[p * B / P, (p + 1) * B / P)` (as `Batcher.batches(seed, epoch, start,
process_index, process_count)` does); on one host that is the whole batch.

What is written under `out_dir` (the train stage's `<workdir>/train/`):
  checkpoints/<step>/   orbax: trainable params, optimizer state, step, RNG + data position
  metrics.jsonl         one JSON object per logged step / evaluation
  tb/                   TensorBoard event file (scalars)

Frozen params (trainable mask False, e.g. a LoRA base) are not checkpointed: they are
the `params` given to `train`, which a resumed run passes again.

The step loop is `lcrec_jax.runtime.loop.Loop`: step N's metrics are read on the host only
after step N+1 has been dispatched (the host does not wait on the device between steps).
Checkpoint, validation and last steps are read before their action runs, so a checkpoint
never holds a state whose step reported a non-finite update, and a non-finite step stops
the run (or is counted as skipped) before anything later is saved. A `step_hook` hence
sees step N while step N+1 runs; a preemption noticed then saves at step N+1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lcrec_jax import fs
from lcrec_jax import progress as progress_lib
from lcrec_jax.errors import ConfigError
from lcrec_jax.llm.config import DTYPES
from lcrec_jax.llm.lora import LoraTree
from lcrec_jax import interrupt
from lcrec_jax.runtime import checkpoint as ckpt_lib
from lcrec_jax.train import divergence
from lcrec_jax.runtime import finite as finite_lib
from lcrec_jax.runtime import loop as loop_lib
from lcrec_jax.train import mesh as mesh_lib
from lcrec_jax.train import state as state_lib
from lcrec_jax.train import step as step_lib
from lcrec_jax.runtime import summaries

PyTree = Any
Batch = Mapping[str, np.ndarray]
BatchFn = Callable[[int, int], Iterable[Batch]]
# A validation hook: (step, state) -> metrics such as {"HR@10": ..., "NDCG@10": ...}.
EvalCallback = Callable[[int, state_lib.TrainState], Mapping[str, float]]
# Called after every step with the step number and its (host) metrics.
StepHook = Callable[[int, Mapping[str, float]], None]


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    state: the final `TrainState` (sharded).
    step: optimizer steps done in total (including steps before a resume).
    history: per-step host metrics of this call.
    evals: evaluation records of this call (`{"step": s, "valid/loss": ...}`).
    stopped_early: True when a preemption signal ended the run before `num_steps`.
    resumed_from: the checkpoint step this call started from, or None.
  """
  state: state_lib.TrainState
  step: int
  history: list[dict[str, float]]
  evals: list[dict[str, float]]
  stopped_early: bool
  resumed_from: int | None


ON_NONFINITE = ("stop", "skip")


class NonFiniteLossError(finite_lib.NonFiniteError):
  """A step's loss, gradients or update were NaN/inf and the policy says stop.

  The update was not committed: the checkpoints (and the state) hold finite values only.
  """


def _model_dims(model: nn.Module) -> tuple[int | None, int | None]:
  """(num_layers, hidden size) of a LLaMA-like model config, for the attention FLOPs."""
  cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
  if cfg is None:
    return None, None
  layers = next((getattr(cfg, n) for n in ("num_layers", "num_hidden_layers", "n_layers")
                 if hasattr(cfg, n)), None)
  hidden = next((getattr(cfg, n) for n in ("hidden_size", "dim", "d_model", "embed_dim")
                 if hasattr(cfg, n)), None)
  return layers, hidden


def _check_params(params: PyTree, boxed: PyTree) -> None:
  want = jax.tree.structure(nn.unbox(boxed))
  got = jax.tree.structure(nn.unbox(params))
  if want != got:
    raise ValueError("train: the given params do not have the model's param tree structure "
                     f"(model.init gives {want}, got {got})")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(params)),
                          jax.tree.leaves(nn.unbox(boxed))):
    if tuple(a.shape) != tuple(b.shape):
      raise ValueError(f"train: param {jax.tree_util.keystr(path)} has shape {a.shape}, "
                       f"the model expects {b.shape}")


def _check_batch(batch: Batch, batch_size: int, max_label_tokens: int, step: int,
                 keys: tuple[str, ...] = step_lib.BATCH_KEYS) -> None:
  for k in keys:
    if k not in batch:
      raise KeyError(f"train: batch at step {step} lacks {k!r} (need {keys})")
  local = batch_size // jax.process_count()
  if batch["tokens"].shape[0] != local:
    raise ValueError(f"train: batch at step {step} has {batch['tokens'].shape[0]} rows, "
                     f"expected train.batch_size / processes = {batch_size} / "
                     f"{jax.process_count()}")
  if max_label_tokens > 0:
    per_example = (np.asarray(batch["labels"])[:, 1:] != step_lib.IGNORE).sum(1)
    if per_example.max(initial=0) > max_label_tokens:
      raise ValueError(
          f"train: an example at step {step} has {per_example.max()} label tokens, more than "
          f"train.max_label_tokens={max_label_tokens}; raise it (0 = sequence length)")


def _ckpt_tree(state: state_lib.TrainState) -> dict[str, Any]:
  """What goes into a checkpoint: everything but the frozen params."""
  return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
          "rng": state.rng}


def _after_divergence(train_dir: str, ckpt: ckpt_lib.Checkpointer) -> None:
  """After a non-finite stop: moves the checkpoints whose loss is a spike aside, so the
  restore takes the newest healthy one (:mod:`lcrec_jax.train.divergence`)."""
  choice = divergence.choose(train_dir)
  if choice is None:
    return
  logging.warning("train: %s", choice.describe())
  for step, _ in choice.spikes:
    ckpt_lib.set_aside(ckpt.directory, step, "spike")
  ckpt.reload()
  if fs.is_primary():
    fs.remove(divergence.marker_path(train_dir))
  fs.barrier("train_divergence_choice")


def evaluate_loss(eval_fn: Callable, state: state_lib.TrainState, batches: Iterable[Batch],
                  mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Mean label-token loss over `batches` (sum of losses / number of label tokens)."""
  total, count = 0.0, 0.0
  for b in batches:
    b = {k: np.asarray(b[k]) for k in step_lib.BATCH_KEYS}
    out = jax.device_get(eval_fn(state, mesh_lib.shard_batch_from_host(b, mesh,
                                                                        host_local=True)))
    total += float(out["loss_sum"])
    count += float(out["label_tokens"])
  return {"loss": total / max(count, 1.0), "label_tokens": count}


def _checked(tc: Any, mesh: jax.sharding.Mesh, steps_per_epoch: int
             ) -> tuple[int, int, Any]:
  """``(num_steps, grad_accum_steps, compute dtype)`` of the train settings, checked
  against the mesh (the batch splits over grad_accum x data x fsdp)."""
  if steps_per_epoch <= 0:
    raise ValueError(f"train: steps_per_epoch must be positive, got {steps_per_epoch}")
  num_steps = int(tc.num_steps) if tc.num_steps > 0 else int(tc.epochs) * steps_per_epoch
  accum = max(int(tc.grad_accum_steps), 1)
  batch_size = int(tc.batch_size)
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % (accum * batch_ways):
    raise ValueError(
        f"train.batch_size={batch_size} must be divisible by grad_accum_steps ({accum}) x "
        f"mesh data*fsdp ({batch_ways})")
  if tc.compute_dtype not in DTYPES:
    raise ValueError(f"train.compute_dtype: {tc.compute_dtype!r} is not one of {list(DTYPES)}")
  if str(tc.on_nonfinite) not in ON_NONFINITE:
    raise ConfigError(f"train.on_nonfinite: {tc.on_nonfinite!r} is not one of {ON_NONFINITE}")
  return num_steps, accum, DTYPES[tc.compute_dtype]


def _initial_state(tc: Any, train_dir: str, ckpt: Any, params: PyTree, tx: Any,
                   shardings: Any, boxed: PyTree, trainable_mask: PyTree | None,
                   is_main: bool) -> tuple[Any, int, int, int | None, Any]:
  """``(state, epoch, step in epoch, resumed_from, metrics writer)``: the newest
  checkpoint that loads and is finite (broken ones are moved aside; the frozen part
  comes from ``params``), else a fresh state seeded by ``train.seed``."""
  state = None
  _after_divergence(train_dir, ckpt)
  epoch, pos = 0, 0
  abstract = state_lib.abstract_state(shardings, boxed, tx, trainable_mask, params=params)
  resumed_from, restored, data = ckpt.restore_latest(_ckpt_tree(abstract))
  if resumed_from is not None:
    _, frozen = state_lib.split_params(nn.unbox(params), trainable_mask)
    frozen = jax.jit(lambda x: jax.tree.map(jnp.copy, x), out_shardings=shardings.frozen)(frozen)
    state = state_lib.TrainState(step=restored["step"], trainable=restored["trainable"],
                                 frozen=frozen, opt_state=restored["opt_state"],
                                 rng=restored["rng"])
    epoch, pos = int(data["epoch"]), int(data["step_in_epoch"])
  writer = summaries.MetricsWriter(train_dir, enabled=is_main,
                                     tensorboard=tc.tensorboard,
                                     drop_after_step=resumed_from or 0)
  if resumed_from is not None:
    logging.info("train: resumed from step %d (epoch %d, step %d in epoch)", resumed_from,
                 epoch, pos)
  else:
    state = state_lib.create_train_state(params, tx, shardings,
                                         jax.random.PRNGKey(int(tc.seed)),
                                         trainable_mask)
  return state, epoch, pos, resumed_from, writer


def train(config: ml_collections.ConfigDict, out_dir: str | os.PathLike, model: nn.Module,
          params: PyTree, batches: BatchFn, steps_per_epoch: int, *,
          trainable_mask: PyTree | None = None,
          eval_batches: Callable[[], Iterable[Batch]] | None = None,
          eval_callbacks: Sequence[EvalCallback] = (),
          step_hook: StepHook | None = None,
          mesh: jax.sharding.Mesh | None = None,
          tx_tail: Any = None, packed: bool = False) -> TrainResult:
  """Trains (or resumes training) `model` from `params`.

  Longer than the ~80-line rule on purpose: after the checks (`_checked`) and the state
  (`_initial_state`) it is the step loop's wiring, five small closures (train step,
  evaluations, logging, checkpoint save, the non-finite policy) that share the loop's
  state; split apart they would pass that state around by hand.

  Args:
    config: full config; uses `config.train` and `config.mesh`: the run's settings
      (`lcrec_jax.pipeline.spec.RunSettings`) or any object with those sections complete.
    out_dir: where checkpoints, metrics and events go (the train stage's
      `<workdir>/train/`). If it holds a checkpoint, training resumes from the newest one.
    model: the Linen LLaMA (`lcrec_jax.llm.model.Llama`) or any module with the same
      call signature and a `logits` method.
    params: unboxed initial params (pretrained or fresh), or for LoRA
      `lcrec_jax.llm.lora.LoraTree(params=base, lora=adapters)` (adapters applied on the
      fly; pair with `trainable_mask=lora.trainable_mask(that tree)`). On resume, the
      frozen part is taken from here and the trainable part from the checkpoint.
    batches: `batches(epoch, start_step)` -> iterable of global numpy batches.
    steps_per_epoch: batches per epoch.
    trainable_mask: bool tree like `params` (None = train everything), e.g. LoRA's.
    eval_batches: `() -> iterable` of validation batches for the validation loss.
    eval_callbacks: extra validation hooks (e.g. HR/NDCG by beam search), run with the
      validation loss; their metrics are logged under `valid/`.
    step_hook: called as `step_hook(step, metrics)` for every step, once its metrics
      are read (one step late, see the module docstring; progress reporting, tests).
    mesh: use this mesh instead of building one from `config.mesh`.
    tx_tail: an optax transform appended after AdamW, e.g. `lora.freeze_rows(n)` to
      keep the original vocabulary rows fixed.
    packed: the training batches are packed rows with `segment_ids` (`tasks.pack_length`;
      `step.PACKED_KEYS`); validation batches stay unpacked.

  Returns:
    A `TrainResult`.

  Raises:
    NonFiniteLossError: a step's loss, gradients or update were NaN/inf and
      `train.on_nonfinite` is "stop" (or "skip" ran `train.max_nonfinite_skips` such
      steps in a row). Such an update is never committed, so the state and every
      checkpoint stay finite; the message names the newest checkpoint.
  """
  tc = config.train
  if tc.distributed and not jax.distributed.is_initialized():
    mesh_lib.maybe_initialize_distributed(True)
  mesh_cfg = config.mesh
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(mesh_cfg)
  rules = mesh_lib.axis_rules(mesh_cfg)
  num_steps, accum, compute_dtype = _checked(tc, mesh, steps_per_epoch)
  batch_size, max_label_tokens = int(tc.batch_size), int(tc.max_label_tokens)
  on_nonfinite, max_skips = str(tc.on_nonfinite), int(tc.max_nonfinite_skips)

  tx, schedule = state_lib.make_optimizer(tc, num_steps, tail=tx_tail)
  boxed = state_lib.abstract_boxed_params(model, np.zeros((1, 8), np.int32))
  _check_params(params.params if isinstance(params, LoraTree) else params, boxed)
  shardings = state_lib.state_shardings(tx, boxed, trainable_mask, mesh, rules, params)

  train_dir = os.fspath(out_dir)  # local or gs://
  is_main = fs.is_primary()
  ckpt = ckpt_lib.Checkpointer(fs.path(train_dir) / "checkpoints",
                               save_every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                               async_save=tc.async_checkpoint)

  state, epoch, pos, resumed_from, writer = _initial_state(
      tc, train_dir, ckpt, params, tx, shardings, boxed, trainable_mask, is_main)

  step_fn = step_lib.make_train_step(
      model, tx, shardings=shardings, mesh=mesh, rules=rules, schedule=schedule,
      grad_accum_steps=accum, max_label_tokens=max_label_tokens, compute_dtype=compute_dtype,
      packed=packed)
  batch_keys = step_lib.PACKED_KEYS if packed else step_lib.BATCH_KEYS
  eval_fn = step_lib.make_eval_step(model, shardings=shardings, mesh=mesh, rules=rules,
                                    max_label_tokens=max_label_tokens,
                                    compute_dtype=compute_dtype)
  batch_sharding = step_lib.train_batch_sharding(mesh, accum)

  n_params = state_lib.count_params(params)
  layers, hidden = _model_dims(model)
  log_every = max(int(tc.log_every), 1)
  history: list[dict[str, float]] = []
  evals: list[dict[str, float]] = []
  step = int(jax.device_get(state.step))
  start = loop_lib.Position(step, epoch, pos)

  def run_evals(at_step: int) -> None:
    if eval_batches is None and not eval_callbacks:
      return
    record: dict[str, float] = {}
    if eval_batches is not None:
      out = evaluate_loss(eval_fn, loop.state, eval_batches(), mesh)
      record.update({"valid/loss": out["loss"], "valid/label_tokens": out["label_tokens"]})
    for cb in eval_callbacks:
      record.update({f"valid/{k}": float(v) for k, v in cb(at_step, loop.state).items()})
    writer.write(at_step, record)
    evals.append({"step": at_step, **record})
    logging.info("train: step %d validation %s", at_step, record)

  def non_finite(info: loop_lib.StepInfo, why: str) -> NonFiniteLossError:
    ckpt.wait()
    last = ckpt.latest_step()
    m = info.metrics
    if is_main:  # the next run resumes from a checkpoint before the spike
      divergence.write_marker(train_dir, info.step, float(m["loss"]), last)
    where = (f"the last checkpoint (finite) is step {last} under {ckpt.directory}"
             if last is not None else "no checkpoint was written yet")
    return NonFiniteLossError(
        f"train: {why} at step {info.step} (epoch {info.epoch}; loss {m['loss']}, gradient "
        f"norm {m['grad_norm']}); the update was not applied and training stops; {where}",
        hint=("re-run with a lower --config.train.lr (it resumes from the newest checkpoint "
              "whose loss is not a spike; --force=train starts over), "
              if last is not None else "re-run with a lower --config.train.lr, ")
             + "check the data, or set --config.train.on_nonfinite=skip")

  def train_step(state: state_lib.TrainState, batch: Batch) -> tuple[Any, dict[str, Any]]:
    """Host batch -> sharded batch -> one jitted step (its metrics are not read here)."""
    _check_batch(batch, batch_size, max_label_tokens, loop.step, batch_keys)
    host = {k: np.asarray(batch[k]) for k in batch_keys}
    if accum > 1:
      host = step_lib.split_micro_batches(host, accum)
    dev = mesh_lib.shard_batch_from_host(host, mesh, batch_sharding,
                                         batch_dim=1 if accum > 1 else 0, host_local=True)
    state, m = step_fn(state, dev)
    return state, {**m, "seq_len": host["tokens"].shape[-1]}

  skips_in_row = 0

  def on_step(info: loop_lib.StepInfo) -> None:
    """Step N's metrics (read one step late): non-finite policy, metrics, progress, hook."""
    nonlocal skips_in_row
    m = info.metrics
    seq_len = int(m.pop("seq_len"))
    if m["is_finite"] < 1.0:  # the step left params and optimizer state unchanged
      why = ("the loss is not finite" if not math.isfinite(m["loss"]) else
             "the gradients are not finite" if not math.isfinite(m["grad_norm"]) else
             "the update made the params or optimizer state non-finite")
      skips_in_row += 1
      if on_nonfinite == "stop":
        raise non_finite(info, why)
      if skips_in_row > max_skips:
        raise non_finite(info, f"{why} ({skips_in_row} steps in a row, more than "
                         f"train.max_nonfinite_skips={max_skips})")
      logging.warning("train: step %d skipped: %s (loss %s); %d in a row", info.step, why,
                      m["loss"], skips_in_row)
    else:
      skips_in_row = 0
    m["step_time_s"] = info.time_s
    m["tokens_per_s"] = m["tokens"] / info.time_s  # global tokens (all hosts)
    m["epoch"] = info.epoch + info.pos / steps_per_epoch
    fpt = summaries.train_flops_per_token(n_params, layers or 0, hidden or 0, seq_len)
    util = summaries.mfu(m["tokens_per_s"], fpt, tc.peak_flops_per_device,
                           jax.device_count())
    if util is not None:
      m["mfu"] = util
    history.append({"step": info.step, **m})
    if info.step % log_every == 0 or info.step == num_steps:
      writer.write(info.step, m, prefix="train/")
    postfix = {"loss": m["loss"], "tok/s": f"{m['tokens_per_s']:.0f}"}
    if util is not None:
      postfix["mfu"] = f"{util:.1%}"
    progress.set_postfix(**postfix)
    if step_hook is not None:
      step_hook(info.step, m)

  def save(info: loop_lib.StepInfo) -> None:
    loss = info.metrics.get("loss")  # read before the save (the loop delivers it first)
    data = {**info.data_position(),
            "loss": float(loss) if loss is not None and math.isfinite(loss) else None}
    ckpt.save(info.step, _ckpt_tree(loop.state), data, force=True)

  def save_preempted(info: loop_lib.StepInfo) -> None:
    save(info)
    logging.warning("train: %s at step %d: checkpoint saved, stopping",
                    "Ctrl-C" if interrupt.requested() else "preemption signal", info.step)

  ckpt.install_sigterm_handler()
  progress = progress_lib.Progress(num_steps, "train", "step", initial=step,
                                   every_s=float(tc.progress_log_s),
                                   enabled=is_main)
  loop = loop_lib.Loop(
      train_step, batches, state, num_steps=num_steps, steps_per_epoch=steps_per_epoch, start=start,
      fetch="late", on_step=on_step,
      step_actions=[loop_lib.Periodic(save, every=ckpt.save_every, at_end=True),
                    loop_lib.Periodic(lambda info: run_evals(info.step),
                                      every=int(tc.eval_every), at_end=True)],
      preempted=lambda s: ckpt.reached_preemption(s) or interrupt.requested(),
      on_preempt=save_preempted, progress=progress)
  try:
    # Ctrl-C: the first one asks the loop to save at the next step and stop (orbax would
    # swallow a KeyboardInterrupt raised while it waits for a save); a second one raises.
    with interrupt.graceful():
      outcome = loop.run()
    if outcome.steps_run == 0:  # resumed at the end: the final validation only
      run_evals(step)
  finally:  # the loop closed the progress report
    ckpt.close()
    writer.close()
  interrupt.raise_if_requested()  # after the save: the next run resumes from it
  return TrainResult(state=loop.state, step=loop.step, history=history, evals=evals,
                     stopped_early=outcome.reason == "preempted", resumed_from=resumed_from)
