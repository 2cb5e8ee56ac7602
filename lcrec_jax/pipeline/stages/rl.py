"""The rl stage: GRPO after SFT, between train and eval (``--stages=index,train,rl,eval``).

Restores the SFT model from the train stage's newest checkpoint (float32 master copies,
LoRA adapters merged, sharded on the training mesh by the same logical-axis rules:
:func:`lcrec_jax.pipeline.stages.eval.load_trained`); that model is both the policy's start and
the frozen reference. Builds the prompts from the training prefixes
(:func:`lcrec_jax.rl.rollout.training_prompts`), decodes rollouts with the evaluation's
:class:`~lcrec_jax.eval.evaluate.Decoder` on that mesh, and runs
:func:`lcrec_jax.rl.trainer.train_rl` with the validation HR/NDCG hook of the train stage
(``eval.quick_users`` users, every ``rl.eval_every`` steps and at the end). Writes under
``<workdir>/rl/``: ``checkpoints/``, ``metrics.jsonl``, ``tb/``, ``summary.json`` (means
of reward, KL, zero-advantage share, hit rate, the time split, the stage's seconds) and
``DONE``. With ``rl.reward_collab > 0`` the SASRec of ``rl.collab_sasrec`` is read first
(before the SFT model) and scores each beam's item (:mod:`lcrec_jax.rl.collab`). An
interrupted stage resumes from its newest checkpoint; once ``DONE`` exists
the eval stage evaluates this policy instead of the SFT model.
"""

from __future__ import annotations

import time

import ml_collections
from absl import logging

from lcrec_jax import fs
from lcrec_jax.pipeline import workdir as workdir_lib
from lcrec_jax.data.dataset import Dataset
from lcrec_jax.errors import WorkdirError
from lcrec_jax.pipeline import stage as stage_lib
from lcrec_jax.pipeline.stage import as_settings
from lcrec_jax.eval import evaluate as evaluate_lib
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.rl import collab as collab_lib
from lcrec_jax.rl import rollout as rollout_lib
from lcrec_jax.rl import trainer as rl_trainer


def run_rl_stage(config: ml_collections.ConfigDict, workdir: str, dataset: Dataset,
                 index: ItemIndex, force: bool = False) -> str:
  """Runs (or resumes) the rl stage; returns ``<workdir>/rl``."""
  from lcrec_jax.pipeline.stages import eval as eval_stage  # pylint: disable=g-import-not-at-top
  config = as_settings(config)
  layout = workdir_lib.Layout(workdir)
  out_dir, done = layout.rl_dir, layout.rl_done
  if stage_lib.finished("rl", done, force):
    return out_dir
  if not fs.exists(layout.model_done):
    raise WorkdirError(f"{layout.model_done} not found: the train stage has not "
                       "finished", hint="run it first: --stages=train,rl")
  t0 = time.perf_counter()
  sasrec = (collab_lib.load_sasrec(config.rl.collab_sasrec, dataset.num_items)
            if config.rl.reward_collab > 0 else None)
  model, sft, tokenizer = eval_stage.load_trained(config, workdir, index, source="train",
                                                  compute_dtype="float32")
  mesh = eval_stage.params_mesh(sft)
  decoder = evaluate_lib.Decoder(model, tokenizer, index, config.tasks.buckets, mesh=mesh)
  prompts = rollout_lib.training_prompts(dataset, index, tokenizer, config.tasks,
                                         seed=config.seed,
                                         prefixes_per_user=config.rl.prefixes_per_user)
  logging.info("rl stage: %d training-prefix prompts, %d steps of %d prompts x %d beams",
               len(prompts), config.rl.num_steps, config.rl.prompts_per_step,
               config.rl.num_generations)
  hook = evaluate_lib.validation_hook(model, tokenizer, dataset, index, config.eval,
                                      config.tasks)
  extra = {"collab": collab_lib.SASRecReward(*sasrec, prompts.seen)} if sasrec else None
  result = rl_trainer.train_rl(config, out_dir, model, sft, decoder, prompts, mesh=mesh,
                               eval_callbacks=[hook], extra_rewards=extra)
  if result.stopped_early:
    logging.warning("rl stage: stopped early at step %d (preemption); rerun to resume",
                    result.step)
    raise SystemExit(1)
  summary = {**rl_trainer.summarize(result.history), "step": result.step,
             "resumed_from": result.resumed_from, "seconds": time.perf_counter() - t0,
             "num_prompts": len(prompts), "evals": result.evals}
  if fs.is_primary():
    fs.write_json(layout.rl_summary, summary, indent=2)
    fs.write_text(done, f"step {result.step}\n")
  fs.barrier("rl_stage_done")
  logging.info("rl stage: %d steps in %.0fs: %s", result.step, summary["seconds"],
               {k: round(v, 4) for k, v in summary.items() if isinstance(v, float)})
  return out_dir


def run(ctx, force: bool) -> str:
  """The stage (:class:`lcrec_jax.pipeline.stage.Stage`)."""
  return run_rl_stage(ctx.settings, ctx.workdir, ctx.dataset, ctx.index, force=force)
