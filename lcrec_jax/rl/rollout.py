"""Rollouts: the evaluation's constrained beam search over prompts of training prefixes.

Prompts (:class:`PromptSet`, :func:`training_prompts`): every training prefix of every
user, rendered with a seqrec template exactly as the train stage renders it
(:func:`lcrec_jax.tasks.builders.build_task`) and tokenized exactly as the evaluation
tokenizes its prompts (:func:`lcrec_jax.eval.evaluate.eval_prompt_ids`). The target of a
prefix ``train[u][:t]`` is the next training item ``train[u][t]``; the validation and test
items (the last two of a user's sequence) are never a target and never in a prompt.

Rollout (:func:`rollout`): ``G = num_generations`` beams per prompt from
:meth:`lcrec_jax.eval.evaluate.Decoder.rank` in trie mode, the very call the evaluation
makes (so every beam is a real item, best first), with each prompt's seen items (every
training item before the target) banned inside the search when asked.

Update inputs (:func:`update_inputs`): the prompts once, left-padded to the smallest
bucket that holds the step's longest prompt (``[P, T]``), and every beam's ``L`` code
tokens (``[P * G, L]``, row ``p * G + g`` = beam ``g`` of prompt ``p``), for the
shared-prompt teacher forcing of :func:`lcrec_jax.rl.grpo.shared_prompt_logprobs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from lcrec_jax.data.dataset import Dataset
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.tasks import builders


@dataclasses.dataclass
class PromptSet:
  """The RL prompts: targets, users and seen items per prompt; ids tokenized on demand.

  Attributes:
    targets: ``[n]`` int64 target item of each prompt.
    users: ``[n]`` int64 its user.
    seen: per prompt, ``[t]`` the user's training items before the target.
    encode: ``row -> [len]`` int32 prompt ids (no padding); cached.
  """
  targets: np.ndarray
  users: np.ndarray
  seen: list[np.ndarray]
  encode: Callable[[int], np.ndarray]
  _cache: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.targets)

  def prompt(self, row: int) -> np.ndarray:
    row = int(row)
    if row not in self._cache:
      self._cache[row] = np.asarray(self.encode(row), np.int32)
    return self._cache[row]


def training_prompts(dataset: Dataset, index: ItemIndex, tokenizer: Any, cfg_tasks: Any, *,
                     seed: int, prefixes_per_user: int = 0) -> PromptSet:
  """Seqrec prompts of the training prefixes (see the module docstring).

  Args:
    dataset: the dataset; its leave-one-out split decides what is training.
    index: its item index.
    tokenizer: the trained model's tokenizer (with code tokens).
    cfg_tasks: the ``tasks`` section (``max_history``, ``buckets``, ``add_bos``).
    seed: seeds the template drawn per prefix (as ``build_task`` draws it).
    prefixes_per_user: keep only each user's last this many prefixes (0 = all).
  """
  from lcrec_jax.eval.evaluate import eval_prompt_ids  # pylint: disable=g-import-not-at-top
  examples = builders.build_task("seqrec", dataset, index, seed=seed, sample_num=0,
                                 max_history=int(cfg_tasks.max_history))
  train = dataset.split().train
  # build_task keeps every prefix (t = 1 .. len - 1) of every user, in order.
  per_user: dict[int, list[int]] = {}
  for i, ex in enumerate(examples):
    per_user.setdefault(int(ex.meta["user"]), []).append(i)
  rows, seen = [], []
  for u, idx in sorted(per_user.items()):
    if len(idx) != len(train[u]) - 1:
      raise ValueError(f"user {u}: {len(idx)} seqrec prefixes for {len(train[u])} training items")
    ts = list(range(1, len(train[u])))
    keep = slice(-prefixes_per_user, None) if prefixes_per_user > 0 else slice(None)
    for i, t in list(zip(idx, ts))[keep]:
      if int(examples[i].meta["target"]) != int(train[u][t]):
        raise ValueError(f"user {u}: prefix {t} does not predict the next training item")
      rows.append(i)
      seen.append(np.asarray(train[u][:t], np.int64))
  chosen = [examples[i] for i in rows]
  levels = index.num_levels
  return PromptSet(
      targets=np.asarray([ex.meta["target"] for ex in chosen], np.int64),
      users=np.asarray([ex.meta["user"] for ex in chosen], np.int64), seen=seen,
      encode=lambda r: eval_prompt_ids(tokenizer, chosen[r].instruction, cfg_tasks, levels))


class Rollout(NamedTuple):
  """Beams of ``P`` prompts, best first.

  Attributes:
    items: ``[P, G]`` int64 item numbers (``-1``: no item left for that beam).
    scores: ``[P, G]`` float32 beam log-probabilities (the search's).
    codes: ``[P, G, L]`` int64 the items' codes (item 0's code where ``items`` is -1).
  """
  items: np.ndarray
  scores: np.ndarray
  codes: np.ndarray


def rollout(decoder: Any, params: Any, prompts: Sequence[np.ndarray], *, num_generations: int,
            batch_size: int, exclude: Sequence[np.ndarray] | None = None) -> Rollout:
  """``num_generations`` trie-constrained beams per prompt with the evaluation's decoder.

  Args:
    decoder: a :class:`lcrec_jax.eval.evaluate.Decoder` (its trie, code table, mesh).
    params: the policy's params (on the decoder's mesh).
    prompts: per prompt its ``[len]`` ids.
    num_generations: beams per prompt (static).
    batch_size: prompts per beam-search call.
    exclude: per prompt, items banned inside the search (its seen items), or None.
  """
  items, scores = decoder.rank(params, prompts, num_beams=num_generations, mode="trie",
                               batch_size=batch_size, exclude=exclude)
  codes = np.asarray(decoder.index.codes, np.int64)[np.maximum(items, 0)]
  return Rollout(items, scores, codes)


def update_inputs(prompts: Sequence[np.ndarray], codes: np.ndarray, code_token_ids: np.ndarray,
                  length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Teacher-forcing inputs of every beam (see the module docstring).

  Args:
    prompts: ``P`` prompt id arrays, each at most ``length`` long.
    codes: ``[P, G, L]`` the beams' codes.
    code_token_ids: ``[L, K]`` vocabulary id of each level's codes.
    length: the prompt slots ``T`` (a bucket).
    pad_id: the padding token.

  Returns:
    ``prompt``, ``prompt_mask``: ``[P, T]`` int32, left-padded; ``code_tokens``
    ``[P * G, L]`` int32, row ``p * G + g`` = beam ``g`` of prompt ``p``.
  """
  p, g, levels = codes.shape
  code_tok = np.asarray(code_token_ids)[np.arange(levels)[None, None], codes]  # [P, G, L]
  prompt = np.full((p, length), pad_id, np.int32)
  mask = np.zeros((p, length), np.int32)
  for r, ids in enumerate(prompts):
    if len(ids) > length:
      raise ValueError(f"a {len(ids)}-token prompt does not fit {length} slots")
    prompt[r, length - len(ids):] = ids
    mask[r, length - len(ids):] = 1
  return {"prompt": prompt, "prompt_mask": mask,
          "code_tokens": code_tok.reshape(p * g, levels).astype(np.int32)}


def full_rows(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The same beams as one row each, ``[P * G, T + L]`` (``tokens``, ``attention_mask``,
  ``positions``): the input of the reference :func:`lcrec_jax.rl.grpo.code_token_logprobs`."""
  g = inputs["code_tokens"].shape[0] // inputs["prompt"].shape[0]
  tokens = np.concatenate([np.repeat(inputs["prompt"], g, axis=0), inputs["code_tokens"]], 1)
  mask = np.concatenate([np.repeat(inputs["prompt_mask"], g, axis=0),
                         np.ones_like(inputs["code_tokens"])], 1)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return {"tokens": tokens, "attention_mask": mask, "positions": positions}
