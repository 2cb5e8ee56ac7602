"""Evaluation against brute force: score every item's code with full forwards, rank by hand."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers

from lcrec_jax.pipeline import spec
from lcrec_jax.data.dataset import Dataset, Item
from lcrec_jax.eval import evaluate as ev
from lcrec_jax.eval import report
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm import config as llm_config
from lcrec_jax.llm.model import Llama, init_params
from lcrec_jax.llm.tokenizer import LCRecTokenizer
from lcrec_jax.tasks import batching, prompts
from lcrec_jax.tasks.builders import seqrec_eval_examples

LEVELS, K, NUM_ITEMS, NUM_USERS = 3, 4, 24, 6
TEMPLATES = (0, 3)


def _tokenizer(index: ItemIndex) -> LCRecTokenizer:
  """A real word-level tokenizer over the prompt frame and seqrec template words."""
  text = " ".join([batching.PROMPT_HEAD, batching.PROMPT_TAIL]
                  + [t.instruction for t in prompts.templates("seqrec")])
  pre = tokenizers.pre_tokenizers.Whitespace()
  words = sorted({w for w, _ in pre.pre_tokenize_str(text)})
  vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre
  out = LCRecTokenizer(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                       unk_token="<unk>", add_bos_token=False)
  out.add_code_tokens(index.all_tokens())
  return out


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  grid = np.array(np.meshgrid(*[np.arange(K)] * LEVELS)).reshape(LEVELS, -1).T
  codes = rng.permutation(grid)[:NUM_ITEMS].astype(np.int32)
  items = tuple(Item(f"i{i}", f"Item {i}") for i in range(NUM_ITEMS))
  index = ItemIndex(tuple(it.item_id for it in items), codes, (K,) * LEVELS)
  # Users with 4..9 distinct items: histories of different lengths -> two buckets.
  seqs = tuple(rng.permutation(NUM_ITEMS)[:4 + u].astype(np.int32) for u in range(NUM_USERS))
  dataset = Dataset("tiny", items, tuple(f"u{u}" for u in range(NUM_USERS)), seqs)
  tok = _tokenizer(index)
  cfg = llm_config.tiny(vocab=tok.vocab_size, dtype="float32", param_dtype="float32",
                        scan_layers=True)
  params = init_params(cfg, jax.random.PRNGKey(0))
  params = jax.tree.map(  # sharpen the output distribution: clear gaps between items
      lambda x: x * 3.0 if x.ndim == 2 and x.shape[0] == cfg.vocab_size else x, params)
  tasks = ml_collections.ConfigDict({"buckets": (56, 96), "add_bos": None,
                                     "max_history": 20})
  return dataset, index, tok, Llama(cfg), params, tasks


@functools.partial(jax.jit, static_argnums=0)
def _forward_logp(model, params, seqs):
  logits, _ = model.apply({"params": params}, seqs)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _brute_scores(model, params, prompts, index, tok):
  """``[users, num_items]`` log p(item's code | prompt) from full forwards, no KV cache.

  Every (user, item) sequence is prompt + code, RIGHT-padded to one length: under causal
  attention trailing padding cannot change earlier positions, so no mask is involved.
  """
  ids = tok.item_token_ids(index)                                          # [N, L]
  n_items = index.num_items
  width = 96 + LEVELS  # one shape for every call: the largest bucket + the code
  seqs = np.zeros((NUM_USERS * n_items, width), np.int32)
  for u, p in enumerate(prompts):
    seqs[u * n_items:(u + 1) * n_items, :len(p)] = p
    seqs[u * n_items:(u + 1) * n_items, len(p):len(p) + LEVELS] = ids
  logp = np.asarray(_forward_logp(model, params, jnp.asarray(seqs)), np.float64)
  out = np.zeros((len(prompts), n_items))
  for u, p in enumerate(prompts):
    rows = u * n_items + np.arange(n_items)[:, None]
    out[u] = logp[rows, len(p) - 1 + np.arange(LEVELS)[None], ids].sum(1)
  return out


def _hand_metrics(ranks):
  """HR@1/5/10 and NDCG@5/10 from 0-based ranks (None = not ranked)."""
  out = {}
  for k in (1, 5, 10):
    out[f"HR@{k}"] = float(np.mean([r is not None and r < k for r in ranks]))
  for k in (5, 10):
    out[f"NDCG@{k}"] = float(np.mean([1.0 / np.log2(r + 2) if r is not None and r < k else 0.0
                                      for r in ranks]))
  return out


def _brute_force(dataset, index, tok, model, params, tasks, split, tid, users):
  """Per-template metrics and seen-excluded metrics computed from exhaustive scores."""
  examples = seqrec_eval_examples(dataset, index, split, tid, 20)
  rows = dataset.split().valid if split == "valid" else dataset.split().test
  ranks, ranks_unseen = [], []
  prompts_ = [batching.encode_prompt(tok, examples[u].instruction,
                                     max(tasks.buckets) - LEVELS - 1) for u in users]
  scores = _brute_scores(model, params, prompts_, index, tok)
  for s, u in zip(scores, users):
    ex = examples[u]
    target = ex.meta["target"]
    ranks.append(int((s > s[target]).sum()))
    seen = set(int(i) for i in rows[u].history)
    unseen = np.asarray([i for i in range(NUM_ITEMS) if i not in seen])
    ranks_unseen.append(int((s[unseen] > s[target]).sum()) if target not in seen else None)
  return _hand_metrics(ranks), _hand_metrics(ranks_unseen)


@pytest.fixture(scope="module")
def results(setup, tmp_path_factory):
  dataset, index, tok, model, params, tasks = setup
  cfg_eval = spec.section_settings("eval", {
      "num_beams": NUM_ITEMS, "batch_size": 4, "splits": ("valid", "test"),
      "template_ids": TEMPLATES, "modes": ("trie", "position"), "max_users": 0,
      "shard": False})  # the sharded path: test_sharded_decoder_equals_one_device
  res = ev.evaluate(model, params, tok, dataset, index, cfg_eval, tasks, progress=False)
  workdir = str(tmp_path_factory.mktemp("run"))
  path = ev.write_results(res, os.path.join(workdir, "eval", "results.json"))
  return res, workdir, path


def test_prompt_lengths_use_several_buckets(setup):
  dataset, index, tok, model, _, tasks = setup
  dec = ev.Decoder(model, tok, index, tasks.buckets)
  lengths = [len(ev.eval_prompt_ids(tok, ex.instruction, tasks, LEVELS))
             for ex in seqrec_eval_examples(dataset, index, "test", 0, 20)]
  assert len({dec.bucket_of(n) for n in lengths}) >= 2, lengths
  # Eval prompts are exactly the prompt part of a training sequence.
  ex = seqrec_eval_examples(dataset, index, "test", 0, 20)[0]
  data = batching.tokenize_examples([ex], tok, tasks.buckets)
  np.testing.assert_array_equal(ev.eval_prompt_ids(tok, ex.instruction, tasks, LEVELS),
                                data.prompts[0])


def test_metrics_equal_brute_force(setup, results):
  dataset, index, tok, model, params, tasks = setup
  res = results[0]
  users = range(NUM_USERS)
  for split in ("valid", "test"):
    per_t = []
    for tid in TEMPLATES:
      want, want_unseen = _brute_force(dataset, index, tok, model, params, tasks, split, tid,
                                       users)
      got = res[split]["per_template"][str(tid)]
      for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), (split, tid, key)
      got_unseen = res[split]["seen_excluded"]["per_template"][str(tid)]
      for key, value in want_unseen.items():
        assert got_unseen[key] == pytest.approx(value, abs=1e-12), (split, tid, key)
      per_t.append(want)
    for key in per_t[0]:
      vals = [m[key] for m in per_t]
      assert res[split]["mean"][key] == pytest.approx(np.mean(vals), abs=1e-12)
      assert res[split]["min"][key] == pytest.approx(np.min(vals), abs=1e-12)
      assert res[split]["max"][key] == pytest.approx(np.max(vals), abs=1e-12)
      assert res[split]["min"][key] <= res[split]["mean"][key] <= res[split]["max"][key]


def test_valid_beam_shares(results):
  res = results[0]
  for split in ("valid", "test"):
    assert res[split]["valid_beam_share"]["trie"] == 1.0
    # 24 beams over 4^3 = 64 per-position codes of which only 24 are items.
    assert 0.0 < res[split]["valid_beam_share"]["position"] < 1.0
    assert res[split]["mode"] == "trie"
    assert res[split]["modes"]["trie"]["mean"] == res[split]["mean"]
    assert set(res[split]["modes"]["position"]["per_template"]) == {str(t) for t in TEMPLATES}


def test_results_json_written_and_loadable(results):
  res, workdir, path = results
  assert path == os.path.join(workdir, "eval", "results.json")
  loaded = ev.load_results(path)
  assert loaded["test"]["mean"]["NDCG@10"] == pytest.approx(res["test"]["mean"]["NDCG@10"])
  assert loaded["settings"]["num_beams_used"] == NUM_ITEMS
  assert not [n for n in os.listdir(os.path.dirname(path)) if ".tmp" in n]
  json.dumps(loaded)
  table = report.format_results(loaded)
  assert "NDCG@10" in table and "template 3" in table and "all items ranked" in table
  assert "seen dropped after search" in table
  assert loaded["test"]["protocol"] == loaded["settings"]["protocol"] == "all_items"


def test_exclude_seen_bans_history_inside_the_search(setup, results):
  """eval.exclude_seen: with every beam, exactly the brute-force ranking of each user's
  unseen items; with 10 beams, 10 unseen items per user (dropping seen items after the
  search leaves fewer)."""
  dataset, index, tok, model, params, tasks = setup
  cfg_eval = spec.section_settings("eval", {
      "num_beams": NUM_ITEMS, "batch_size": 4, "splits": ("test",), "template_ids": (0,),
      "modes": ("trie",), "shard": False, "exclude_seen": True})
  res = ev.evaluate(model, params, tok, dataset, index, cfg_eval, tasks, progress=False)
  assert res["test"]["protocol"] == res["settings"]["protocol"] == "seen_excluded"
  assert "seen_excluded" not in res["test"]  # no post-hoc figure under this protocol
  _, want = _brute_force(dataset, index, tok, model, params, tasks, "test", 0,
                         range(NUM_USERS))
  for key, value in want.items():
    assert res["test"]["mean"][key] == pytest.approx(value, abs=1e-12), key
  assert "seen items excluded" in report.format_results(res)

  prompts_ = [ev.eval_prompt_ids(tok, ex.instruction, tasks, LEVELS)
              for ex in seqrec_eval_examples(dataset, index, "test", 0, 20)]
  seen = [e.history for e in dataset.split().test]
  dec = ev.Decoder(model, tok, index, tasks.buckets)
  plain, _ = dec.rank(params, prompts_, num_beams=10, mode="trie", batch_size=4)
  banned, _ = dec.rank(params, prompts_, num_beams=10, mode="trie", batch_size=4,
                       exclude=seen)
  after = ev.exclude_seen(plain, seen)
  for r in range(NUM_USERS):
    assert (banned[r] >= 0).all() and not set(banned[r].tolist()) & set(seen[r].tolist())
  assert (after < 0).sum() > 0  # some users lost beams to seen items
  # position mask: seen items dropped after the search, none left in the beams
  pos, _ = dec.rank(params, prompts_, num_beams=10, mode="position", batch_size=4,
                    exclude=seen)
  for r in range(NUM_USERS):
    assert not set(pos[r].tolist()) & set(seen[r].tolist())


def test_quick_metrics_on_a_user_sample(setup):
  dataset, index, tok, model, params, tasks = setup
  cfg_eval = spec.section_settings("eval", num_beams=NUM_ITEMS, batch_size=4)
  got = ev.quick_metrics(model, params, tok, dataset, index, cfg_eval, tasks, max_users=3)
  users = ev.sample_users(NUM_USERS, 3)
  assert len(users) == 3 and len(set(users.tolist())) == 3
  want, _ = _brute_force(dataset, index, tok, model, params, tasks, "valid", 0, users)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-12)
  assert got["valid_beam_share"] == 1.0


def test_config_errors(setup):
  with pytest.raises(ValueError, match="eval.num_beams"):
    ev.EvalSettings.from_config(spec.section_settings("eval", {"num_beams": 5}))
  with pytest.raises(ValueError, match="eval.modes"):
    ev.EvalSettings.from_config(spec.section_settings("eval", {"modes": ("greedy",)}))
  with pytest.raises(ValueError, match="eval.exclude_seen"):
    ev.EvalSettings.from_config(dataclasses.replace(spec.section_settings("eval"),
                                                     exclude_seen="yes"))
  with pytest.raises(ValueError, match="eval.template_ids"):
    ev.EvalSettings.from_config(spec.section_settings("eval", {"template_ids": (99,)}))
  assert ev.EvalSettings.from_config(spec.section_settings("eval", {"template_ids": None})).template_ids == tuple(range(10))


def test_sharded_decoder_equals_one_device(setup):
  """Users split over the 8-device `data` axis decode exactly as on one device."""
  dataset, index, tok, model, params, tasks = setup
  prompts = [ev.eval_prompt_ids(tok, ex.instruction, tasks, LEVELS)
             for ex in seqrec_eval_examples(dataset, index, "test", 0, 20)]
  mesh = ev.data_mesh()
  assert mesh.shape["data"] == 8
  one = ev.Decoder(model, tok, index, tasks.buckets)
  many = ev.Decoder(model, tok, index, tasks.buckets, mesh=mesh)
  a_items, a_scores = one.rank(params, prompts, num_beams=8, mode="trie", batch_size=8)
  b_items, b_scores = many.rank(params, prompts, num_beams=8, mode="trie", batch_size=8)
  np.testing.assert_array_equal(a_items, b_items)
  np.testing.assert_allclose(a_scores, b_scores, rtol=1e-5, atol=1e-5)
  rows = many._batch(np.arange(8 * 16, dtype=np.int32).reshape(8, 16))
  assert len(rows.sharding.device_set) == 8
  assert {s.data.shape for s in rows.addressable_shards} == {(1, 16)}
  with pytest.raises(ValueError, match="single axis"):
    ev.Decoder(model, tok, index, tasks.buckets,
               mesh=jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("a", "b")))
