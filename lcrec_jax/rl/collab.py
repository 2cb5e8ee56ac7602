"""The collaborative reward: the in-project SASRec's score of each beam's item.

``rl.reward_collab > 0`` weights it into the rewards of :func:`lcrec_jax.rl.rewards.combine`
(name ``"collab"``). The SASRec is a file (``rl.collab_sasrec``, written by
``benchmarks/export_sasrec_embeddings.py --sasrec_out``, :func:`lcrec_jax.baselines.sasrec.save`),
trained on the leave-one-out training sequences, so training it costs the rl stage nothing.

For prompt ``p`` (a training prefix: the items before its target, ``PromptSet.seen``) and
its beams' items ``items[p, :]``, SASRec reads the prefix (its last ``max_len`` items,
left-padded) and gives a logit ``s[p, g]`` to each beam's item at the last position; the
reward is those logits normalised within the group, a softmax over the group's valid beams::

  collab[p, g] = exp(s[p, g]) / sum_{j valid} exp(s[p, j])        (0 for a -1 beam)

i.e. SASRec's probability of the item given that the next item is one of the group's
beams: in ``[0, 1]``, summing to 1 over a group, so it is on the scale of the ranking
reward (1 for the target, penalties summing to -1). It is computed from each beam's item
number, in the beam's position, never from the prompt's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from lcrec_jax.baselines import sasrec as sasrec_lib
from lcrec_jax.baselines import sequential
from lcrec_jax.errors import ConfigError


def group_softmax(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """``[P, G]`` float64: softmax of ``scores [P, G]`` over each row's ``valid`` entries
  (0 elsewhere; a row without a valid entry is all 0)."""
  s = np.where(valid, np.asarray(scores, np.float64), -np.inf)
  top = np.max(s, axis=1, keepdims=True)
  e = np.where(valid, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
  return e / np.maximum(e.sum(axis=1, keepdims=True), 1e-300)


class SASRecReward:
  """``(prompt_rows [P], items [P, G]) -> [P, G]`` the collaborative reward (module docstring).

  Args:
    model: the SASRec module.
    params: its params.
    histories: per prompt row, its ``[t]`` item numbers before the target, oldest first.
  """

  def __init__(self, model: sasrec_lib.SASRec, params: Any, histories: Sequence[np.ndarray]):
    self.model, self.params, self.histories = model, params, histories
    self.buckets = sequential.length_buckets(model.max_len)

    def last_logits(params, x):
      h = model.apply({"params": params}, x, train=False)[:, -1]
      return model.apply({"params": params}, h, method="scores")         # [P, N]

    self._last_logits = jax.jit(last_logits)

  def logits(self, prompt_rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``[P, G]`` float64 SASRec logits of the beams' items (``-1`` beams read item 0).

    The rows are left-padded to one bucket (that of the longest history, at most
    ``max_len``): SASRec's state at the last position does not depend on the padding.
    """
    hist = [self.histories[int(r)] for r in prompt_rows]
    length = sequential.bucket_of(min(max(len(h) for h in hist), self.model.max_len),
                                  self.buckets)
    scores = np.asarray(self._last_logits(self.params, sequential.left_pad(hist, length)))
    return np.take_along_axis(scores, np.maximum(np.asarray(items, np.int64), 0), axis=1
                              ).astype(np.float64)

  def __call__(self, prompt_rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    return group_softmax(self.logits(prompt_rows, items), np.asarray(items) >= 0)


def load_sasrec(path: str, num_items: int) -> tuple[sasrec_lib.SASRec, Any]:
  """``(model, params)`` of ``rl.collab_sasrec``; ConfigError naming the key if the file
  cannot be read as a saved SASRec or is one of another catalogue."""
  try:
    model, params = sasrec_lib.load(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config rl.collab_sasrec={path!r}: not a saved SASRec ({e}); write "
                      "one with benchmarks/export_sasrec_embeddings.py --sasrec_out") from None
  if model.num_items != num_items:
    raise ConfigError(f"config rl.collab_sasrec={path!r}: a SASRec of {model.num_items} "
                      f"items, the dataset has {num_items}")
  return model, params
