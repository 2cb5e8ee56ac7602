"""The RL loop: rollout, rewards, GRPO updates, on the shared training-loop skeleton.

    result = train_rl(config, out_dir, model, sft_params, decoder, prompts)

One loop step (:class:`lcrec_jax.runtime.loop.Loop`) is: take the step's prompts (a
deterministic permutation per epoch, seeded by ``rl.seed`` and the epoch), roll them out
with the evaluation's beam search under the current policy (:mod:`lcrec_jax.rl.rollout`),
score the beams (:mod:`lcrec_jax.rl.rewards`), normalise advantages per group, compute the
frozen reference's (and, for ``rl.num_iterations > 1``, the rollout policy's) code-token
log-probs by teacher forcing, and run ``rl.num_iterations`` optimizer steps on the GRPO
loss (:mod:`lcrec_jax.rl.grpo`). The reference is the SFT params, never updated.

Zero-advantage groups (every beam misses: all rewards equal), ``rl.zero_adv``:
``keep`` (in the loss: only the KL term moves them), ``skip`` (weight 0: the policy term
is averaged over informative groups only), ``oversample`` (roll out ``rl.oversample`` x
``rl.prompts_per_step`` prompts and train on the first ``prompts_per_step`` informative
groups, topped up with uninformative ones when too few; the update batch keeps its
static shape). Their share is logged every step (``zero_adv_share``, before the remedy).

Under ``out_dir`` (``<workdir>/rl``): ``checkpoints/<step>/`` (orbax: the policy as the
trainable tree, optimizer state, optimizer step, RNG, plus the data position; the same
layout as the SFT checkpoints, so :mod:`lcrec_jax.eval.restore` reads it),
``metrics.jsonl`` and ``tb/`` (reward, KL, zero-advantage share, hit rate, time split).
An interrupted run resumes from its newest checkpoint at the same data position and, the
rollouts being deterministic, reaches the same params as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lcrec_jax import fs
from lcrec_jax import progress as progress_lib
from lcrec_jax.llm.config import DTYPES
from lcrec_jax.rl import grpo, rewards as rewards_lib, rollout as rollout_lib
from lcrec_jax.runtime import checkpoint as ckpt_lib
from lcrec_jax.runtime import finite as finite_lib
from lcrec_jax.runtime import loop as loop_lib
from lcrec_jax.train import mesh as mesh_lib
from lcrec_jax.train import state as state_lib
from lcrec_jax.runtime import summaries
from lcrec_jax.train.trainer import TrainResult

PyTree = Any
ZERO_ADV = ("keep", "skip", "oversample")


@dataclasses.dataclass(frozen=True)
class RLSettings:
  """The ``rl`` section, checked; every field required (defaults and ranges: the run spec,
  :mod:`lcrec_jax.pipeline.spec`, ``rl.*``)."""
  num_steps: int
  prompts_per_step: int
  num_generations: int
  num_iterations: int
  lr: float
  schedule: str
  warmup_steps: int
  weight_decay: float
  max_grad_norm: float
  beta: float
  clip_eps: float
  reward_ranking: float
  reward_partial: float
  zero_adv: str
  oversample: int
  exclude_seen: bool
  prefixes_per_user: int
  seed: int
  rollout_batch_size: int
  checkpoint_every: int
  keep_checkpoints: int
  eval_every: int
  reward_collab: float
  collab_sasrec: str

  @classmethod
  def from_config(cls, cfg_rl: Any) -> "RLSettings":
    out = cls(**{f.name: getattr(cfg_rl, f.name) for f in dataclasses.fields(cls)})
    if out.zero_adv not in ZERO_ADV:
      raise ValueError(f"rl.zero_adv={out.zero_adv!r}: one of {ZERO_ADV}")
    return out

  @property
  def rollout_prompts(self) -> int:
    """Prompts rolled out per step."""
    return self.prompts_per_step * (self.oversample if self.zero_adv == "oversample" else 1)

  def reward_weights(self) -> dict[str, float]:
    return {"ranking": self.reward_ranking, "partial": self.reward_partial,
            "collab": self.reward_collab}


# What train_rl returns: the SFT trainer's result type (final state, loop steps done,
# per-step host metrics, validation records, whether a preemption stopped it, the
# checkpoint it resumed from).
RLResult = TrainResult


def _optimizer(st: RLSettings, tc: Any, num_updates: int):
  cfg = ml_collections.ConfigDict(dict(
      lr=st.lr, schedule=st.schedule, warmup_steps=st.warmup_steps, warmup_ratio=0.0,
      end_lr_ratio=0.0, weight_decay=st.weight_decay, max_grad_norm=st.max_grad_norm,
      b1=float(tc.b1), b2=float(tc.b2), eps=float(tc.eps)))
  return state_lib.make_optimizer(cfg, num_updates)


def _ckpt_tree(state: state_lib.TrainState) -> dict[str, Any]:
  return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
          "rng": state.rng}


def select_groups(zero: np.ndarray, keep: int) -> np.ndarray:
  """``[keep]`` rows of the rolled-out groups to train on: informative ones first (in
  order), then uninformative ones (in order) when there are too few (``oversample``)."""
  order = np.concatenate([np.flatnonzero(~zero), np.flatnonzero(zero)])
  return order[:keep]


class _Step:
  """The host side of one RL step (rollout, rewards, update inputs) around jitted calls."""

  def __init__(self, st: RLSettings, model: nn.Module, decoder: Any, prompts: rollout_lib.PromptSet,
               ref_params: PyTree, update_fn: Callable, logprob_fn: Callable, mesh: Any,
               extra_rewards: Mapping[str, rewards_lib.RewardFn] | None,
               weights: Mapping[str, float]):
    self.st, self.model, self.decoder, self.prompts = st, model, decoder, prompts
    self.ref_params, self.update_fn, self.logprob_fn = ref_params, update_fn, logprob_fn
    self.mesh, self.extra, self.weights = mesh, extra_rewards, dict(weights)
    self.levels = decoder.index.num_levels
    self.code_ids = np.asarray(decoder.code_ids)
    self.target_codes = np.asarray(decoder.index.codes, np.int64)

  def _device(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return mesh_lib.shard_batch_from_host(host, self.mesh)

  def __call__(self, state: state_lib.TrainState, rows: np.ndarray):
    st, t0 = self.st, time.perf_counter()
    ids = [self.prompts.prompt(r) for r in rows]
    exclude = [self.prompts.seen[r] for r in rows] if st.exclude_seen else None
    ro = rollout_lib.rollout(self.decoder, state.params, ids, num_generations=st.num_generations,
                             batch_size=st.rollout_batch_size or st.rollout_prompts,
                             exclude=exclude)
    targets = self.prompts.targets[rows]
    r = rewards_lib.combine(ro.items, ro.codes, targets, self.target_codes[targets],
                            self.weights, self.extra, prompt_rows=np.asarray(rows))
    valid = ro.items >= 0
    zero = grpo.zero_advantage_groups(r, valid)
    hit = (ro.items == targets[:, None]).any(axis=1)
    host_m = {"reward": float(r[valid].mean()) if valid.any() else 0.0,
              "zero_adv_share": float(zero.mean()), "hit_rate": float(hit.mean())}
    if st.zero_adv == "oversample":
      keep = select_groups(zero, st.prompts_per_step)
      ids, r, valid, zero = [ids[i] for i in keep], r[keep], valid[keep], zero[keep]
      ro = ro._replace(codes=ro.codes[keep])
      host_m["trained_zero_adv_share"] = float(zero.mean())
    adv = np.asarray(grpo.group_advantages(r, valid)).reshape(-1)
    w = valid & ~zero[:, None] if st.zero_adv == "skip" else valid
    length = self.decoder.bucket_of(max(len(p) for p in ids))
    batch = rollout_lib.update_inputs(ids, ro.codes, self.code_ids, length, self.decoder.pad_id)
    t_roll = time.perf_counter() - t0
    host_m["rollout_s"] = t_roll
    dev = self._device({**batch, "advantages": adv.astype(np.float32),
                        "weights": w.reshape(-1).astype(np.float32)})
    tf = (dev["prompt"], dev["prompt_mask"], dev["code_tokens"])
    n = dev["code_tokens"].shape[0]
    zeros = jnp.zeros((n, self.levels), jnp.float32)
    dev["ref_logp"] = self.logprob_fn(self.ref_params, *tf) if st.beta > 0 else zeros
    dev["old_logp"] = self.logprob_fn(state.params, *tf) if st.num_iterations > 1 else zeros
    if not w.any():  # nothing to learn from (skip: every group uninformative)
      m = {"loss": 0.0, "grad_norm": 0.0, "is_finite": 1.0, "kl": 0.0, "clip_frac": 0.0,
           "ratio": 1.0, "lr": 0.0, "skipped_update": 1.0}
    else:
      for _ in range(st.num_iterations):
        state, m = self.update_fn(state, dev)
      m = {k: float(v) for k, v in jax.device_get(m).items()}  # the update's end
      m["skipped_update"] = 0.0
    host_m["update_s"] = time.perf_counter() - t0 - t_roll
    host_m["prompts_per_s"] = len(rows) / max(t_roll, 1e-9)
    return state, {**m, **host_m}


def _restore_or_init(ckpt: ckpt_lib.Checkpointer, abstract: state_lib.TrainState, ref: PyTree,
                     tx: Any, shardings: state_lib.TrainState, seed: int
                     ) -> tuple[state_lib.TrainState, loop_lib.Position, int | None]:
  """``(state, start position, resumed step)``: the newest checkpoint that loads, else the
  SFT params as the policy's start (``resumed step`` None)."""
  resumed_from, restored, data = ckpt.restore_latest(_ckpt_tree(abstract))
  if resumed_from is None:
    state = state_lib.create_train_state(ref, tx, shardings, jax.random.PRNGKey(seed), None)
    return state, loop_lib.Position(), None
  state = state_lib.TrainState(  # nothing is frozen: the policy is trained whole
      step=restored["step"], trainable=restored["trainable"],
      frozen=jax.tree.map(lambda _: None, restored["trainable"]),
      opt_state=restored["opt_state"], rng=restored["rng"])
  start = loop_lib.Position(resumed_from, int(data["epoch"]), int(data["step_in_epoch"]))
  logging.info("rl: resumed from step %d (epoch %d, step %d in epoch)", resumed_from,
               start.epoch, start.pos)
  return state, start, resumed_from


def prompt_batches(num_prompts: int, per_step: int, seed: int) -> tuple[Callable, int]:
  """``(batches(epoch, pos), steps_per_epoch)``: step ``pos`` of ``epoch`` takes rows
  ``perm[pos * per_step : (pos + 1) * per_step]`` of a permutation seeded by (seed, epoch)."""
  steps = num_prompts // per_step
  if steps < 1:
    raise ValueError(f"rl: {num_prompts} prompts, fewer than the {per_step} of one step")

  def batches(epoch: int, pos: int):
    perm = np.random.default_rng([int(seed), int(epoch), 2109]).permutation(num_prompts)
    for s in range(pos, steps):
      yield perm[s * per_step:(s + 1) * per_step]

  return batches, steps


def train_rl(config: ml_collections.ConfigDict, out_dir: str, model: nn.Module,
             sft_params: PyTree, decoder: Any, prompts: rollout_lib.PromptSet, *,
             mesh: jax.sharding.Mesh | None = None,
             eval_callbacks: Sequence[Callable[[int, Any], Mapping[str, float]]] = (),
             extra_rewards: Mapping[str, rewards_lib.RewardFn] | None = None,
             extra_weights: Mapping[str, float] | None = None,
             stop_after: int | None = None) -> RLResult:
  """GRPO from the SFT params (see the module docstring); resumes from ``out_dir``.

  Longer than the ~80-line rule on purpose, as ``lcrec_jax.train.trainer.train``: the
  step loop's closures (rollout + update, evaluations, logging, checkpoint save, the
  non-finite policy) share its state.

  Args:
    config: the run's settings (``lcrec_jax.pipeline.spec.RunSettings``): ``rl`` (:class:`RLSettings`), ``train`` (``b1``, ``b2``,
      ``eps``, ``compute_dtype``, ``on_nonfinite``, ``max_nonfinite_skips``,
      ``tensorboard``, ``async_checkpoint``), ``mesh``.
    out_dir: the stage directory (checkpoints, metrics).
    model: the Linen LLaMA.
    sft_params: the SFT model's full param tree (policy start and frozen reference).
    decoder: a :class:`lcrec_jax.eval.evaluate.Decoder` on ``mesh``.
    prompts: the training-prefix prompts.
    mesh: the training mesh (default: from ``config.mesh``); ``decoder`` must use it.
    eval_callbacks: ``(step, state) -> metrics`` run every ``rl.eval_every`` steps and at
      the end, logged under ``valid/``.
    extra_rewards: further rewards by name (:func:`lcrec_jax.rl.rewards.combine`),
      weighted by ``extra_weights``; ``"collab"`` (:class:`lcrec_jax.rl.collab.SASRecReward`)
      is weighted by ``rl.reward_collab`` and needed when that is > 0.
    stop_after: stop (as a preemption would, with a checkpoint) after this loop step;
      for tests of resume.
  """
  st, tc = RLSettings.from_config(config.rl), config.train
  if st.reward_collab > 0 and "collab" not in (extra_rewards or {}):
    raise ValueError(f"rl.reward_collab={st.reward_collab}: no 'collab' reward given "
                     "(the rl stage builds it from rl.collab_sasrec)")
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.axis_rules(config.mesh)
  compute_dtype = DTYPES[tc.compute_dtype]
  tx, schedule = _optimizer(st, tc, st.num_steps * st.num_iterations)
  boxed = state_lib.abstract_boxed_params(model, np.zeros((1, 8), np.int32))
  shardings = state_lib.state_shardings(tx, boxed, None, mesh, rules)
  p_shard = state_lib.full_param_shardings(boxed, mesh, rules)
  ref = jax.jit(lambda x: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), x),
                out_shardings=p_shard)(nn.unbox(sft_params))
  ckpt = ckpt_lib.Checkpointer(fs.path(out_dir) / "checkpoints", save_every=st.checkpoint_every,
                               keep=st.keep_checkpoints,
                               async_save=bool(tc.async_checkpoint))
  state, start, resumed_from = _restore_or_init(
      ckpt, state_lib.abstract_state(shardings, boxed, tx, None), ref, tx, shardings, st.seed)
  weights = {**st.reward_weights(), **dict(extra_weights or {})}
  step_impl = _Step(
      st, model, decoder, prompts, ref,
      grpo.make_update_step(model, tx, shardings=shardings, mesh=mesh, rules=rules,
                            num_levels=decoder.index.num_levels, beta=st.beta,
                            clip_eps=st.clip_eps, on_policy=st.num_iterations == 1,
                            compute_dtype=compute_dtype, schedule=schedule),
      grpo.make_logprob_fn(model, mesh=mesh, rules=rules, compute_dtype=compute_dtype),
      mesh, extra_rewards, weights)
  batches, steps_per_epoch = prompt_batches(len(prompts), st.rollout_prompts, st.seed)
  writer = summaries.MetricsWriter(out_dir, enabled=fs.is_primary(),
                                   tensorboard=bool(tc.tensorboard),
                                   drop_after_step=resumed_from or 0)
  history: list[dict[str, float]] = []
  evals: list[dict[str, float]] = []
  on_nonfinite = str(tc.on_nonfinite)
  max_skips = int(tc.max_nonfinite_skips)
  skips = 0

  def on_step(info: loop_lib.StepInfo) -> None:
    nonlocal skips
    m = info.metrics
    if m["is_finite"] < 1.0:
      skips += 1
      if on_nonfinite == "stop" or skips > max_skips:
        ckpt.wait()
        raise finite_lib.NonFiniteError(
            f"rl: the update at step {info.step} is not finite (loss {m['loss']}, gradient "
            f"norm {m['grad_norm']}); it was not applied; newest checkpoint: "
            f"{ckpt.latest_step()} under {ckpt.directory}",
            hint="re-run with a lower --config.rl.lr (it resumes from that checkpoint)")
      logging.warning("rl: step %d skipped: non-finite update", info.step)
    else:
      skips = 0
    m["step_time_s"] = info.time_s
    history.append({"step": info.step, **m})
    writer.write(info.step, m, prefix="rl/")
    progress.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.2g}",
                         zero_adv=f"{m['zero_adv_share']:.2f}")

  def save(info: loop_lib.StepInfo) -> None:
    ckpt.save(info.step, _ckpt_tree(loop.state), info.data_position(), force=True)

  def save_now(info: loop_lib.StepInfo) -> None:  # off schedule (preemption, stop_after)
    ckpt.wait()  # a scheduled save of this very step is then listed and not repeated
    save(info)

  def run_evals(step: int) -> None:
    if not eval_callbacks:
      return
    record: dict[str, float] = {}
    for cb in eval_callbacks:
      record.update({f"valid/{k}": float(v) for k, v in cb(step, loop.state).items()})
    writer.write(step, record)
    evals.append({"step": step, **record})
    logging.info("rl: step %d validation %s", step, record)

  def preempted(step: int) -> bool:
    return (stop_after is not None and step >= stop_after) or ckpt.reached_preemption(step)

  ckpt.install_sigterm_handler()
  progress = progress_lib.Progress(st.num_steps, "rl", "step", initial=start.step,
                                   every_s=float(tc.progress_log_s),
                                   enabled=fs.is_primary())
  loop = loop_lib.Loop(
      step_impl, batches, state, num_steps=st.num_steps, steps_per_epoch=steps_per_epoch,
      start=start, fetch="sync", on_step=on_step,
      step_actions=[loop_lib.Periodic(save, every=ckpt.save_every, at_end=True),
                    loop_lib.Periodic(lambda info: run_evals(info.step), every=st.eval_every,
                                      at_end=True)],
      preempted=preempted, on_preempt=save_now, progress=progress, name="rl")
  try:
    outcome = loop.run()
    if outcome.steps_run == 0:
      run_evals(loop.step)
  finally:
    ckpt.close()
    writer.close()
  return RLResult(state=loop.state, step=loop.step, history=history, evals=evals,
                  stopped_early=outcome.reason == "preempted", resumed_from=resumed_from)


def summarize(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Means over the steps of a run: reward, KL, zero-advantage share, hit rate, time split."""
  if not history:
    return {}
  keys = ("reward", "kl", "zero_adv_share", "hit_rate", "rollout_s", "update_s")
  out = {k: float(np.mean([h[k] for h in history])) for k in keys}
  roll = sum(h["rollout_s"] for h in history)
  out["rollout_share"] = roll / max(roll + sum(h["update_s"] for h in history), 1e-9)
  out["steps"] = float(len(history))
  return {k: (v if math.isfinite(v) else 0.0) for k, v in out.items()}
