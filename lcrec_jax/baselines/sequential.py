"""Training and full ranking shared by the sequential baselines (SASRec, GRU4Rec).

Both models rank from a user's last ``max_len`` items (training rows are up to
``2 * max_len - 1`` long, :func:`training_pairs`), LEFT-padded (item ids shifted by one,
0 = padding), and give a ``[batch, len, dim]`` state whose dot product with the item
embeddings scores every item (``model.scores``). Their outputs at real positions do not
depend on how much padding precedes them, so sequences are grouped into length buckets
(:func:`length_buckets`: 8, 16, 32, ... up to the longest row) instead of all being padded
to one length; on short-history data (median 4 items at Amazon scale) this skips most of the
work. Each bucket compiles once; batches have a fixed number of rows (the last batch of a
bucket is filled with rows that carry no label).

Ranking (:func:`rank_topk`) runs on the device in batches of users: the scores of a batch,
``[batch, items]``, never a ``[users, items]`` matrix, then ``jax.lax.top_k`` under both
protocols at once: ``"unmasked"`` ranks every item (LC-Rec's paper, and RecBole's full-sort
evaluation of sequential models, which masks no history for them), ``"masked"`` first
removes each user's already-seen items (what RecBole does for general recommenders). Ties go
to the lower item number, as a stable sort would.

Training is next-item cross-entropy over the whole catalogue on every target of every
training sequence once per epoch (:func:`training_pairs`: windows of ``max_len`` targets,
each row carrying the ``max_len - 1`` items before its window as unlabelled context). Every
``eval_every`` epochs the valid split is ranked under both protocols; each protocol keeps
the parameters of its own best valid NDCG@10 (model selection under the protocol that is
reported) and training stops when neither improved for ``patience`` evaluations.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from lcrec_jax.data.dataset import Dataset, SplitExample
from lcrec_jax.data.errors import DataError
from lcrec_jax.eval.metrics import topk_metrics
from lcrec_jax.progress import Progress
from lcrec_jax.runtime import loop as loop_lib

PROTOCOLS = ("unmasked", "masked")
RANK_K = 20          # ranked items kept per user (metrics need 10)
EVAL_BATCH = 256     # users per ranking call
MIN_BUCKET = 8


def length_buckets(max_len: int) -> tuple[int, ...]:
  """Padded lengths used for ``max_len``: powers of two from 8 below it, then ``max_len``."""
  out, b = [], MIN_BUCKET
  while b < max_len:
    out.append(b)
    b *= 2
  return tuple(out) + (max_len,)


def bucket_of(length: int, buckets: Sequence[int]) -> int:
  """Smallest bucket holding ``length`` items (``length`` is at most ``buckets[-1]``)."""
  for b in buckets:
    if length <= b:
      return b
  return buckets[-1]


def left_pad(seqs: Sequence[np.ndarray], length: int) -> np.ndarray:
  """``[len(seqs), length]`` int32: the last ``length`` items of each, shifted by one, 0 = pad."""
  out = np.zeros((len(seqs), length), np.int32)
  for r, s in enumerate(seqs):
    s = np.asarray(s[-length:], np.int32) + 1
    if len(s):
      out[r, -len(s):] = s
  return out


def window_len(max_len: int) -> int:
  """Longest training row: ``max_len - 1`` context items + ``max_len`` labelled positions."""
  return 2 * max_len - 1


def training_pairs(train: Sequence[np.ndarray], max_len: int
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Rows that train every next-item target of every sequence exactly once.

  A sequence ``s`` of ``n`` items has ``n - 1`` targets ``s[1:]``. They are cut into
  consecutive windows of ``max_len`` targets (stride ``max_len``); the window of targets
  ``s[a:b]`` becomes one row of inputs ``s[max(0, a - max_len):b - 1]`` with labels at the
  positions of ``s[a - 1:b - 1]`` (label ``s[i]`` at the position of ``s[i - 1]``) and ``-1``
  on the ``<= max_len - 1`` context items before them. So every target's ``max_len``
  preceding items (all of them when fewer) sit in its row before it, a window boundary cuts
  no target's context, and a causal model trains each target once per epoch, as RecBole's
  one-row-per-target augmentation does, at about ``1/max_len`` of its cost. Labels further
  into a window can see up to ``2 * max_len - 1`` items (SASRec bands its attention to
  ``max_len``, see :mod:`lcrec_jax.baselines.sasrec`).

  Returns:
    ``(inputs, labels)``: per row ``[len]`` item numbers and ``[len]`` next items
    (``-1`` = no label), ``len <= window_len(max_len)``; rows in sequence order.
  """
  inputs, labels = [], []
  for s in train:
    s = np.asarray(s, np.int64)
    for a in range(1, len(s), max_len):          # first target of each window
      b = min(a + max_len, len(s))               # targets s[a:b]
      c = max(0, a - max_len)                    # context starts here
      inputs.append(s[c:b - 1])
      lab = np.full(b - 1 - c, -1, np.int64)
      lab[a - 1 - c:] = s[a:b]
      labels.append(lab)
  return inputs, labels


def epoch_batches(lengths: np.ndarray, batch_size: int, buckets: Sequence[int],
                  rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
  """One epoch's batches: ``(bucket length, [batch_size] row ids, -1 = empty row)``.

  Rows are shuffled within their bucket, the batches of all buckets shuffled together.
  """
  by_bucket: dict[int, list[int]] = {}
  for r, n in enumerate(lengths):
    by_bucket.setdefault(bucket_of(int(n), buckets), []).append(r)
  out = []
  for b, rows in sorted(by_bucket.items()):
    rows = rng.permutation(np.asarray(rows))
    for i in range(0, len(rows), batch_size):
      idx = np.full(batch_size, -1, np.int64)
      chunk = rows[i:i + batch_size]
      idx[:len(chunk)] = chunk
      out.append((b, idx))
  return [out[i] for i in rng.permutation(len(out))]


def make_batch(inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], idx: np.ndarray,
               length: int) -> tuple[np.ndarray, np.ndarray]:
  """``(x [batch, length], y [batch, length])`` for row ids ``idx`` (``-1`` rows are empty);
  ``y`` is the next item, ``-1`` where there is no label."""
  x = np.zeros((len(idx), length), np.int32)
  y = np.full((len(idx), length), -1, np.int32)
  real = idx >= 0
  x[real] = left_pad([inputs[i] for i in idx[real]], length)
  y[real] = left_pad([targets[i] for i in idx[real]], length) - 1
  return x, y


def loss_fn(model: nn.Module, params: Any, x: jax.Array, y: jax.Array, *, train: bool,
            rng: jax.Array | None = None, label_span: int | None = None) -> jax.Array:
  """Mean next-item cross-entropy over the labelled positions of ``x, y [batch, len]``.

  ``label_span``: labels occur only on the last ``label_span`` positions (``max_len`` for
  :func:`training_pairs` rows), so scores are computed there only; ``None`` = everywhere.
  """
  rngs = {"dropout": rng} if train else None
  h = model.apply({"params": params}, x, train=train, rngs=rngs)
  # labels sit on a row's last <= label_span positions (training_pairs): no logits for context
  if label_span is not None:
    h, y = h[:, -label_span:], y[:, -label_span:]
  logits = model.apply({"params": params}, h, method="scores")           # [B, T', N]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
  w = (y >= 0).astype(jnp.float32)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def topk_both(scores: jax.Array, banned: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``scores, banned [batch, items]`` -> unmasked and masked ``[batch, k]`` top items.

  Masked positions that could only be filled by banned items are ``-1``.
  """
  _, plain = jax.lax.top_k(scores, k)
  top, masked = jax.lax.top_k(jnp.where(banned, -jnp.inf, scores), k)
  return plain, jnp.where(jnp.isneginf(top), -1, masked)


def ban_rows(histories: Sequence[np.ndarray], num_items: int) -> np.ndarray:
  """``[len(histories), num_items]`` bool, each row's items set."""
  out = np.zeros((len(histories), num_items), bool)
  for r, h in enumerate(histories):
    out[r, np.asarray(h, np.int64)] = True
  return out


def rank_topk(last_scores: Callable[[np.ndarray], jax.Array], histories: Sequence[np.ndarray],
              num_items: int, max_len: int, k: int = RANK_K, batch_size: int = EVAL_BATCH
              ) -> dict[str, np.ndarray]:
  """Top-``k`` items per history under both protocols, on the device, ``batch_size`` at a time.

  Args:
    last_scores: ``[batch, len]`` left-padded histories -> ``[batch, num_items]`` scores
      (the model at the last position; jitted, called once per bucket length).
    histories: per user the item numbers, oldest first (the last ``max_len`` are used;
      the whole history is banned under ``"masked"``).
  Returns:
    ``{"unmasked": [users, k], "masked": [users, k]}`` int64 item numbers, best first.
  """
  k = min(k, num_items)
  buckets = length_buckets(max_len)
  out = {p: np.full((len(histories), k), -1, np.int64) for p in PROTOCOLS}
  by_bucket: dict[int, list[int]] = {}
  for u, h in enumerate(histories):
    by_bucket.setdefault(bucket_of(min(len(h), max_len), buckets), []).append(u)
  for b, users in sorted(by_bucket.items()):
    for i in range(0, len(users), batch_size):
      rows = users[i:i + batch_size]
      full = rows + [rows[0]] * (batch_size - len(rows))  # fixed shape: one compile per bucket
      hist = [histories[u] for u in full]
      plain, masked = _topk_jit(last_scores(left_pad(hist, b)),
                                jnp.asarray(ban_rows(hist, num_items)), k)
      out["unmasked"][rows] = np.asarray(plain)[:len(rows)]
      out["masked"][rows] = np.asarray(masked)[:len(rows)]
  return out


_topk_jit = jax.jit(topk_both, static_argnums=2)


def evaluate_split(last_scores: Callable[[np.ndarray], jax.Array],
                   examples: Sequence[SplitExample], num_items: int, max_len: int
                   ) -> dict[str, dict[str, float]]:
  """``{"unmasked": metrics, "masked": metrics}`` of one split (HR/NDCG over all its users)."""
  ranked = rank_topk(last_scores, [e.history for e in examples], num_items, max_len)
  targets = np.asarray([e.target for e in examples])
  return {p: topk_metrics(_at_least(ranked[p], 10), targets) for p in PROTOCOLS}


def _at_least(ranked: np.ndarray, width: int) -> np.ndarray:
  if ranked.shape[1] >= width:
    return ranked
  pad = np.full((ranked.shape[0], width - ranked.shape[1]), -1, ranked.dtype)
  return np.concatenate([ranked, pad], 1)


def train_and_evaluate(model: nn.Module, cfg: Any, dataset: Dataset, *, name: str,
                       seed: int = 0) -> dict[str, Any]:
  """Trains ``model`` on the split's training sequences; both protocols' valid/test metrics.

  Args:
    model: a Flax module with ``__call__(seq [B, T], train) -> [B, T, dim]`` and
      ``scores(hidden [..., dim]) -> [..., num_items]``.
    cfg: a config dataclass with ``max_len, lr, batch_size, epochs, eval_every, patience``.
    dataset: the dataset (its leave-one-out split).
    name: the model's name in progress lines.
    seed: parameter init, dropout and batch order.

  Returns:
    ``{"unmasked": {"valid", "test", "best_epoch"}, "masked": {...}, "history": [...],
    "epochs_run", "seconds"}``; each protocol's metrics come from the parameters of its
    own best valid NDCG@10.
  """
  t0 = time.perf_counter()
  split = dataset.split()
  n = dataset.num_items
  buckets = length_buckets(window_len(cfg.max_len))
  inputs, targets = training_pairs(split.train, cfg.max_len)
  lengths = np.asarray([len(s) for s in inputs])
  steps_per_epoch = len(epoch_batches(lengths, cfg.batch_size, buckets, np.random.default_rng()))
  if steps_per_epoch == 0:
    raise DataError(f"dataset {dataset.name}",
                    f"{name}: no user's training sequence has two items; nothing to train on")
  key = jax.random.PRNGKey(seed)
  params = model.init(key, np.ones((1, buckets[0]), np.int32), train=False)["params"]
  tx = optax.adam(cfg.lr)

  @jax.jit
  def train_step(state, xy):
    (params, opt_state, key), (x, y) = state, xy
    key, rng = jax.random.split(key)
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, x, y, train=True, rng=rng, label_span=cfg.max_len))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, key), {"loss": loss}

  @jax.jit
  def last_scores_jit(params, x):
    h = model.apply({"params": params}, x, train=False)[:, -1]
    return model.apply({"params": params}, h, method="scores")

  def evaluate(params, examples):
    return evaluate_split(lambda x: last_scores_jit(params, x), examples, n, cfg.max_len)

  rng = np.random.default_rng(seed)
  best = {p: (-1.0, params, 0) for p in PROTOCOLS}   # (valid NDCG@10, params, epoch)
  bad, history = 0, []

  def validate(info: loop_lib.EpochInfo) -> str | None:
    """Both protocols on the valid split; each keeps its best params; early stopping."""
    nonlocal bad
    params, valid = loop.state[0], evaluate(loop.state[0], split.valid)
    history.append({"epoch": info.number, "loss": info.mean("loss"),
                    "seconds": time.perf_counter() - t0, **{p: valid[p] for p in PROTOCOLS}})
    improved = False
    for p in PROTOCOLS:
      if valid[p]["NDCG@10"] > best[p][0]:
        best[p], improved = (valid[p]["NDCG@10"], params, info.number), True
    bad = 0 if improved else bad + 1
    prog.set_postfix(ndcg10=valid["unmasked"]["NDCG@10"],
                     ndcg10_masked=valid["masked"]["NDCG@10"])
    return loop_lib.STOP if bad >= cfg.patience else None

  prog = Progress(cfg.epochs, name, "epoch", every_s=0.0)
  loop = loop_lib.Loop(
      train_step, lambda e, pos: (make_batch(inputs, targets, idx, b) for b, idx in
                                  epoch_batches(lengths, cfg.batch_size, buckets, rng)),
      (params, tx.init(params), key), num_steps=cfg.epochs * steps_per_epoch,
      steps_per_epoch=steps_per_epoch, fetch="epoch",
      on_epoch=lambda info: prog.set_postfix(loss=info.mean("loss")),
      epoch_actions=[loop_lib.Periodic(validate, every=cfg.eval_every, at_end=True)],
      progress=prog, name=name)
  outcome = loop.run()
  out: dict[str, Any] = {}
  for p in PROTOCOLS:
    _, best_params, best_epoch = best[p]
    out[p] = {"valid": evaluate(best_params, split.valid)[p],
              "test": evaluate(best_params, split.test)[p], "best_epoch": best_epoch}
    logging.info("%s (%s): best valid NDCG@10 %.4f at epoch %d, test HR@10 %.4f NDCG@10 %.4f",
                 name, p, best[p][0], best_epoch, out[p]["test"]["HR@10"],
                 out[p]["test"]["NDCG@10"])
  out.update(history=history, epochs_run=outcome.epoch + 1 if outcome.steps_run else 0,
             seconds=time.perf_counter() - t0)
  return out
