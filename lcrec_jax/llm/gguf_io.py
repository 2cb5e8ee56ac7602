"""Read LLaMA-architecture GGUF files (llama.cpp's format) into a Hugging Face state dict.

:func:`load_gguf` returns ``(state_dict, hf_config)``: a dict of numpy arrays named and laid out
like a PyTorch ``LlamaForCausalLM`` checkpoint (``model.layers.{i}.self_attn.q_proj.weight``
``[out, in]``, ...) and a config dict with the fields of ``transformers.LlamaConfig``. That pair
is the contract with :mod:`lcrec_jax.llm.convert`, which turns it into our param pytree.

Three things differ between a GGUF file and an HF checkpoint:

* Names: ``blk.{i}.attn_q.weight`` is ``model.layers.{i}.self_attn.q_proj.weight``, etc.
* Shapes: GGUF lists dimensions fastest-first (``[in, out]``); the bytes are row-major
  ``[out, in]``, so the numpy shape is the reversed GGUF shape and no transpose is needed.
* Rotary layout: llama.cpp rotates adjacent pairs ``(x[2j], x[2j+1])`` while HF rotates
  halves ``(x[j], x[j + d/2])``. llama.cpp's converter therefore reorders the rows of the q and
  k projections inside every head: HF row ``s * d/2 + j`` (half ``s``, index ``j``) goes to GGUF
  row ``2 * j + s``. We undo that: view a head's ``d`` rows as ``[d/2, 2]``, swap to ``[2, d/2]``.

Quantised tensors (Q4_0/Q4_1/Q8_0/K-quants/...) are dequantised with ``gguf.quants``; anything
it cannot dequantise raises an error that names the type and the tensor. The header is parsed by
the small :class:`GGUFFile` reader here (``gguf.GGUFReader`` is 10-50x slower on a 49k-token
vocabulary); tests check both readers agree.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from typing import Any, Iterable

import numpy as np
import tqdm

# llama.cpp per-layer tensor suffix -> HF per-layer suffix.
_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_MAP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str:
  """Map a llama.cpp tensor name to the HF LLaMA name.

  ``"blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"``,
  ``"token_embd.weight" -> "model.embed_tokens.weight"``. Raises ``KeyError`` for names that
  are not part of a LLaMA model.
  """
  m = _BLOCK_RE.match(name)
  if m:
    layer, part, kind = m.groups()
    if part not in _LAYER_MAP:
      raise KeyError(f"GGUF tensor {name!r}: unknown per-layer tensor {part!r}")
    return f"model.layers.{layer}.{_LAYER_MAP[part]}.{kind}"
  stem, _, kind = name.rpartition(".")
  if stem in _GLOBAL_MAP and kind in ("weight", "bias"):
    return f"{_GLOBAL_MAP[stem]}.{kind}"
  raise KeyError(f"GGUF tensor {name!r} has no LLaMA counterpart")


def unpermute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row order: pairwise-interleaved -> HF half-split.

  Args:
    w: ``[num_heads * head_dim, in]`` (or ``[num_heads * head_dim]`` for a bias) in GGUF order,
      where within a head row ``2 * j + s`` holds HF row ``s * head_dim / 2 + j``.
    num_heads: heads of this projection (``num_key_value_heads`` for k).

  Returns:
    The same rows in HF order, same shape.
  """
  rows = w.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f"cannot un-permute {rows} rows over {num_heads} heads of even size")
  half = rows // num_heads // 2
  return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of :func:`unpermute_rotary_rows` (HF order -> llama.cpp order), for tests/export."""
  rows = w.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f"cannot permute {rows} rows over {num_heads} heads of even size")
  half = rows // num_heads // 2
  return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
            10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _BOOL = 8, 9, 7


class GGUFFile:
  """Minimal memory-mapped GGUF (v2/v3, little-endian) reader: metadata and raw tensor bytes.

  ``gguf.GGUFReader`` builds a numpy view per metadata element, which takes 5-30 s on a
  49k-token vocabulary; this reads the same header with ``struct`` in well under a second.
  Dequantisation still goes through ``gguf.quants``.

  Attributes:
    path: the file.
    metadata: key -> python value (str, int, float, bool, or list of those).
    tensors: name -> ``(ggml_type, gguf_shape, byte_offset)``; ``gguf_shape`` is fastest-first.
  """

  def __init__(self, path: str):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"GGUF file not found: {path}")
    self.path = path
    if os.path.getsize(path) < 24:
      raise ValueError(f"{path}: {os.path.getsize(path)} bytes, too small to be a GGUF file")
    self._buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv = memoryview(self._buf)
    try:
      if bytes(mv[:4]) != b"GGUF":
        raise ValueError("bad magic (not a GGUF file)")
      version, = struct.unpack_from("<I", mv, 4)
      if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version} (or a big-endian file)")
      n_tensors, n_kv = struct.unpack_from("<QQ", mv, 8)
      pos = 24
      self.metadata: dict[str, Any] = {}
      for _ in range(n_kv):
        key, pos = self._str(mv, pos)
        vtype, = struct.unpack_from("<I", mv, pos)
        self.metadata[key], pos = self._value(mv, pos + 4, vtype)
      infos = []
      for _ in range(n_tensors):
        name, pos = self._str(mv, pos)
        ndim, = struct.unpack_from("<I", mv, pos)
        shape = struct.unpack_from(f"<{ndim}Q", mv, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", mv, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        infos.append((name, ttype, tuple(int(d) for d in shape), offset))
    except (struct.error, UnicodeDecodeError, IndexError) as e:
      raise ValueError(f"{path}: truncated or corrupt GGUF header ({e})") from None
    except ValueError as e:  # ours above, or numpy's "buffer is smaller than requested size"
      raise ValueError(f"{path}: corrupt or truncated GGUF header: {e}") from None
    align = int(self.metadata.get("general.alignment", 32))
    self._data_start = -(-pos // align) * align
    self.tensors = {n: (t, s, o) for n, t, s, o in infos}

  @staticmethod
  def _str(mv, pos: int) -> tuple[str, int]:
    n, = struct.unpack_from("<Q", mv, pos)
    return str(mv[pos + 8:pos + 8 + n], "utf-8"), pos + 8 + n

  def _value(self, mv, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype == _STRING:
      return self._str(mv, pos)
    if vtype in _SCALARS:
      dt = np.dtype(_SCALARS[vtype])
      v = np.frombuffer(mv, dt, 1, pos)[0].item()
      return (bool(v) if vtype == _BOOL else v), pos + dt.itemsize
    if vtype == _ARRAY:
      etype, n = struct.unpack_from("<IQ", mv, pos)
      pos += 12
      if etype in _SCALARS:
        dt = np.dtype(_SCALARS[etype])
        arr = np.frombuffer(mv, dt, n, pos)
        vals = arr.astype(bool).tolist() if etype == _BOOL else arr.tolist()
        return vals, pos + n * dt.itemsize
      out = []
      for _ in range(n):
        v, pos = self._value(mv, pos, etype)
        out.append(v)
      return out, pos
    raise ValueError(f"unknown metadata value type {vtype}")

  def raw(self, name: str) -> np.ndarray:
    """The stored bytes of tensor ``name`` as gguf.quants expects them: ``[rows, row_bytes]``."""
    import gguf  # pylint: disable=g-import-not-at-top

    ttype, shape, offset = self.tensors[name]
    try:
      qtype = gguf.GGMLQuantizationType(ttype)
      block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
      raise ValueError(f"{self.path}: tensor {name!r} has unknown ggml type {ttype}") from None
    if shape[0] % block:
      raise ValueError(f"{self.path}: tensor {name!r}: row of {shape[0]} not a multiple of "
                       f"{qtype.name} block size {block}")
    row_bytes = shape[0] // block * type_size
    rows = int(np.prod(shape[1:], dtype=np.int64))
    start = self._data_start + offset
    data = self._buf[start:start + rows * row_bytes]
    if data.size != rows * row_bytes:
      raise ValueError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated?)")
    return np.asarray(data).reshape(rows, row_bytes)

  def dequantize(self, name: str) -> np.ndarray:
    """Tensor ``name`` as float32 in numpy (row-major) shape = reversed GGUF shape."""
    import gguf  # pylint: disable=g-import-not-at-top

    ttype, shape, _ = self.tensors[name]
    qtype = gguf.GGMLQuantizationType(ttype)
    data = self.raw(name)
    try:
      w = gguf.quants.dequantize(data, qtype)
    except NotImplementedError:
      raise ValueError(f"{self.path}: tensor {name!r} has quant type {qtype.name}, which "
                       "gguf.quants cannot dequantize") from None
    return np.asarray(w, np.float32).reshape(tuple(reversed(shape)))


def read_gguf_metadata(path: str, keys: Iterable[str] | None = None) -> dict[str, Any]:
  """Metadata key/values of a GGUF file as python values (strings, numbers, lists).

  Args:
    path: the ``.gguf`` file.
    keys: only these keys (missing ones are left out); ``None`` = all keys.
  """
  meta = GGUFFile(path).metadata
  return dict(meta) if keys is None else {k: meta[k] for k in keys if k in meta}


def _hf_config(meta: dict[str, Any], tied: bool, path: str,
               vocab: int | None = None) -> dict[str, Any]:
  """HF ``LlamaConfig`` fields from ``llama.*`` and ``tokenizer.ggml.*`` metadata.

  ``vocab`` (the embedding's row count) wins over the token list's length: some files pad the
  embedding beyond the tokenizer.
  """
  arch = meta.get("general.architecture")

  def need(key: str):
    full = f"{arch}.{key}"
    if full not in meta:
      raise ValueError(f"{path}: metadata key {full!r} is missing")
    return meta[full]

  hidden = int(need("embedding_length"))
  heads = int(need("attention.head_count"))
  kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
  head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
  if vocab is None:
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else meta.get(f"{arch}.vocab_size")
  if vocab is None:
    raise ValueError(f"{path}: no token_embd tensor, tokenizer.ggml.tokens or {arch}.vocab_size "
                     "to give the vocabulary size")
  theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
  scaling_type = meta.get(f"{arch}.rope.scaling.type")
  if scaling_type not in (None, "none"):
    if scaling_type != "linear":
      raise ValueError(f"{path}: rope scaling {scaling_type!r} is not supported from GGUF "
                       "(use the model's HF safetensors directory)")
    rope = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
  cfg = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(need("feed_forward_length")),
      "num_hidden_layers": int(need("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
      "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": theta,
      "rope_parameters": dict(rope, rope_theta=theta),
      "rope_scaling": None if rope["rope_type"] == "default" else rope,
      "tie_word_embeddings": bool(tied),
      "attention_bias": False,
      "mlp_bias": False,
  }
  for name in ("bos", "eos", "padding", "unknown"):
    v = meta.get(f"tokenizer.ggml.{name}_token_id")
    if v is not None:
      key = {"padding": "pad", "unknown": "unk"}.get(name, name)
      cfg[f"{key}_token_id"] = int(v)
  return cfg


def _config_of(f: GGUFFile) -> dict[str, Any]:
  arch = f.metadata.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"{f.path}: general.architecture is {arch!r}; only 'llama' is supported")
  embd = f.tensors.get("token_embd.weight")
  return _hf_config(f.metadata, tied="output.weight" not in f.tensors, path=f.path,
                    vocab=embd[1][1] if embd is not None and len(embd[1]) == 2 else None)


def read_gguf_config(path: str) -> dict[str, Any]:
  """The HF config dict of a LLaMA GGUF file, from its header only (no tensors read).

  Same dict as the second value of :func:`load_gguf`; raises as that does for a missing file,
  a non-GGUF file or a non-llama architecture.
  """
  return _config_of(GGUFFile(path))


def load_gguf(path: str, dtype: Any = np.float32) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Load a LLaMA GGUF file as an HF-named state dict and an HF config dict.

  Args:
    path: the ``.gguf`` file.
    dtype: numpy dtype of the returned arrays; each tensor is dequantised in float32 and cast
      right away, so peak memory is the result plus one float32 tensor.

  Returns:
    ``(state_dict, hf_config)``. ``state_dict`` maps HF names to arrays in PyTorch layout, e.g.
    ``model.embed_tokens.weight [vocab, hidden]``, ``model.layers.{i}.self_attn.q_proj.weight
    [heads * head_dim, hidden]`` (already in HF's half-split rotary order),
    ``model.layers.{i}.mlp.down_proj.weight [hidden, intermediate]``; ``lm_head.weight`` is
    absent when the file has no ``output`` tensor (tied embeddings, ``tie_word_embeddings``).

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: not a GGUF file, architecture other than ``llama``, missing metadata, a
      tensor of unsupported quant type (named), or a shape that disagrees with the metadata.
  """
  f = GGUFFile(path)
  cfg = _config_of(f)
  heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

  state: dict[str, np.ndarray] = {}
  for name in tqdm.tqdm(f.tensors, desc="gguf", disable=not sys.stderr.isatty(), leave=False):
    if name == "rope_freqs.weight":
      raise ValueError(f"{path}: has a rope_freqs tensor (LLaMA-3.1 style rope scaling), which "
                       "GGUF loading does not support; load the HF safetensors directory instead")
    try:
      hf_name = gguf_to_hf_name(name)
    except KeyError as e:
      raise ValueError(f"{path}: {e.args[0]}") from None
    w = f.dequantize(name)
    if hf_name.endswith("q_proj.weight"):
      w = unpermute_rotary_rows(w, heads)
    elif hf_name.endswith("k_proj.weight"):
      w = unpermute_rotary_rows(w, kv_heads)
    state[hf_name] = w.astype(dtype, copy=False)

  _check_shapes(state, cfg, path)
  return state, cfg


def _check_shapes(state: dict[str, np.ndarray], cfg: dict[str, Any], path: str) -> None:
  """Every expected tensor is present with the shape the config implies."""
  e, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  hd = cfg["head_dim"]
  q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
  want = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
  if not cfg["tie_word_embeddings"]:
    want["lm_head.weight"] = (v, e)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    want.update({
        p + "self_attn.q_proj.weight": (q, e), p + "self_attn.k_proj.weight": (kv, e),
        p + "self_attn.v_proj.weight": (kv, e), p + "self_attn.o_proj.weight": (e, q),
        p + "mlp.gate_proj.weight": (f, e), p + "mlp.up_proj.weight": (f, e),
        p + "mlp.down_proj.weight": (e, f), p + "input_layernorm.weight": (e,),
        p + "post_attention_layernorm.weight": (e,),
    })
  missing = sorted(set(want) - set(state))
  if missing:
    raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  extra = sorted(set(state) - set(want))
  if extra:
    raise ValueError(f"{path}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
  for k, s in want.items():
    if state[k].shape != s:
      raise ValueError(f"{path}: tensor {k} has shape {state[k].shape}, config implies {s}")
