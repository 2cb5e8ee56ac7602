"""Greedy generation with the real SmolLM2-135M weights equals PyTorch transformers'."""

import os
import subprocess
import sys

import numpy as np
import pytest

from lcrec_jax import generate
from lcrec_jax.llm import build
from tests import entry


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers():
  torch = pytest.importorskip("torch")  # here, not at import: the fast tests need no torch
  transformers = pytest.importorskip("transformers")
  model, params, tok = generate.load()
  prompt = "The capital of France is"
  ids = tok.encode(prompt)
  ours = generate.greedy_ids(model, params, ids, 12)

  path = build.default_gguf_path()
  hf = transformers.LlamaForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  hf.generation_config.eos_token_id = None   # run all 12 steps, as ours does
  out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, top_k=None,
                    top_p=None, temperature=None, num_beams=1, pad_token_id=tok.pad_id)
  theirs = out[0, len(ids):].numpy()
  np.testing.assert_array_equal(ours, theirs)
  text = tok.decode(ours.tolist())
  assert "Paris" in text, text


@pytest.mark.parametrize("flag,expect", [
    ("--gguf=/no/such/model.gguf", "--gguf=/no/such/model.gguf: no such file"),
    ("--hf_dir=.", "--hf_dir=.: no config.json there"),
])
def test_bad_model_path_is_one_line(flag, expect, tmp_path):
  """A wrong --gguf / --hf_dir is a one-line error naming the flag, exit 2, no traceback."""
  out = entry.run("generate", "--prompt=hi", flag, cwd=str(tmp_path))
  assert out.returncode == 2, out.stderr
  assert f"generate: error: {expect}" in out.stderr
  assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_bad_model_path_as_a_process():
  """The real `python -m lcrec_jax.generate` process: one line, exit 2."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo)
  out = subprocess.run([sys.executable, "-m", "lcrec_jax.generate", "--prompt=hi",
                        "--gguf=/no/such/model.gguf"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  assert "generate: error: --gguf=/no/such/model.gguf: no such file" in out.stderr
  assert "Traceback" not in out.stderr
