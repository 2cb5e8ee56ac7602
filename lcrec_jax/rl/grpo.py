"""The GRPO objective over constrained-beam rollouts, and its jitted update step.

Notation: ``P`` prompts per step, ``G`` beams (generations) each, ``N = P * G`` rows,
``L`` code levels (every beam is a whole item code, so every row has exactly ``L``
generated tokens and no padding among them).

* advantages (:func:`group_advantages`): per prompt, ``(r - mean) / (std + 1e-4)`` over
  its ``G`` rewards (``std`` with Bessel's correction, as TRL's ``GRPOTrainer``, on which
  MiniOneRec builds, computes it). A group whose rewards are all equal has advantage 0
  everywhere: :func:`zero_advantage_groups` flags them.
* log-probabilities (:func:`shared_prompt_logprobs`): the policy's (and the frozen
  reference's) log-probability of each generated code token, teacher-forced with a
  full-vocabulary log-softmax, the same quantity the beam search sums into a beam's
  score. The ``G`` beams of a prompt share it, so the prompt runs once per prompt (its
  keys and values in a cache, differentiated through) and only the ``L - 1`` fed-back
  code tokens run per beam, attending to it as in the search's split cache: ``P * T +
  N * (L - 1)`` token positions instead of ``N * (T + L)`` (13x fewer at ``G = 16``,
  ``T = 192``). :func:`code_token_logprobs` is the plain one-row-per-beam forward, its
  reference.
* loss (:func:`grpo_loss`), per token as in TRL: ``-(min(rho A, clip(rho, 1 - eps,
  1 + eps) A) - beta * kl)`` with ``rho = exp(logp - logp_old)`` and the k3 estimator
  ``kl = exp(ref - logp) - (ref - logp) - 1``, averaged over the tokens of the rows with
  weight 1 (``weights`` drops invalid beams and skipped groups). With one optimisation
  pass per rollout (``num_iterations = 1``) ``logp_old`` is ``stop_gradient(logp)``, so
  ``rho = 1`` and the gradient is the plain policy gradient.

:func:`rl_update_step` is one optimizer step on that loss, finite or nothing like the SFT
step (:func:`lcrec_jax.train.step.train_step`): an update whose loss, gradient or new
state is NaN/inf is not committed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from lcrec_jax.llm.kv_cache import init_cache, split_beam_cache
from lcrec_jax.runtime import finite
from lcrec_jax.train import mesh as mesh_lib
from lcrec_jax.train.state import TrainState, merge_params
from lcrec_jax.train.step import cast_floating, with_context

ADV_EPS = 1e-4
# Rows of an update batch, all [N, ...]: teacher-forcing inputs, the rollout's numbers.
UPDATE_KEYS = ("prompt", "prompt_mask", "code_tokens", "advantages", "weights", "old_logp",
               "ref_logp")
PyTree = Any


def group_advantages(rewards: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """``[P, G]`` ``(r - mean) / (std + 1e-4)`` within each prompt's group.

  Args:
    rewards: ``[P, G]`` float.
    valid: optional ``[P, G]`` bool, beams that count (the others get advantage 0 and do
      not enter the group's mean and std).
  """
  r = jnp.asarray(rewards, jnp.float32)
  v = jnp.ones_like(r) if valid is None else jnp.asarray(valid, jnp.float32)
  n = jnp.sum(v, axis=1, keepdims=True)
  mean = jnp.sum(r * v, axis=1, keepdims=True) / jnp.maximum(n, 1.0)
  var = jnp.sum(v * (r - mean) ** 2, axis=1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
  return jnp.where(v > 0, (r - mean) / (jnp.sqrt(var) + ADV_EPS), 0.0)


def zero_advantage_groups(rewards: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
  """``[P]`` bool: groups whose (valid) rewards are all equal, so every advantage is 0."""
  r = np.asarray(rewards, np.float64)
  v = np.ones(r.shape, bool) if valid is None else np.asarray(valid, bool)
  hi = np.where(v, r, -np.inf).max(axis=1)
  lo = np.where(v, r, np.inf).min(axis=1)
  return ~(hi > lo)


def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """The k3 estimator of KL(pi || ref) per token: ``exp(ref - logp) - (ref - logp) - 1``."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def grpo_loss(logp: jax.Array, old_logp: jax.Array | None, ref_logp: jax.Array,
              advantages: jax.Array, weights: jax.Array, *, beta: float,
              clip_eps: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean per-token GRPO loss over the weighted rows (see the module docstring).

  Args:
    logp: ``[N, L]`` the policy's code-token log-probs (differentiated).
    old_logp: ``[N, L]`` the rollout policy's, or None for ``stop_gradient(logp)``.
    ref_logp: ``[N, L]`` the frozen reference's.
    advantages: ``[N]`` per row.
    weights: ``[N]`` 1 for rows in the loss, 0 for the others.
    beta: KL coefficient.
    clip_eps: the ratio clip.

  Returns:
    ``(loss, aux)``: scalar loss; aux ``kl`` (mean k3 over the weighted tokens),
    ``clip_frac`` (share of weighted tokens whose ratio was clipped), ``ratio`` (mean).
  """
  old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
  ratio = jnp.exp(logp - old)                                           # [N, L]
  adv = advantages[:, None]
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  surrogate = jnp.minimum(ratio * adv, clipped * adv)
  kl = kl_k3(logp, ref_logp)
  w = jnp.broadcast_to(weights[:, None], logp.shape)
  denom = jnp.maximum(jnp.sum(w), 1.0)
  loss = -jnp.sum(w * (surrogate - beta * kl)) / denom
  aux = {"kl": jnp.sum(w * kl) / denom,
         "clip_frac": jnp.sum(w * (jnp.abs(ratio - clipped) > 0)) / denom,
         "ratio": jnp.sum(w * ratio) / denom}
  return loss, aux


def code_token_logprobs(params: PyTree, model: nn.Module, tokens: jax.Array,
                        attention_mask: jax.Array, positions: jax.Array, num_levels: int
                        ) -> jax.Array:
  """``[N, L]`` float32 log-probs of the last ``L`` tokens of each row, teacher-forced.

  Args:
    params: the model's param tree.
    model: the Linen LLaMA.
    tokens: ``[N, T + L]``: a LEFT-padded prompt of ``T`` slots, then the ``L`` code
      tokens of the beam.
    attention_mask: ``[N, T + L]`` 1 for real tokens.
    positions: ``[N, T + L]`` RoPE positions (``cumsum(mask) - 1``, as the search uses).
    num_levels: ``L`` (static).
  """
  hidden, _ = model.apply({"params": params}, tokens, positions=positions,
                          attention_mask=attention_mask, return_hidden=True)
  t = tokens.shape[1] - num_levels
  h = hidden[:, t - 1:t - 1 + num_levels]                               # [N, L, E]
  logits = model.apply({"params": params}, h, method="logits").astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)                            # [N, L, V]
  return jnp.take_along_axis(logp, tokens[:, t:, None], axis=-1)[..., 0]


def shared_prompt_logprobs(params: PyTree, model: nn.Module, prompt: jax.Array,
                           prompt_mask: jax.Array, code_tokens: jax.Array) -> jax.Array:
  """``[P * G, L]`` float32 code-token log-probs, the prompt run once per prompt.

  Args:
    params: the model's param tree.
    model: the Linen LLaMA.
    prompt: ``[P, T]`` LEFT-padded prompts.
    prompt_mask: ``[P, T]`` 1 for real tokens.
    code_tokens: ``[P * G, L]`` vocabulary ids of each beam's codes, row ``p * G + g``.

  Returns:
    Row ``p * G + g``, level ``l``: log p(code token l | prompt p, code tokens < l), equal
    to :func:`code_token_logprobs` over ``prompt + code tokens`` rows.
  """
  users, t = prompt.shape
  rows, levels = code_tokens.shape
  beams = rows // users
  cache = init_cache(model.config, users, t)
  hidden, cache = model.apply({"params": params}, prompt, attention_mask=prompt_mask,
                              cache=cache, return_hidden=True)
  first = model.apply({"params": params}, hidden[:, -1], method="logits")    # [P, V]
  first = jnp.repeat(jax.nn.log_softmax(first.astype(jnp.float32), axis=-1), beams, axis=0)
  out = [jnp.take_along_axis(first, code_tokens[:, :1], axis=-1)]            # [N, 1]
  if levels > 1:
    beam_cache = split_beam_cache(cache, beams, levels - 1)
    h, _ = model.apply({"params": params}, code_tokens[:, :-1], cache=beam_cache,
                       return_hidden=True)                                   # [N, L-1, E]
    logits = model.apply({"params": params}, h, method="logits").astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    out.append(jnp.take_along_axis(logp, code_tokens[:, 1:, None], axis=-1)[..., 0])
  return jnp.concatenate(out, axis=1)


def rl_update_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
                   tx: optax.GradientTransformation, num_levels: int, beta: float,
                   clip_eps: float, on_policy: bool, compute_dtype: jnp.dtype = jnp.float32,
                   schedule: optax.Schedule | None = None) -> tuple[TrainState, dict]:
  """One optimizer step on :func:`grpo_loss` over an update batch (``UPDATE_KEYS``).

  ``on_policy`` (static): ignore ``batch["old_logp"]`` and use ``stop_gradient(logp)``
  (one pass per rollout). Finite or nothing: a NaN/inf loss, gradient norm or new state
  leaves params and optimizer state as they were (``is_finite`` 0).

  Returns:
    (new state, metrics: loss, kl, clip_frac, ratio, grad_norm, lr, is_finite).
  """
  frozen = state.frozen

  del num_levels  # the code tokens' width

  def loss_fn(trainable):
    params = cast_floating(merge_params(trainable, frozen), compute_dtype)
    logp = shared_prompt_logprobs(params, model, batch["prompt"], batch["prompt_mask"],
                                  batch["code_tokens"])
    return grpo_loss(logp, None if on_policy else batch["old_logp"], batch["ref_logp"],
                     batch["advantages"], batch["weights"], beta=beta, clip_eps=clip_eps)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & finite.all_finite(trainable, opt_state)
  new_state = state.replace(step=state.step + 1,
                            trainable=finite.select_tree(ok, trainable, state.trainable),
                            opt_state=finite.select_tree(ok, opt_state, state.opt_state))
  metrics = {"loss": loss, "grad_norm": grad_norm, "is_finite": ok.astype(jnp.float32),
             "lr": jnp.asarray(schedule(state.step) if schedule is not None else 0.0,
                               jnp.float32), **aux}
  return new_state, metrics


def make_update_step(model: nn.Module, tx: optax.GradientTransformation, *,
                     shardings: TrainState | None, mesh: Mesh | None,
                     rules: mesh_lib.LogicalRules, num_levels: int, beta: float,
                     clip_eps: float, on_policy: bool, compute_dtype: jnp.dtype = jnp.float32,
                     schedule: optax.Schedule | None = None) -> Callable:
  """``jax.jit`` of :func:`rl_update_step`, state donated, state shardings kept."""
  fn = lambda s, b: rl_update_step(s, b, model=model, tx=tx, num_levels=num_levels,
                                   beta=beta, clip_eps=clip_eps, on_policy=on_policy,
                                   compute_dtype=compute_dtype, schedule=schedule)
  kwargs: dict[str, Any] = {"donate_argnums": (0,)}
  if mesh is not None:
    kwargs["out_shardings"] = (shardings, mesh_lib.replicated(mesh))
  return with_context(jax.jit(fn, **kwargs), mesh, rules)


def make_logprob_fn(model: nn.Module, *, mesh: Mesh | None, rules: mesh_lib.LogicalRules,
                    compute_dtype: jnp.dtype = jnp.float32) -> Callable:
  """Jitted ``(params, prompt, prompt_mask, code_tokens) -> [N, L]`` log-probs (no grad)."""
  def fn(params, prompt, mask, code_tokens):
    return shared_prompt_logprobs(cast_floating(params, compute_dtype), model, prompt, mask,
                                  code_tokens)
  return with_context(jax.jit(fn), mesh, rules)
