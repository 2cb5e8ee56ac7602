"""The pipeline's stages and their one registry (pipeline order).

Each module here is one stage's ``run(ctx, force)`` (and the helpers only that stage
uses): ``index`` (item embeddings -> RQ-VAE -> conflict-free codes), ``train`` (LC-Rec
alignment tuning, HF export), ``rl`` (GRPO after SFT), ``eval`` (full-ranking HR/NDCG),
``baseline`` (popularity, SASRec, GRU4Rec). To add a stage: a module with ``run``, one
:class:`~lcrec_jax.pipeline.stage.Stage` entry below, and its outputs in
:class:`~lcrec_jax.pipeline.workdir.Layout` (ARCHITECTURE.md, "Adding a stage").
"""

from __future__ import annotations

from lcrec_jax.pipeline.stage import Stage

_M = "lcrec_jax.pipeline.stages"

REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("index", upstream=(), reads=("seed", "data.", "embed.", "rqvae.", "index."),
          dir="index", done="DONE", state_dirs=("index",),
          output_patterns=("index/index.json", "index/report.json", "index/DONE"),
          impl=f"{_M}.index:run", resumes="resumes from its checkpoints"),
    Stage("train", upstream=("index",),
          reads=("seed", "data.", "tasks.", "model.", "train."),
          dir="model", done="DONE", state_dirs=("train", "model"),
          output_patterns=("model/", "train/tokenizer/", "train/checkpoints/{latest}/"),
          impl=f"{_M}.train:run", resumes="resumes from its checkpoints"),
    Stage("rl", upstream=("index", "train"),
          reads=("seed", "data.", "tasks.max_history", "tasks.buckets", "tasks.add_bos",
                 "model.", "train.compute_dtype", "train.b1", "train.b2", "train.eps", "rl."),
          dir="rl", done="DONE", state_dirs=("rl",), output_patterns=("rl/DONE", "rl/summary.json"),
          impl=f"{_M}.rl:run", resumes="resumes from its checkpoints"),
    Stage("eval", upstream=("index", "train", "rl"), optional_upstream=("rl",),
          reads=("data.", "tasks.max_history", "tasks.buckets", "tasks.add_bos", "eval."),
          dir="eval", done="results.json", state_dirs=("eval",),
          output_patterns=("eval/results.json",), impl=f"{_M}.eval:run"),
    Stage("baseline", upstream=(), reads=("seed", "data.", "baseline."),
          dir="baselines", done="DONE", state_dirs=("baselines",), output_patterns=("baselines/",),
          impl=f"{_M}.baseline:run"),
)}
NAMES: tuple[str, ...] = tuple(REGISTRY)  # pipeline order
