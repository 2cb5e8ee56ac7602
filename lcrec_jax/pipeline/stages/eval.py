"""The eval stage: full-ranking HR/NDCG of the trained model on valid and test.

Restores the trained parameters from the train stage's last checkpoint
(``<workdir>/train/checkpoints``, :mod:`lcrec_jax.eval.restore`), or when the rl stage
finished its policy (``<workdir>/rl/checkpoints``; ``results["settings"]["policy"]`` says
which: ``"sft"`` | ``"rl"``), onto the configured
``('data', 'fsdp', 'tensor')`` mesh, sharded by the same logical-axis rules as training,
with LoRA adapters merged on the devices and floating params in ``train.compute_dtype``;
the model and tokenizer are rebuilt from the recipe exactly as training built them
(a trained tokenizer from ``<workdir>/train/tokenizer/``). The beam search then decodes
with the sharded params, each batch of users split over ``data`` x ``fsdp``
(:class:`lcrec_jax.eval.evaluate.Decoder`). The HF export ``<workdir>/model/`` is an
output for other tools (``recommend --params=export``); it is not read here (its ``DONE`` marks the
train stage as finished). Runs :func:`lcrec_jax.eval.evaluate.evaluate` over the
configured seqrec templates and masks, writes ``<workdir>/eval/results.json`` atomically
and prints the table, next to the baselines of ``<workdir>/baselines/results.json`` when
that stage has run.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging

from lcrec_jax import fs
from lcrec_jax.pipeline import workdir as workdir_lib
from lcrec_jax.data.dataset import Dataset
from lcrec_jax.eval import evaluate as evaluate_lib
from lcrec_jax.eval import report
from lcrec_jax.errors import WorkdirError
from lcrec_jax.pipeline import stage as stage_lib
from lcrec_jax.pipeline.stage import as_settings
from lcrec_jax.pipeline.stages.baseline import summary_lines
from lcrec_jax.eval import restore as restore_lib
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm import build
from lcrec_jax.llm.model import Llama
from lcrec_jax.llm.tokenizer import LCRecTokenizer
from lcrec_jax.train import mesh as mesh_lib
from lcrec_jax.runtime.finite import check_finite


def _baseline_lines(workdir: str) -> list[str]:
  path = workdir_lib.Layout(workdir).baseline_results
  if not fs.exists(path):
    return []
  return summary_lines(fs.read_json(path))  # each model under both protocols, named


def params_mesh(params) -> jax.sharding.Mesh:
  """The mesh the (restored) params live on."""
  return jax.tree.leaves(params)[0].sharding.mesh


def policy_source(workdir: str) -> str:
  """Which params eval evaluates: ``"rl"`` when the rl stage finished, else ``"train"``."""
  return "rl" if workdir_lib.rl_finished(workdir) else "train"


def load_trained(config: ml_collections.ConfigDict, workdir: str, index: ItemIndex, *,
                 source: str | None = None, compute_dtype: str | None = None
                 ) -> tuple[Llama, dict, LCRecTokenizer]:
  """``(model, params, tokenizer)`` of the finished train stage, params sharded on a mesh.

  ``source``: ``"train"`` (the SFT checkpoint), ``"rl"`` (the rl stage's policy, trained
  whole: every weight from ``<workdir>/rl/checkpoints``, a LoRA SFT model's adapters
  merged into it), or None (:func:`policy_source`). ``compute_dtype``: the params' dtype
  (default ``train.compute_dtype``; the rl stage takes float32 master copies).

  The model, the tokenizer and the frozen part of the params (a LoRA base) are built
  from the recipe as the train stage built them (a randomly initialised model that was
  trained whole is only shaped, never drawn on the host); the trained part comes from the newest
  checkpoint under ``<workdir>/train/checkpoints``. The mesh is ``config.mesh`` over every
  device, with the rules of ``config.mesh.axis_rules``.
  """
  from lcrec_jax.pipeline.stages.train import trained_tree  # pylint: disable=g-import-not-at-top
  config = as_settings(config)
  layout = workdir_lib.Layout(workdir)
  source = policy_source(workdir) if source is None else source
  dtype = config.train.compute_dtype if compute_dtype is None else compute_dtype
  # every weight comes from the checkpoint: a full fine-tune, or the RL policy
  full = config.model.lora.rank <= 0 or source == "rl"
  model, base, tokenizer = build.build_model(
      config.model, index, config.seed, tokenizer_dir=layout.tokenizer_dir,
      abstract=full)
  tree, mask = (base, None) if source == "rl" else trained_tree(config, base, model.config)
  mesh = mesh_lib.make_mesh(config.mesh)
  ckpt_dir = layout.rl_checkpoints if source == "rl" else layout.train_checkpoints
  params, step = restore_lib.restore_trained_params(
      ckpt_dir, model, tree, mask, mesh, mesh_lib.axis_rules(config.mesh),
      compute_dtype=dtype)
  check_finite(params, f"{ckpt_dir} (step {step}): params")  # a diverged model is not evaluated
  logging.info("params of step %d restored from %s onto mesh %s (%s)", step,
               ckpt_dir, dict(mesh.shape), dtype)
  return model, params, tokenizer


def run_eval_stage(config: ml_collections.ConfigDict, workdir: str, dataset: Dataset,
                   index: ItemIndex, force: bool = False) -> dict:
  config = as_settings(config)
  layout = workdir_lib.Layout(workdir)
  path = layout.results
  if stage_lib.finished("eval", path, force):
    results = evaluate_lib.load_results(path)
  else:
    if not fs.exists(layout.model_done):
      raise WorkdirError(f"{layout.model_done} not found: the train stage has not finished",
                         hint="run it first: --stages=train,eval")
    model, params, tokenizer = load_trained(config, workdir, index)
    results = evaluate_lib.evaluate(model, params, tokenizer, dataset, index, config.eval,
                                    config.tasks, decoder=evaluate_lib.Decoder(
                                        model, tokenizer, index, config.tasks.buckets,
                                        mesh=params_mesh(params)))
    # the run's seeds, so that lcrec_jax/pipeline/quality_table.py can average over runs
    results["seed"] = {"seed": int(config.seed), "train_seed": int(config.train.seed)}
    results["settings"]["policy"] = "rl" if policy_source(workdir) == "rl" else "sft"
    evaluate_lib.write_results(results, path)  # process 0 only
    fs.barrier("eval_stage_written")
  text = report.format_results(results)
  lines = _baseline_lines(workdir)
  print(text + ("\n" + "\n".join(lines) if lines else ""), flush=True)
  return results


def run(ctx, force: bool) -> dict:
  """The stage (:class:`lcrec_jax.pipeline.stage.Stage`)."""
  return run_eval_stage(ctx.settings, ctx.workdir, ctx.dataset, ctx.index, force=force)
