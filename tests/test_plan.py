"""Planner: LLaMA-7B's real train step compiled on 8 simulated CPU devices, no weights.

The recipe configs/lcrec_instruments_llama7b.py (LLaMA-1 7B + 1,024 code tokens, bf16
compute, scan + full remat, float32 master weights, AdamW) on a (data=1, fsdp=8,
tensor=1) mesh. To keep the CPU compile short (~15 s) the batch is 8 x 64 tokens
instead of the recipe's 128 x up to 1024; params and optimizer state do not depend on
it. Checks: parameter bytes equal the analytic count (`LlamaConfig.num_params() * 4`
globally; per device every matrix is split 8 ways over its embed dimension and the
RMSNorm scales are replicated), AdamW's two moments are twice that, and the compiled
executable's argument bytes are exactly state + batch (nothing allocated besides).
"""

import math
import os
import subprocess
import sys

import pytest

from configs.lcrec_instruments_llama7b import get_config
from lcrec_jax.pipeline import plan as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, BATCH = 64, 8


@pytest.fixture(scope="module")
def llama7b_plan():
  config = get_config()
  return config, plan_lib.plan_train_step(config, {"fsdp": 8}, seq_len=SEQ, global_batch=BATCH,
                                          target_mfu=0.5, peak_flops=275e12)


@pytest.mark.slow
def test_llama7b_param_bytes_match_analytic_count(llama7b_plan):
  config, p = llama7b_plan
  cfg = plan_lib.model_config_for_plan(config)
  assert cfg.vocab_size == 32000 + 4 * 256 and cfg.scan_layers and cfg.remat_policy == "full"
  n = cfg.num_params()
  assert p.num_params == n
  assert 6.7e9 < n < 6.8e9
  assert p.param_bytes_global == n * 4  # float32 master weights
  norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size  # replicated RMSNorm scales
  assert (n - norms) % 8 == 0
  assert p.param_bytes == ((n - norms) // 8 + norms) * 4
  # AdamW mu and nu mirror the params' shardings; the rest is a few scalar counters.
  assert 0 <= p.opt_state_bytes - 2 * p.param_bytes <= 64
  assert p.batch_bytes == 4 * 4 * BATCH * SEQ // 8  # 4 int32 [B, T] arrays over 8 ways


@pytest.mark.slow
def test_llama7b_compiled_memory_and_throughput(llama7b_plan):
  config, p = llama7b_plan
  state = p.param_bytes + p.opt_state_bytes
  # Compiled arguments: the state and the batch, plus step (int32) and rng (2 x uint32).
  assert p.argument_bytes == state + p.batch_bytes + 12
  # The state is donated: (almost) all outputs reuse input buffers.
  assert p.alias_bytes >= state
  assert p.output_bytes - p.alias_bytes < 1 << 20
  # Temporaries hold at least one gradient shard per device and fit a v4 chip's 32 GiB.
  assert p.param_bytes <= p.temp_bytes < 32 * plan_lib.GIB
  assert p.peak_bytes == p.argument_bytes + p.output_bytes - p.alias_bytes + p.temp_bytes
  assert p.xla_flops > 0
  fpt = 6 * p.num_params + 12 * 32 * 4096 * SEQ
  assert math.isclose(p.model_flops_per_step, fpt * BATCH * SEQ, rel_tol=1e-12)
  assert math.isclose(p.tokens_per_s_per_chip, 0.5 * 275e12 / fpt, rel_tol=1e-12)
  text = plan_lib.format_plan(p)
  assert "params (float32 master)" in text and "tokens/s per chip" in text


def test_parse_mesh():
  assert plan_lib.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1}
  assert plan_lib.parse_mesh("data=2, fsdp=4,tensor=2") == {"data": 2, "fsdp": 4, "tensor": 2}
  with pytest.raises(ValueError, match="--mesh"):
    plan_lib.parse_mesh("model=8")
  with pytest.raises(ValueError, match="--mesh"):
    plan_lib.parse_mesh("fsdp=0")


@pytest.mark.slow
def test_cli_on_quick_recipe():
  """`python -m lcrec_jax.plan` sets its own simulated device count (here 4)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "-m", "lcrec_jax.plan", "--config=configs/ml100k_quick.py",
       "--mesh=data=2,tensor=2", "--seq_len=32", "--peak_flops=1e12"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh (data=2, fsdp=1, tensor=2) = 4 devices" in out.stdout
  assert "peak estimate" in out.stdout and "tokens/s per chip" in out.stdout


@pytest.fixture(scope="module")
def llama7b_decode_plan():
  """The eval stage's beam search of the 7B recipe: bf16 params sharded 8 ways over fsdp,
  8 users x 20 beams, 64-token prompts, a 2,000-item trie (short compile)."""
  config = get_config()
  return config, plan_lib.plan_decode(config, {"fsdp": 8}, prompt_len=SEQ, batch=8,
                                      num_items=2000)


@pytest.mark.slow
def test_llama7b_decode_params_are_sharded_bf16(llama7b_decode_plan):
  config, p = llama7b_decode_plan
  cfg = plan_lib.model_config_for_plan(config)
  n = cfg.num_params()
  norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size  # replicated RMSNorm scales
  assert p.dtype == "bfloat16" and p.num_params == n
  assert p.param_bytes == ((n - norms) // 8 + norms) * 2  # training's shardings, 2 bytes
  assert p.param_bytes_replicated_f32 == 4 * n  # the former float32 replicated handoff
  assert (p.num_beams, p.batch, p.prompt_len, p.num_items) == (20, 8, SEQ, 2000)
  # Arguments: the params plus small inputs (prompt, mask, code ids, the trie tables).
  assert p.param_bytes <= p.argument_bytes < p.param_bytes + (64 << 20)
  assert p.peak_bytes == p.argument_bytes + p.output_bytes + p.temp_bytes
  assert p.peak_bytes < 16 * plan_lib.GIB  # fits a v5e chip
  text = plan_lib.format_decode_plan(p)
  assert "v4-32 (32 GiB/chip): fits" in text and "v5e-16 (16 GiB/chip): fits" in text


@pytest.mark.slow
def test_cli_eval_step_on_quick_recipe():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "-m", "lcrec_jax.plan", "--config=configs/ml100k_quick.py",
       "--step=eval", "--mesh=fsdp=2,tensor=2", "--seq_len=64"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "eval beam search, mesh (data=1, fsdp=2, tensor=2) = 4 devices" in out.stdout
  assert "16 users x 20 beams, prompts of 64 tokens" in out.stdout
  assert "peak estimate" in out.stdout
