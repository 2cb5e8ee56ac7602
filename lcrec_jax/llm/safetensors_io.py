"""Read and write Hugging Face LLaMA directories (safetensors + config.json) without torch.

Reading goes one tensor at a time: each HF tensor is converted to our layout and, when
a sharding pytree is given, placed straight onto devices (`jax.device_put`, or
`jax.make_array_from_callback` for layer-stacked leaves, which reads only the layers a
device shard needs), so a 7B model never needs a full host copy.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lcrec_jax import fs
from lcrec_jax.llm import convert
from lcrec_jax.llm.config import LlamaConfig
from lcrec_jax.llm.tree_paths import set_path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_hf_config(model_dir: str, **overrides) -> LlamaConfig:
  """`LlamaConfig` from `<model_dir>/config.json` (overrides e.g. dtype, scan_layers).

  Raises:
    FileNotFoundError: no config.json. ValueError: not a LLaMA architecture.
  """
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing (an HF model directory needs config.json)")
  with open(path) as f:
    d = json.load(f)
  try:
    return LlamaConfig.from_hf_dict(d, **overrides)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def weight_map(model_dir: str) -> dict[str, str]:
  """HF key -> safetensors file path, for a single-file or index-sharded directory.

  Raises:
    FileNotFoundError: neither model.safetensors nor its index exists (the message
      says when only PyTorch .bin weights are present), or a shard is missing.
  """
  single = os.path.join(model_dir, SINGLE_FILE)
  index = os.path.join(model_dir, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      wm = json.load(f).get("weight_map")
    if not isinstance(wm, dict):
      raise ValueError(f"{index}: no 'weight_map' object")
    out = {k: os.path.join(model_dir, v) for k, v in wm.items()}
    for p in sorted(set(out.values())):
      if not os.path.isfile(p):
        raise FileNotFoundError(f"{p}: shard listed in {index} is missing")
    return out
  if os.path.isfile(single):
    with safe_open(single, framework="numpy") as f:
      return {k: single for k in f.keys()}
  bins = [n for n in os.listdir(model_dir)] if os.path.isdir(model_dir) else []
  hint = (" (only PyTorch .bin weights found; convert them to safetensors)"
          if any(n.endswith(".bin") for n in bins) else "")
  raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


class _Reader:
  """Opens each safetensors file once and reads single tensors."""

  def __init__(self, wm: Mapping[str, str]):
    self.wm = wm
    self._files: dict[str, Any] = {}

  def shape(self, key: str) -> tuple[int, ...]:
    f = self._open(self.wm[key])
    return tuple(f.get_slice(key).get_shape())

  def get(self, key: str) -> np.ndarray:
    return self._open(self.wm[key]).get_tensor(key)

  def _open(self, path: str):
    if path not in self._files:
      self._files[path] = safe_open(path, framework="numpy").__enter__()
    return self._files[path]

  def close(self):
    for f in self._files.values():
      f.__exit__(None, None, None)
    self._files = {}


def _tree_get(tree: Any, path: tuple[str, ...]) -> Any:
  for p in path:
    if tree is None:
      return None
    if not isinstance(tree, Mapping) or p not in tree:
      raise KeyError(f"shardings: no entry for params/{'/'.join(path)} (does the sharding "
                     "tree match the config, e.g. its scan_layers?)")
    tree = tree[p]
  return tree


def load_hf_dir(model_dir: str, cfg: LlamaConfig | None = None, *,
                shardings: Any = None, dtype: Any = None,
                **cfg_overrides) -> tuple[dict[str, Any], LlamaConfig]:
  """Loads an HF LLaMA directory into a params pytree.

  Args:
    model_dir: directory with config.json and model.safetensors (or sharded files
      with model.safetensors.index.json).
    cfg: config to load into (must match the files); default from config.json.
    shardings: optional pytree (same structure as the params, e.g. from
      `nn.logical_to_mesh_sharding`) of `jax.sharding.Sharding`s; each array is
      placed directly into its sharding.
    dtype: parameter dtype (default `cfg.param_dtype`).
    **cfg_overrides: applied to the config read from config.json (dtype, scan_layers...).

  Returns:
    (params, cfg) with jax arrays as leaves.

  Raises:
    FileNotFoundError / ValueError / KeyError naming the file, key or shape at fault.
  """
  if cfg is None:
    cfg = load_hf_config(model_dir, **cfg_overrides)
  elif cfg_overrides:
    cfg = cfg.replace(**cfg_overrides)
  dtype = np.dtype(dtype or cfg.weight_dtype)
  wm = weight_map(model_dir)
  convert.check_keys(wm.keys(), cfg, where=model_dir)
  table = convert.hf_param_table(cfg)
  reader = _Reader(wm)
  try:
    for t in table.values():
      convert.check_shape(t, reader.shape(t.key), where=wm[t.key])
    by_path: dict[tuple[str, ...], list[convert.HFTensor]] = {}
    for t in table.values():
      by_path.setdefault(t.path, []).append(t)
    params: dict[str, Any] = {}
    for path, ts in by_path.items():
      sharding = _tree_get(shardings, path) if shardings is not None else None
      read = lambda t: convert.hf_to_param_layout(reader.get(t.key), t.kind, cfg).astype(dtype)
      if ts[0].layer is None:
        w = read(ts[0])
        arr = jax.device_put(w, sharding) if sharding is not None else jax.device_put(w)
      else:
        shape = convert.param_shape(ts[0], cfg)
        if sharding is None:
          arr = jax.device_put(np.stack([read(t) for t in ts]))
        else:
          def cb(index, ts=ts, read=read):
            layers = range(len(ts))[index[0]]
            return np.stack([read(ts[i])[tuple(index[1:])] for i in layers])
          arr = jax.make_array_from_callback(shape, sharding, cb)
      set_path(params, path, arr)
  finally:
    reader.close()
  return params, cfg


def generation_config_dict(cfg: LlamaConfig) -> dict[str, Any]:
  """generation_config.json contents: greedy by default, special ids from the config."""
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos,
          "pad_token_id": cfg.pad_token_id, "do_sample": False}


def save_hf_dir(params: Mapping[str, Any], cfg: LlamaConfig, out_dir: str,
                tokenizer_files: Any = None, *, dtype: Any = None,
                max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes an HF `LlamaForCausalLM` directory.

  Args:
    params: `Llama(cfg)` params (no LoRA; merge first).
    cfg: their config (written as config.json).
    out_dir: created if needed. A `gs://` directory is written locally first and then
      copied there file by file (`lcrec_jax.fs.local_dir_for_write`); the caller picks
      the writing process (the train stage: process 0).
    tokenizer_files, dtype, max_shard_bytes: see `_save_hf_dir_local`.

  Returns:
    Paths of the files written (under `out_dir`).
  """
  if not fs.is_remote(out_dir):
    return _save_hf_dir_local(params, cfg, out_dir, tokenizer_files, dtype=dtype,
                              max_shard_bytes=max_shard_bytes)
  with fs.local_dir_for_write(out_dir) as local:
    written = _save_hf_dir_local(params, cfg, local, tokenizer_files, dtype=dtype,
                                 max_shard_bytes=max_shard_bytes)
    names = [os.path.relpath(p, local) for p in written]
  for stale in (SINGLE_FILE, INDEX_FILE):  # left by an earlier export with other sharding
    if stale not in names:
      fs.remove(fs.join(out_dir, stale), all_processes=True)
  return [fs.join(out_dir, *n.split(os.sep)) for n in names]


def _save_hf_dir_local(params: Mapping[str, Any], cfg: LlamaConfig, out_dir: str,
                       tokenizer_files: Any = None, *, dtype: Any = None,
                       max_shard_bytes: int = 4 << 30) -> list[str]:
  """`save_hf_dir` into a local directory.

  Args:
    params: `Llama(cfg)` params (no LoRA; merge first).
    cfg: their config (written as config.json).
    out_dir: local directory, created if needed.
    tokenizer_files: None; a directory or an iterable of file paths to copy; or an
      object with `save_pretrained(dir)` (a transformers tokenizer) or `save(path)`
      (a `tokenizers.Tokenizer`, written as tokenizer.json).
    dtype: weight dtype in the files (default: the params' own).
    max_shard_bytes: above this the weights are split into
      `model-0000i-of-0000n.safetensors` files plus an index json.

  Returns:
    Paths of the files written.
  """
  os.makedirs(out_dir, exist_ok=True)
  written: list[str] = []
  # Tensors come one param leaf at a time; a shard is written as soon as it fills,
  # under a temporary name (the final names need the shard count).
  shard: dict[str, np.ndarray] = {}
  size = total = 0
  shard_files: list[tuple[str, list[str]]] = []
  tmp_names: list[str] = []

  def flush():
    name = f"_shard{len(tmp_names):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    tmp_names.append(name)
    shard_files.append((name, list(shard.keys())))

  for key, w in convert.iter_hf_from_params(params, cfg, dtype):
    if shard and size + w.nbytes > max_shard_bytes:
      flush()
      shard, size = {}, 0
    shard[key] = np.ascontiguousarray(w)
    size += w.nbytes
    total += w.nbytes
  flush()
  n = len(tmp_names)
  if n == 1:
    final = os.path.join(out_dir, SINGLE_FILE)
    os.replace(os.path.join(out_dir, tmp_names[0]), final)
    written.append(final)
    stale = os.path.join(out_dir, INDEX_FILE)
    if os.path.exists(stale):
      os.remove(stale)
  else:
    wm = {}
    for i, (name, keys) in enumerate(shard_files):
      new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      os.replace(os.path.join(out_dir, name), os.path.join(out_dir, new))
      written.append(os.path.join(out_dir, new))
      wm.update({k: new for k in keys})
    order = list(convert.hf_param_table(cfg))
    idx = {"metadata": {"total_size": total}, "weight_map": {k: wm[k] for k in order}}
    path = os.path.join(out_dir, INDEX_FILE)
    with open(path, "w") as f:
      json.dump(idx, f, indent=2)
    written.append(path)
    stale = os.path.join(out_dir, SINGLE_FILE)
    if os.path.exists(stale):
      os.remove(stale)

  hf_cfg = cfg.to_hf_dict()
  if dtype is not None:
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = np.dtype(dtype).name
  for name, obj in (("config.json", hf_cfg), ("generation_config.json",
                                                 generation_config_dict(cfg))):
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
      json.dump(obj, f, indent=2)
    written.append(path)
  written += _save_tokenizer(tokenizer_files, out_dir)
  return written


def _save_tokenizer(tok: Any, out_dir: str) -> list[str]:
  """Copies or saves tokenizer files into out_dir; returns the paths written."""
  if tok is None:
    return []
  if hasattr(tok, "save_pretrained"):
    return [str(p) for p in tok.save_pretrained(out_dir)]
  if hasattr(tok, "save") and hasattr(tok, "add_code_tokens"):
    # LCRecTokenizer: writes tokenizer.json + tokenizer_config.json + special tokens map.
    tok.save(out_dir)
    return [os.path.join(out_dir, n) for n in ("tokenizer.json", "tokenizer_config.json",
                                               "special_tokens_map.json")]
  if hasattr(tok, "save") and hasattr(tok, "encode"):
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    return [path]
  if isinstance(tok, (str, os.PathLike)) and os.path.isdir(tok):
    names = [os.path.join(tok, n) for n in sorted(os.listdir(tok))
             if n.startswith(("tokenizer", "special_tokens_map", "added_tokens",
                              "chat_template")) or n.endswith((".model", ".tiktoken"))]
    tok = names
  if isinstance(tok, (str, os.PathLike)):
    tok = [tok]
  out = []
  for p in tok:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"tokenizer_files: {p} is not a file")
    dst = os.path.join(out_dir, os.path.basename(p))
    if os.path.abspath(p) != os.path.abspath(dst):
      shutil.copyfile(p, dst)
    out.append(dst)
  return out
