"""Export round trip: ours (LoRA + extended vocabulary) -> HF dir -> PyTorch, logits <= 1e-4."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lcrec_jax.llm import export, lora as lora_lib, model as model_lib, safetensors_io  # noqa
from lcrec_jax.llm.config import tiny  # noqa: E402


def _word_tokenizer(words):
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return tok


@pytest.mark.slow
@pytest.mark.parametrize("tied,scan", [(False, True), (True, False)])
def test_export_round_trip(tmp_path, tied, scan):
  v0, extra = 40, 8
  cfg = tiny(vocab=v0, initializer_range=0.1, tie_word_embeddings=tied, scan_layers=scan,
             rope_theta=500000.0)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  # Extend the vocabulary by `extra` rows (as the item-code tokens do).
  rng = np.random.default_rng(0)
  emb = np.asarray(params["embed_tokens"]["embedding"])
  params["embed_tokens"]["embedding"] = jnp.asarray(np.concatenate(
      [emb, emb.mean(0) + 0.1 * rng.standard_normal((extra, emb.shape[1]), np.float32)]))
  if not tied:
    head = np.asarray(params["lm_head"]["kernel"])
    params["lm_head"]["kernel"] = jnp.asarray(np.concatenate(
        [head, 0.1 * rng.standard_normal((head.shape[0], extra), np.float32)], 1))
  cfg_big = cfg.replace(vocab_size=v0 + extra)
  lo = lora_lib.init_lora(jax.random.PRNGKey(1), params, cfg_big, rank=2, alpha=4.0,
                          targets=("q_proj", "o_proj", "up_proj"))
  lo = jax.tree.map(lambda x: x + 0.1, lo)  # non-zero B

  words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(v0 + extra - 3)]
  out = str(tmp_path / "export")
  files = export.export_hf(out, params, cfg, lora=lo, tokenizer=_word_tokenizer(words),
                           eos_token_id=2, pad_token_id=0)
  assert os.path.isfile(os.path.join(out, "tokenizer.json")) and files

  toks = rng.integers(0, v0 + extra, (2, 9)).astype(np.int32)
  toks[:, -1] = v0 + 3  # a new-row token
  mask = np.ones_like(toks)
  mask[1, :3] = 0  # left padding
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  m = model_lib.Llama(cfg_big)
  ours = np.asarray(jax.jit(lambda p, x, k, l: m.apply({"params": p}, x, attention_mask=k,
                                                        lora=l)[0])(params, toks, mask, lo))

  hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert hf.config.vocab_size == v0 + extra and hf.config.tie_word_embeddings == tied
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(toks, dtype=torch.long),
             attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
  real = mask.astype(bool)
  err = np.abs(ours[real] - ref[real]).max()
  assert err <= 1e-4, err
  # ...and back into ours: identical weights to the merged params.
  back, cfg2 = safetensors_io.load_hf_dir(out, scan_layers=scan)
  assert cfg2.vocab_size == v0 + extra and cfg2.eos_token_id == 2
  merged = jax.jit(lora_lib.merge)(params, lo)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               merged, back)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.convert_tokens_to_ids("w5") == 8


@pytest.mark.slow
def test_bf16_export_loads(tmp_path):
  cfg = tiny(vocab=32)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  out = str(tmp_path / "bf16")
  export.export_hf(out, params, cfg, dtype="bfloat16")
  hf = transformers.LlamaForCausalLM.from_pretrained(out)
  assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
  w = hf.model.layers[0].mlp.down_proj.weight.detach().float().numpy()
  np.testing.assert_allclose(w, np.asarray(params["layers_0"]["mlp"]["down_proj"]["kernel"]).T,
                             rtol=1e-2, atol=1e-3)


def test_nonfinite_params_are_not_exported(tmp_path):
  """A diverged model (an inf LoRA adapter, NaN after merging) is refused; nothing is written."""
  from lcrec_jax.runtime.finite import NonFiniteError
  cfg = tiny(vocab=40, scan_layers=False)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  adapters = lora_lib.init_lora(jax.random.PRNGKey(1), params, cfg, rank=2, alpha=4.0,
                                targets=("q_proj",))
  adapters = jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), adapters)
  out = tmp_path / "model"
  with pytest.raises(NonFiniteError, match=r"export to .*model: params: layers_0/.*q_proj/"
                                           r"kernel holds \d+ NaN/inf values"):
    export.export_hf(str(out), params, cfg, lora=adapters)
  assert not out.exists()
