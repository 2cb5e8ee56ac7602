"""The whole pipeline at a chosen scale, stage by stage: wall time, CPU time, peak RSS.

  # LC-Rec Instruments' size (synthetic LC-Rec json), the quick model at a fixed step count
  python benchmarks/scale_pipeline.py --out=runs/scale --users=24772 --items=9922 \\
      --interactions=206153 --text_chars=760
  # MovieLens-100K through the same stages and overrides, for the per-size comparison
  python benchmarks/scale_pipeline.py --out=runs/scale_ml --dataset=ml100k

Stages, each a subprocess measured with ``os.wait4`` (its own and its children's
``ru_utime + ru_stime`` and ``ru_maxrss``):

* ``generate``: ``python -m lcrec_jax.data.synthetic`` (synthetic data only);
* ``embed``: the item embeddings into the run's cache (``--embed=minilm``: MiniLM at
  ``--embed_max_length`` tokens, the index stage then hits the cache; ``--embed=bow``: a
  cheap hashed bag-of-words projection written as ``.npy`` and read with
  ``embed.encoder=npy``, for a quick look at the other stages);
* ``index``, ``train``, ``eval``, ``baseline``: ``python -m lcrec_jax.main --stages=X``.

Every stage uses ``configs/ml100k_quick.py`` plus the overrides written into
``OUT/recipe.py`` (data source, ``--train_steps``, ``--rqvae_epochs``, evaluation of every
user on ``--eval_splits`` with template 0, and ``--override`` extras). Results go to
``OUT/scale.json`` and ``OUT/scale.md`` (a markdown table), also printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STAGES = ("generate", "embed", "index", "train", "eval", "baseline")

_OUT = flags.DEFINE_string("out", None, "directory for the data, the run and the results")
_DATASET = flags.DEFINE_enum("dataset", "synthetic", ["synthetic", "ml100k"], "data source")
_USERS = flags.DEFINE_integer("users", 24772, "synthetic users")
_ITEMS = flags.DEFINE_integer("items", 9922, "synthetic items")
_INTER = flags.DEFINE_integer("interactions", 206153, "synthetic interactions")
_CHARS = flags.DEFINE_integer("text_chars", 760, "synthetic mean title + description chars")
_SEED = flags.DEFINE_integer("seed", 0, "synthetic data seed")
_EMBED = flags.DEFINE_enum("embed", "minilm", ["minilm", "bow"], "item embeddings")
_EMBED_LEN = flags.DEFINE_integer("embed_max_length", 128, "MiniLM tokens per item text")
_STEPS = flags.DEFINE_integer("train_steps", 1200, "LLM training steps (train.num_steps)")
_RQ_EPOCHS = flags.DEFINE_integer("rqvae_epochs", 300, "RQ-VAE epochs (rqvae.epochs)")
_SPLITS = flags.DEFINE_list("eval_splits", ["test"], "eval.splits")
_STAGES = flags.DEFINE_list("stages", list(STAGES), "stages to run, in pipeline order")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "extra config assignments for OUT/recipe.py, e.g. "
    "'c.baseline.sasrec.epochs = 20'")
_TIMEOUT = flags.DEFINE_integer("stage_timeout_s", 4 * 3600, "kill a stage after this long")


def _recipe(out: str, data_dir: str, npy_path: str) -> str:
  """Writes ``OUT/recipe.py``: the quick recipe plus this benchmark's overrides."""
  lines = [
      '"""Written by benchmarks/scale_pipeline.py: the quick recipe at a fixed budget."""',
      "from lcrec_jax.recipes import sibling", "",
      "def get_config():",
      f"  c = sibling({os.path.join(REPO, 'configs', 'x.py')!r}, 'ml100k_quick.py').get_config()",
  ]
  if _DATASET.value == "synthetic":
    lines += ["  c.data.format = 'lcrec'", f"  c.data.path = {data_dir!r}",
              "  c.data.name = 'Synth'"]
  if npy_path:
    lines += ["  c.embed.encoder = 'npy'", f"  c.embed.npy_path = {npy_path!r}"]
  lines += [f"  c.embed.max_length = {_EMBED_LEN.value}",
            f"  c.train.num_steps = {_STEPS.value}",
            f"  c.rqvae.epochs = {_RQ_EPOCHS.value}",
            f"  c.eval.splits = {tuple(_SPLITS.value)!r}",
            "  c.eval.template_ids = (0,)",
            "  c.eval.max_users = 0"]
  lines += [f"  {o}" for o in _OVERRIDES.value]
  lines += ["  return c", ""]
  path = os.path.join(out, "recipe.py")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


_EMBED_CODE = """
import sys
from lcrec_jax.recipes import sibling
from lcrec_jax.data.loaders import load_dataset
from lcrec_jax.encoders.item_embeddings import item_embeddings
from absl import logging
logging.set_verbosity(logging.INFO)
c = sibling(sys.argv[1], "recipe.py").get_config()
texts = load_dataset(c.data).item_texts()
if sys.argv[3]:  # bag of words: each word a fixed random direction, summed, normalised
  import numpy as np, zlib
  out = np.zeros((len(texts), 384), np.float32)
  vec = {}
  for i, t in enumerate(texts):
    for w in t.lower().split():
      if w not in vec:
        vec[w] = np.random.default_rng(zlib.crc32(w.encode())).standard_normal(384)
      out[i] += vec[w]
  out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-9
  np.save(sys.argv[3], out)
else:
  item_embeddings(c.embed, texts, cache_dir=sys.argv[2])
"""


def _measure(name: str, cmd: list[str], log_path: str) -> dict:
  """Runs ``cmd``; returns wall s, CPU s (user + sys) and peak RSS MiB of it and its children."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  print(f"[scale] {name}: {' '.join(cmd)}", flush=True)
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = t0 + _TIMEOUT.value
    while True:
      pid, status, ru = os.wait4(p.pid, os.WNOHANG)
      if pid:
        break
      if time.perf_counter() > deadline:
        p.kill()
      time.sleep(0.5)
  wall = time.perf_counter() - t0
  rc = os.waitstatus_to_exitcode(status)
  row = {"stage": name, "wall_s": round(wall, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
         "peak_rss_mib": round(ru.ru_maxrss / 1024, 0), "rc": rc, "log": log_path}
  print(f"[scale] {name}: {row}", flush=True)
  if rc != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise SystemExit(f"stage {name} failed (exit {rc}); log {log_path}:\n{tail}")
  return row


def _table(rows: list[dict], meta: dict) -> str:
  out = [f"{meta['dataset']}: {meta['users']} users, {meta['items']} items, "
         f"{meta['interactions']} interactions; load avg before {meta['loadavg_before']}", "",
         "| stage | wall | CPU time | peak RSS |", "|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['stage']} | {r['wall_s']:.0f} s | {r['cpu_s']:.0f} s | "
               f"{r['peak_rss_mib']:.0f} MiB |")
  total_w = sum(r["wall_s"] for r in rows)
  total_c = sum(r["cpu_s"] for r in rows)
  peak = max(r["peak_rss_mib"] for r in rows)
  out.append(f"| **total** | **{total_w:.0f} s** | **{total_c:.0f} s** | **{peak:.0f} MiB** |")
  return "\n".join(out) + "\n"


def main(argv):
  del argv
  if not _OUT.value:
    raise app.UsageError("--out is required")
  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  data_dir, workdir = os.path.join(out, "data"), os.path.join(out, "run")
  npy = os.path.join(out, "item_emb_bow.npy") if _EMBED.value == "bow" else ""
  recipe = _recipe(out, data_dir, npy)
  unknown = sorted(set(_STAGES.value) - set(STAGES))
  if unknown:
    raise app.UsageError(f"--stages: unknown {unknown}; known {STAGES}")
  py = sys.executable
  cmds = {
      "generate": [py, "-m", "lcrec_jax.data.synthetic", f"--out={data_dir}", "--name=Synth",
                   f"--users={_USERS.value}", f"--items={_ITEMS.value}",
                   f"--interactions={_INTER.value}", f"--text_chars={_CHARS.value}",
                   f"--seed={_SEED.value}"],
      "embed": [py, "-c", _EMBED_CODE, recipe, os.path.join(workdir, "cache"), npy],
  }
  for s in ("index", "train", "eval", "baseline"):
    cmds[s] = [py, "-m", "lcrec_jax.main", f"--config={recipe}", f"--workdir={workdir}",
               f"--stages={s}"]
  rows = []
  meta = {"dataset": _DATASET.value, "loadavg_before": os.getloadavg()[0],
          "recipe": recipe, "argv": sys.argv}
  for s in STAGES:
    if s not in _STAGES.value or (s == "generate" and _DATASET.value != "synthetic"):
      continue
    rows.append(_measure(s, cmds[s], os.path.join(out, f"{s}.log")))
    meta.setdefault("loadavg_during", []).append(round(os.getloadavg()[0], 1))
  from lcrec_jax.recipes import sibling
  from lcrec_jax.data.loaders import load_dataset
  ds = load_dataset(sibling(recipe, "recipe.py").get_config().data)
  meta.update(users=ds.num_users, items=ds.num_items, interactions=ds.num_interactions)
  for name, rel in (("eval", "eval/results.json"), ("baseline", "baselines/results.json")):
    path = os.path.join(workdir, rel)
    if os.path.isfile(path):
      with open(path) as f:
        meta[f"{name}_results"] = json.load(f)
  with open(os.path.join(out, "scale.json"), "w") as f:
    json.dump({"meta": meta, "stages": rows}, f, indent=1)
  table = _table(rows, meta)
  with open(os.path.join(out, "scale.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
