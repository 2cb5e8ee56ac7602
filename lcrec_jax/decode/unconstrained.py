"""Plain (unconstrained) beam search over the full vocabulary, under one ``jit``.

The reference point for the constrained search in :mod:`lcrec_jax.decode.beam_search`
and the mode the HF-parity test checks: a fixed number of new tokens, no end-of-sequence
handling (no beam can finish early), no length penalty. One call decodes a batch of users:

1. the (left-padded) prompt is prefilled once per user and only its last position goes
   through the output head (:func:`lcrec_jax.llm.decoding.prefill`, as for the
   constrained search);
2. the first step takes the ``num_beams`` best tokens of that single distribution; the
   prompt's cache stays once per user and each beam gets slots for its own generated
   tokens only (:class:`lcrec_jax.llm.kv_cache.BeamKVCache`, as in the constrained search);
3. every further step is one iteration of a ``lax.fori_loop``: one token per row through
   the model with the KV cache, log-softmax over the vocabulary, ``top_k`` over the
   ``[batch, beams * vocab]`` candidate totals, and the per-beam cache slots gathered from
   the parents (the prompt part is shared by all beams of a user and never copied).

:func:`search_tokens` is the model-agnostic search (a logits callback and a cache pytree
with its beam axes, see :mod:`lcrec_jax.llm.decoding`); :func:`beam_search` runs it on the
LLaMA.

This is what Hugging Face ``generate(num_beams=W, do_sample=False, length_penalty=0.0)``
computes when no end-of-sequence token can be produced: scores are sums of the chosen
tokens' log-probabilities (``sequences_scores`` with ``length_penalty=0``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lcrec_jax.decode.beam_search import expand_beams, gather_beams
from lcrec_jax.llm import decoding
from lcrec_jax.llm.model import Llama


class SequenceBeams(NamedTuple):
  """Top beams per user, best first.

  Attributes:
    sequences: ``[batch, beams, steps]`` int32 generated token ids (prompt excluded).
    scores: ``[batch, beams]`` float32 sum of the generated tokens' log-probabilities.
  """

  sequences: jax.Array
  scores: jax.Array


def search_tokens(tokens_to_logits: decoding.TokensToLogits, logits: jax.Array, cache: Any,
                  beam_axes: Any, *, num_beams: int, num_steps: int) -> SequenceBeams:
  """Beam search over the whole vocabulary for any model (call it under ``jax.jit``).

  Args:
    tokens_to_logits: ``(tokens [batch * beams, 1] int32, cache) -> (logits
      [batch * beams, vocab], new cache)``.
    logits: ``[batch, vocab]`` next-token logits after each prompt.
    cache: the decode cache pytree after the prompts, one row per user.
    beam_axes: ``cache``'s row axis per leaf (``None``: shared by a user's beams).
    num_beams: beams per user W (static); at most the vocabulary size.
    num_steps: tokens to generate T >= 1 (static).

  Returns:
    A :class:`SequenceBeams`, best first.
  """
  batch, vocab = logits.shape
  logp0 = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  scores, tok = jax.lax.top_k(logp0, num_beams)                       # [B, W]
  seqs = jnp.zeros((batch, num_beams, num_steps), jnp.int32).at[:, :, 0].set(tok)
  cache = expand_beams(cache, beam_axes, num_beams)
  row_base = (jnp.arange(batch) * num_beams)[:, None]                 # [B, 1]

  def body(step, carry):
    scores, seqs, cache = carry
    last = jax.lax.dynamic_index_in_dim(seqs, step - 1, axis=2, keepdims=False)  # [B, W]
    logits, cache = tokens_to_logits(last.reshape(-1, 1), cache)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    total = scores[..., None] + logp.reshape(batch, num_beams, vocab)
    scores, flat = jax.lax.top_k(total.reshape(batch, num_beams * vocab), num_beams)
    parent, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1)
    seqs = jax.lax.dynamic_update_index_in_dim(seqs, tok, step, axis=2)
    cache = gather_beams(cache, beam_axes, (parent + row_base).reshape(-1))
    return scores, seqs, cache

  scores, seqs, _ = jax.lax.fori_loop(1, num_steps, body, (scores, seqs, cache))
  return SequenceBeams(seqs, scores)


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "num_steps"))
def beam_search(model: Llama, params: Any, prompt: jax.Array, prompt_mask: jax.Array, *,
                num_beams: int, num_steps: int, lora: Any = None) -> SequenceBeams:
  """Beam search over the whole vocabulary for exactly ``num_steps`` new tokens.

  Args:
    model: the Flax LLaMA (static).
    params: its parameters.
    prompt: ``[batch, len]`` int32, LEFT-padded so every row's last token is real.
    prompt_mask: ``[batch, len]``, 1 for real tokens.
    num_beams: beams per user W (static); at most the vocabulary size.
    num_steps: tokens to generate T >= 1 (static).
    lora: optional LoRA adapters applied on the fly.

  Returns:
    A :class:`SequenceBeams` with ``sequences [batch, W, T]`` and ``scores [batch, W]``,
    sorted by score, best first.
  """
  vocab = model.config.vocab_size
  if num_steps < 1:
    raise ValueError(f"beam_search: num_steps must be >= 1, got {num_steps}")
  if not 1 <= num_beams <= vocab:
    raise ValueError(f"beam_search: num_beams must be in [1, vocab_size={vocab}], "
                     f"got {num_beams}")
  pre = decoding.prefill(model, params, prompt, prompt_mask, steps=num_steps - 1, lora=lora)
  return search_tokens(decoding.logits_fn(model, params, lora), pre.logits, pre.cache,
                       pre.beam_axes, num_beams=num_beams, num_steps=num_steps)
