"""Beam search parity with PyTorch ``transformers`` ``generate`` on a tiny random LLaMA.

The reference model is an HF ``LlamaForCausalLM`` saved with ``save_pretrained`` and read back
with :mod:`lcrec_jax.llm.safetensors_io`, so both sides run the very same weights.

How HF is made to run exactly our algorithm:

* ``do_sample=False`` and ``top_k=None, top_p=None, temperature=None`` clear any sampling or
  filtering a generation config could carry (the tiny model's is empty, but a real model's
  ``generation_config.json`` may set them; LC-Rec's own decoding was hit by this).
* The model config has ``eos_token_id=None`` (and no pad/bos), so no beam can finish early and
  HF runs exactly ``max_new_tokens`` steps: its returned beams are the top ``num_beams`` of the
  last step, as in our fixed-length search.
* ``length_penalty=0.0`` makes ``sequences_scores`` the plain sum of the generated tokens'
  log-probabilities; ``early_stopping="never"`` is the canonical setting (it does not matter
  without an EOS token).
* HF applies ``prefix_allowed_tokens_fn`` to log-softmax outputs (disallowed tokens -> -inf),
  so constrained scores are full-vocabulary log-probabilities, as in ours.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lcrec_jax.decode.beam_search import constrained_beam_search  # noqa: E402
from lcrec_jax.decode.trie import Trie, build_trie, position_mask  # noqa: E402
from lcrec_jax.decode.unconstrained import beam_search  # noqa: E402
from lcrec_jax.index.item_index import ItemIndex  # noqa: E402
from lcrec_jax.llm import safetensors_io  # noqa: E402
from lcrec_jax.llm.model import Llama  # noqa: E402

BASE_VOCAB, LEVELS, K = 40, 3, 4
VOCAB = BASE_VOCAB + LEVELS * K
PROMPTS = [np.array([5, 9, 3, 17, 22, 30]), np.array([11, 4, 30]), np.array([7, 1, 2, 33, 8])]
GEN_KW = dict(do_sample=False, top_k=None, top_p=None, temperature=None, length_penalty=0.0,
              early_stopping="never", output_scores=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """``(hf_model, our_model, our_params)`` with identical random weights."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      initializer_range=0.2,  # large enough that beam scores are well separated
      bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  path = str(tmp_path_factory.mktemp("tiny_llama"))
  hf.save_pretrained(path)
  params, our_cfg = safetensors_io.load_hf_dir(path, dtype="float32")
  assert our_cfg.eos_token_id is None and our_cfg.vocab_size == VOCAB
  return hf, Llama(our_cfg), params


def _left_pad(prompts):
  length = max(len(p) for p in prompts)
  toks = np.zeros((len(prompts), length), np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for r, p in enumerate(prompts):
    toks[r, length - len(p):], mask[r, length - len(p):] = p, 1
  return jnp.asarray(toks), jnp.asarray(mask)


def _hf_generate(hf, prompt, num_beams, steps, **kw):
  """HF beam search for one prompt: ``(tokens [W, steps], scores [W])``."""
  ids = torch.tensor(prompt[None], dtype=torch.long)
  with torch.no_grad():
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=num_beams,
                      num_return_sequences=num_beams, max_new_tokens=steps, **GEN_KW, **kw)
  toks = out.sequences[:, len(prompt):].numpy()
  assert toks.shape == (num_beams, steps), "HF stopped early: an EOS token got through"
  return toks, out.sequences_scores.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("num_beams,steps", [(4, 5), (3, 1)])
def test_unconstrained_matches_hf_generate(models, num_beams, steps):
  hf, model, params = models
  tok, mask = _left_pad(PROMPTS)  # ours batched with left padding, HF one prompt at a time
  res = beam_search(model, params, tok, mask, num_beams=num_beams, num_steps=steps)
  assert res.sequences.shape == (len(PROMPTS), num_beams, steps)
  for r, p in enumerate(PROMPTS):
    ref_toks, ref_scores = _hf_generate(hf, p, num_beams, steps)
    np.testing.assert_array_equal(np.asarray(res.sequences[r]), ref_toks)
    np.testing.assert_allclose(np.asarray(res.scores[r]), ref_scores, atol=1e-4, rtol=0)


def _trie_table(trie: Trie) -> list[dict[int, dict[int, int]]]:
  """Per level: node -> {code: child}, read out of the jitted ``Trie.allowed``."""
  out, nodes = [], [0]
  for level in range(trie.num_levels):
    allowed, children = trie.allowed(jnp.int32(level), jnp.asarray(nodes, jnp.int32))
    allowed, children = np.asarray(allowed), np.asarray(children)
    table = {n: {int(c): int(children[i, c]) for c in np.flatnonzero(allowed[i])}
             for i, n in enumerate(nodes)}
    out.append(table)
    nodes = sorted({ch for t in table.values() for ch in t.values()})
  return out


def _prefix_fn(prompt_len, code_ids, tables=None, allowed_codes=None):
  """LC-Rec style ``prefix_allowed_tokens_fn``: allowed code tokens given the generated prefix.

  ``tables`` (from :func:`_trie_table`) gives the trie constraint, else ``allowed_codes``
  ``[levels, K]`` gives LC-Rec's position-only one.
  """
  token_to_code = {int(t): c for l in range(LEVELS) for c, t in enumerate(code_ids[l])}

  def fn(batch_id, sent):
    del batch_id
    gen = [token_to_code.get(int(t), -1) for t in sent[prompt_len:].tolist()]
    level = len(gen)
    if tables is None:  # LC-Rec's own mask: any code seen at this position
      return [int(code_ids[level, c]) for c in np.flatnonzero(allowed_codes[level])]
    node = 0
    for l, c in enumerate(gen):
      node = tables[l].get(node, {}).get(c, -1)
      if node < 0:
        return []
    return [int(code_ids[level, c]) for c in sorted(tables[level].get(node, {}))]

  return fn


def _index(num_items=24, seed=3):
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(K)] * LEVELS, indexing="ij"), -1).reshape(-1, LEVELS)
  codes = grid[rng.permutation(len(grid))[:num_items]].astype(np.int32)
  return ItemIndex(tuple(f"i{i}" for i in range(num_items)), codes, (K,) * LEVELS)


@pytest.mark.slow
@pytest.mark.parametrize("mode,layout", [("trie", "dense"), ("trie", "csr"), ("position", None)])
def test_constrained_matches_hf_prefix_allowed_tokens_fn(models, mode, layout):
  hf, model, params = models
  index = _index()
  code_ids = BASE_VOCAB + np.arange(LEVELS * K, dtype=np.int32).reshape(LEVELS, K)
  trie = build_trie(index, layout) if mode == "trie" else None
  allowed = position_mask(index) if mode == "position" else None
  tables = None
  if trie is not None:  # the trie's transitions are exactly the index's code prefixes
    tables, paths = _trie_table(trie), {(): 0}
    for table in tables:
      paths = {pre + (c,): ch for pre, n in paths.items() for c, ch in table.get(n, {}).items()}
    assert paths == {tuple(c): i for i, c in enumerate(index.codes.tolist())}
  num_beams = 6
  tok, mask = _left_pad(PROMPTS)
  res = constrained_beam_search(
      model, params, tok, mask, jnp.asarray(code_ids), trie,
      None if allowed is None else jnp.asarray(allowed), num_beams=num_beams, mode=mode)
  lookup = index.lookup()
  for r, p in enumerate(PROMPTS):
    fn = _prefix_fn(len(p), code_ids, tables, allowed)
    ref_toks, ref_scores = _hf_generate(hf, p, num_beams, LEVELS, prefix_allowed_tokens_fn=fn)
    assert np.all(ref_scores > -1e8), "HF kept a placeholder beam: too few valid items"
    ref_codes = ref_toks - code_ids[:, 0][None, :]      # code tokens -> level-local codes
    np.testing.assert_array_equal(np.asarray(res.codes[r]), ref_codes)
    np.testing.assert_allclose(np.asarray(res.scores[r]), ref_scores, atol=1e-4, rtol=0)
    if mode == "trie":
      ref_items = [lookup[tuple(c)] for c in ref_codes.tolist()]
      np.testing.assert_array_equal(np.asarray(res.items[r]), ref_items)
