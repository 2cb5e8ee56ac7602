"""Time Flax MiniLM embeddings of all MovieLens-100K item texts (1682 items).

  python benchmarks/embed_ml100k.py                 # JAX only
  python benchmarks/embed_ml100k.py --torch         # plus PyTorch transformers, same texts

Prints the cold run (tokenise + compile + embed), warm runs (compiled shapes reused) as
items/s and seconds, and with ``--torch`` the same recipe in PyTorch eager on this CPU
and the max abs difference of the two embedding matrices.
"""

from __future__ import annotations

import csv
import importlib.metadata
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from lcrec_jax.encoders import minilm  # noqa: E402

_TORCH = flags.DEFINE_bool("torch", False, "also time PyTorch transformers (test extra)")
_BATCH = flags.DEFINE_integer("batch_size", 64, "texts per forward pass")
_MAXLEN = flags.DEFINE_integer("max_length", 128, "tokens per text")
_REPEATS = flags.DEFINE_integer("repeats", 3, "warm runs; the best is reported")


def ml100k_texts() -> list[str]:
  """Item texts in item order, from the project loader when present, else read here."""
  try:
    from lcrec_jax.data.loaders import load_dataset
    from lcrec_jax.pipeline import spec
    return load_dataset(spec.section_settings("data", {"format": "movielens", "path": "", "name": "ml-100k"})).item_texts()
  except ImportError:
    pass
  path = str(importlib.metadata.distribution("recbole").locate_file(
      "recbole/dataset_example/ml-100k/ml-100k.item"))
  texts = []
  with open(path, encoding="utf-8", newline="") as f:
    rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    next(rows)
    for _, title, year, genres in rows:
      texts.append(f"{title}. year: {year}. genres: {', '.join(genres.split())}")
  return texts


def torch_embed(model_dir: str, texts: list[str], batch_size: int, max_length: int):
  """sentence-transformers recipe in PyTorch eager: (embeddings, wall s, cpu s)."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import torch
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
  order = np.argsort([-len(t) for t in texts], kind="stable")
  out = np.zeros((len(texts), model.config.hidden_size), np.float32)
  t0, c0 = time.perf_counter(), time.process_time()
  with torch.no_grad():
    for s in range(0, len(texts), batch_size):
      idx = order[s:s + batch_size]
      b = tok([texts[i] for i in idx], padding=True, truncation=True,
              max_length=max_length, return_tensors="pt")
      h = model(**b).last_hidden_state
      m = b["attention_mask"][..., None].float()
      e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
      out[idx] = e.numpy()
  return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv):
  del argv
  texts = ml100k_texts()
  n = len(texts)
  print(f"items: {n}  batch_size: {_BATCH.value}  max_length: {_MAXLEN.value}  "
        f"cpus: {os.cpu_count()}")
  t0 = time.perf_counter()
  enc = minilm.MiniLMEncoder()
  print(f"load weights + tokenizer: {time.perf_counter() - t0:.2f} s")
  ids, _ = enc.tokenize(texts, _MAXLEN.value)
  lens = np.asarray([len(t) for t in ids])
  print(f"tokens per text: mean {lens.mean():.1f}  max {lens.max()}")

  t0, c0 = time.perf_counter(), time.process_time()
  emb = enc.encode(texts, _BATCH.value, _MAXLEN.value)
  cold = time.perf_counter() - t0
  print(f"jax cold (compile + embed): {cold:.2f} s  {n / cold:.0f} items/s  "
        f"(process cpu {time.process_time() - c0:.1f} s)")
  warm, cpu = [], []
  for _ in range(_REPEATS.value):
    t0, c0 = time.perf_counter(), time.process_time()
    again = enc.encode(texts, _BATCH.value, _MAXLEN.value)
    warm.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  best = min(warm)
  print(f"jax warm: best {best:.2f} s of {len(warm)}  {n / best:.0f} items/s  "
        f"(runs: {', '.join(f'{w:.2f}' for w in warm)}; process cpu "
        f"{', '.join(f'{c:.1f}' for c in cpu)} s)")
  print(f"load average (1 min): {os.getloadavg()[0]:.1f}; wall times scale with it")
  print(f"repeat max abs diff: {np.abs(again - emb).max():.2e}")

  if _TORCH.value:
    ref, secs, tcpu = torch_embed(enc.model_dir, texts, _BATCH.value, _MAXLEN.value)
    print(f"torch eager: {secs:.2f} s  {n / secs:.0f} items/s  (process cpu {tcpu:.1f} s)  "
          f"jax warm speed-up: {secs / best:.2f}x")
    print(f"max abs diff jax vs torch: {np.abs(emb - ref).max():.2e}")


if __name__ == "__main__":
  app.run(main)
