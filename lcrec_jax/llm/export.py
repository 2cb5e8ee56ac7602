"""Export a fine-tuned `Llama` (LoRA merged, extended vocabulary) as an HF directory.

The result loads with PyTorch `transformers.LlamaForCausalLM.from_pretrained(out_dir)`
and, when a tokenizer is given, `AutoTokenizer.from_pretrained(out_dir)`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from lcrec_jax.llm import safetensors_io
from lcrec_jax.llm.config import LlamaConfig
from lcrec_jax.llm.lora import LoraParams, merge
from lcrec_jax.runtime.finite import check_finite


def export_hf(out_dir: str, params: Mapping[str, Any], cfg: LlamaConfig, *,
              lora: LoraParams | None = None, tokenizer: Any = None, dtype: Any = None,
              max_shard_bytes: int = 4 << 30, **cfg_updates) -> list[str]:
  """Writes model.safetensors(+index), config.json, generation_config.json, tokenizer.

  Args:
    out_dir: target directory, local or `gs://` (see `safetensors_io.save_hf_dir`).
    params: `Llama(cfg)` params (possibly with more vocabulary rows than
      `cfg.vocab_size` after adding item-code tokens: the row count wins).
    cfg: the model config.
    lora: adapters to merge first.
    tokenizer: see `safetensors_io.save_hf_dir(tokenizer_files=...)`.
    dtype: weight dtype in the files ("float32", "bfloat16", ...); default the params'.
    max_shard_bytes: shard size limit.
    **cfg_updates: config fields to set in config.json (e.g. eos_token_id, pad_token_id).

  Returns:
    Paths written.

  Raises:
    ValueError: embedding and head disagree on the vocabulary size.
    lcrec_jax.runtime.finite.NonFiniteError: a param (LoRA merged) holds NaN/inf values;
      nothing is written.
  """
  if lora is not None:
    params = jax.jit(merge)(params, lora)
  check_finite(params, f"export to {out_dir}: params")
  rows = int(np.shape(params["embed_tokens"]["embedding"])[0])
  if not cfg.tie_word_embeddings:
    head = int(np.shape(params["lm_head"]["kernel"])[-1])
    if head != rows:
      raise ValueError(f"params: embed_tokens has {rows} rows but lm_head has {head} columns")
  cfg = cfg.replace(vocab_size=rows, **cfg_updates)
  return safetensors_io.save_hf_dir(params, cfg, out_dir, tokenizer_files=tokenizer,
                                    dtype=dtype, max_shard_bytes=max_shard_bytes)
