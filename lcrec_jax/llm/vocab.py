"""Grow a LLaMA's embedding and output rows for added tokens (the item-code vocabulary).

Works on either interchange form:

* an HF-named state dict (``model.embed_tokens.weight [V, E]``, ``lm_head.weight [V, E]``);
* our params pytree (``params["embed_tokens"]["embedding"] [V, E]``,
  ``params["lm_head"]["kernel"] [E, V]``), optionally wrapped as ``{"params": ...}`` and with
  leaves boxed in flax partitioning metadata.

Initialisation (``method="mean"``, the default): every new row is the mean of the existing rows
plus independent Gaussian noise whose per-dimension std is ``noise_scale`` (default 0.1) times
the per-dimension std of the existing rows. Why:

* The mean row keeps the model's behaviour on old text: for any hidden state ``h``, the new
  tokens' logits are about ``h . mean``, the average of the old logits, so the new tokens neither
  dominate nor vanish from the softmax before training (the argument behind transformers'
  ``mean_resizing``), and as inputs they look like an "average token" rather than an
  out-of-distribution vector.
* Without noise all ``L*K`` code tokens would start identical; small noise makes them distinct
  from step one. Scaling it to the rows' own spread keeps it meaningful for any model's scale.
  Measured on SmolLM2-135M (1024 new rows, 256 embedding rows as hidden states): the noise moves
  a new token's logit from the mean-row logit by a median 0.018 (max 0.29) standard deviations
  of the old logits, and new tokens rank mid-distribution (about half the old tokens above).

``method="normal"`` instead draws rows from ``N(0, std^2)`` with ``std`` the overall std of the
existing rows (a fresh random init at the model's scale). Tied models (no separate output head)
grow once: the embedding is the head.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

_HF_EMBED, _HF_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def new_rows(old: np.ndarray, num_new: int, rng: np.random.Generator, method: str = "mean",
             noise_scale: float = 0.1) -> np.ndarray:
  """Rows to append to ``old`` ``[V, E]``: ``[num_new, E]`` in float64 (see module docstring)."""
  old = np.asarray(old, np.float64)
  if old.ndim != 2 or old.shape[0] == 0:
    raise ValueError(f"expected a non-empty [vocab, embed] matrix, got shape {old.shape}")
  e = old.shape[1]
  if method == "mean":
    mean, std = old.mean(0), old.std(0)
    return mean[None, :] + noise_scale * std[None, :] * rng.standard_normal((num_new, e))
  if method == "normal":
    return old.std() * rng.standard_normal((num_new, e))
  raise ValueError(f"grow_embeddings: method {method!r} is not one of 'mean', 'normal'")


def _unbox(x: Any):
  """(value, rebox) for flax AxisMetadata-boxed leaves; identity otherwise."""
  try:
    from flax.core import meta  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    meta = None
  if meta is not None and isinstance(x, meta.AxisMetadata):
    return x.unbox(), x.replace_boxed
  return x, lambda v: v


def _append(x: Any, rows: np.ndarray, axis: int) -> Any:
  """``x`` with ``rows`` (``[n, E]``, laid along ``axis`` of x) appended, same array type/dtype."""
  value, rebox = _unbox(x)
  add = rows if axis == 0 else rows.T
  if isinstance(value, np.ndarray):
    out = np.concatenate([value, add.astype(value.dtype)], axis=axis)
  else:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    out = jnp.concatenate([value, jnp.asarray(add, dtype=value.dtype)], axis=axis)
  return rebox(out)


def grow_embeddings(params_or_state_dict: Mapping[str, Any], new_vocab_size: int,
                    seed: int = 0, method: str = "mean", noise_scale: float = 0.1
                    ) -> dict[str, Any]:
  """Append rows so the vocabulary has ``new_vocab_size`` entries (embedding and output head).

  Args:
    params_or_state_dict: an HF-named state dict or a ``Llama`` params pytree (see module doc).
      It is not modified.
    new_vocab_size: rows wanted, e.g. ``len(tokenizer)`` after adding code tokens (or that
      rounded up to a multiple of 128 for TPU-friendly shapes). Equal to the current size:
      returned unchanged (a shallow copy).
    seed: seed of the noise (numpy ``default_rng``); embedding and head draw different noise.
    method: ``"mean"`` (mean row + scaled noise) or ``"normal"``.
    noise_scale: noise std as a fraction of the per-dimension std of the existing rows.

  Returns:
    A new dict of the same form; remember to set ``vocab_size`` in the model config.

  Raises:
    KeyError: no embedding found. ValueError: ``new_vocab_size`` below the current size, or the
      head's vocabulary size differs from the embedding's.
  """
  tree = dict(params_or_state_dict)
  if "params" in tree and len(tree) == 1 and isinstance(tree["params"], Mapping):
    return {"params": grow_embeddings(tree["params"], new_vocab_size, seed, method, noise_scale)}
  rng = np.random.default_rng(seed)
  if _HF_EMBED in tree:
    emb = np.asarray(tree[_HF_EMBED])
    old_v = emb.shape[0]
    head = np.asarray(tree[_HF_HEAD]) if _HF_HEAD in tree else None
    head_axis = 0
  elif "embed_tokens" in tree:
    emb_tree = dict(tree["embed_tokens"])
    emb = np.asarray(_unbox(emb_tree["embedding"])[0])
    old_v = emb.shape[0]
    head = None
    if "lm_head" in tree:
      head = np.asarray(_unbox(tree["lm_head"]["kernel"])[0]).T  # [E, V] -> [V, E]
    head_axis = 1
  else:
    raise KeyError(f"grow_embeddings: neither {_HF_EMBED!r} nor 'embed_tokens' found "
                   f"(keys: {sorted(tree)[:6]})")
  if head is not None and head.shape[0] != old_v:
    raise ValueError(f"grow_embeddings: output head has {head.shape[0]} rows, embedding {old_v}")
  if new_vocab_size < old_v:
    raise ValueError(f"grow_embeddings: new_vocab_size {new_vocab_size} < current {old_v}")
  n = new_vocab_size - old_v
  if n == 0:
    return tree
  emb_rows = new_rows(emb, n, rng, method, noise_scale)
  head_rows = None if head is None else new_rows(head, n, rng, method, noise_scale)
  if _HF_EMBED in tree:
    tree[_HF_EMBED] = _append(tree[_HF_EMBED], emb_rows, 0)
    if head_rows is not None:
      tree[_HF_HEAD] = _append(tree[_HF_HEAD], head_rows, 0)
  else:
    emb_tree["embedding"] = _append(emb_tree["embedding"], emb_rows, 0)
    tree["embed_tokens"] = emb_tree
    if head_rows is not None:
      head_tree = dict(tree["lm_head"])
      head_tree["kernel"] = _append(head_tree["kernel"], head_rows, head_axis)
      tree["lm_head"] = head_tree
  return tree
