"""The train stage: LC-Rec alignment tuning on the index stage's codes.

Reads ``<workdir>/index/`` (the conflict-free codes), builds the task examples, the
tokenizer with the code tokens (the model's own, or for ``model.tokenizer = "trained"`` a
BPE learned from those examples and kept in ``<workdir>/train/tokenizer/``) and the model
(``lcrec_jax.llm.build``), tokenizes the examples once and writes them as array_record
under ``<workdir>/train/examples/`` (``lcrec_jax.tasks.example_records``; reused on
resume), reads static-shape batches from them with grain
(``lcrec_jax.tasks.grain_batches``; with ``tasks.history_loss_tasks`` the history codes
are labels too), and runs the sharded, resumable trainer
(``lcrec_jax.train.trainer``: checkpoints under ``<workdir>/train/``). At the end the
model (LoRA merged) is exported as an HF directory ``<workdir>/model/`` with the
tokenizer, then ``<workdir>/model/DONE`` is written. With ``DONE`` present the stage is
skipped unless forced; an interrupted stage resumes from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import ml_collections
from jax.experimental import multihost_utils
from absl import logging

from lcrec_jax import fs
from lcrec_jax.pipeline import workdir as workdir_lib
from lcrec_jax.data.dataset import Dataset
from lcrec_jax.eval import evaluate as evaluate_lib
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm import build, export
from lcrec_jax.llm import lora as lora_lib
from lcrec_jax.pipeline import stage as stage_lib
from lcrec_jax.pipeline.stage import as_settings
from lcrec_jax.tasks import batching, builders, example_records, grain_batches, text_budget
from lcrec_jax.train import trainer


def _examples(config: ml_collections.ConfigDict, dataset: Dataset, index: ItemIndex):
  tc = config.tasks
  return builders.build_train_examples(
      dataset, index, tc.names, sample_nums=tc.sample_nums,
      prompt_sample_nums=tc.prompt_sample_nums, seed=config.seed, max_history=tc.max_history,
      preference_from=tc.preference_from,
      text_budget=text_budget.TextBudget(**dataclasses.asdict(tc.text_budget)),
      show_progress=True, seqrec_windows=bool(tc.seqrec_windows))


def _corpus(examples) -> list[str]:
  """Texts a trained tokenizer learns from: every framed prompt and its response."""
  return [batching.format_prompt(ex.instruction) + ex.response for ex in examples]


def _valid_examples(config: ml_collections.ConfigDict, dataset: Dataset, index: ItemIndex):
  """Seqrec validation examples of a fixed user sample, for the validation loss."""
  ex = builders.seqrec_eval_examples(dataset, index, "valid", 0, config.tasks.max_history)
  n = int(config.train.valid_users)
  return ex[:n] if n > 0 else ex


def _write_examples(workdir: str, tokenized: dict[str, batching.TokenizedExamples]) -> str:
  """Writes the tokenized examples once as array_record (reused when unchanged, e.g. on
  resume); returns the prepared dataset directory every process reads with grain."""
  t = time.perf_counter()
  local = workdir_lib.Layout(workdir).examples_dir(jax.process_index())
  if fs.is_remote(workdir) or fs.is_primary():  # remote: a local copy per process
    data_dir = example_records.write_examples(tokenized, local).data_dir
  else:
    data_dir = example_records.LcrecExamples(tokenized, data_dir=local).data_dir
  if not fs.is_remote(workdir):
    fs.barrier("train_examples_written")
  logging.info("tasks: tokenized examples in %s (%.1fs to write or reuse)", data_dir,
               time.perf_counter() - t)
  return data_dir


def trained_tree(config: ml_collections.ConfigDict, params, cfg):
  """``(tree, mask)`` training starts from: the params, or with ``model.lora.rank > 0``
  ``LoraTree(params=params, lora=adapters)`` and its trainable mask (else None).

  The eval stage rebuilds the same tree to restore the checkpoint's trainable part.
  """
  config = as_settings(config)
  lc = config.model.lora
  if lc.rank <= 0:
    return params, None
  adapters = lora_lib.init_lora(jax.random.PRNGKey(config.seed + 1), params, cfg,
                                rank=lc.rank, alpha=lc.alpha, targets=tuple(lc.targets))
  tree = lora_lib.LoraTree(params=params, lora=adapters)
  return tree, lora_lib.trainable_mask(tree, train_embeddings_rows=lc.train_embeddings)


def run_train_stage(config: ml_collections.ConfigDict, workdir: str, dataset: Dataset,
                    index: ItemIndex, force: bool = False) -> str:
  """Fine-tunes the LLM; returns the exported model directory.

  Args:
    config: whole run config (``seed``, ``model``, ``tasks``, ``train``, ``mesh``).
    workdir: run directory (reads ``index/``, writes ``train/`` and ``model/``).
    dataset: the dataset the index was built for.
    index: its conflict-free item index.
    force: run even when ``model/DONE`` exists (training resumes from checkpoints; delete
      ``<workdir>/train`` to start over).
  """
  config = as_settings(config)
  layout = workdir_lib.Layout(workdir)
  out_dir, done = layout.model_dir, layout.model_done
  if stage_lib.finished("train", done, force):
    return out_dir
  mc = config.model
  history_tasks = tuple(config.tasks.history_loss_tasks or ())
  need = (config.tasks.max_history + 1) * (index.num_levels + 1)
  slots = int(config.train.max_label_tokens)
  if history_tasks and 0 < slots < need:
    raise ValueError(f"train.max_label_tokens={slots} cannot hold the labels of the history "
                     f"loss (tasks.history_loss_tasks={history_tasks}): up to {need} per "
                     "example; raise it or set 0 (every position)")
  lc = mc.lora
  if lc.rank > 0:
    lora_lib.check_targets(lc.targets, name="model.lora.targets")  # before any work
  t0 = time.perf_counter()
  examples = _examples(config, dataset, index)
  model, params, tokenizer = build.build_model(
      mc, index, config.seed, corpus=lambda: _corpus(examples),
      tokenizer_dir=layout.tokenizer_dir)
  cfg = model.config
  source = (f"random {mc.preset}" if mc.init == "random"
            else f"pretrained {mc.hf_dir or mc.gguf_path or 'SmolLM2-135M'}")
  logging.info("model: %s, %.1fM params, vocab %d (incl. %d code tokens, %s tokenizer)",
               source, cfg.num_params() / 1e6, cfg.vocab_size, len(index.all_tokens()),
               mc.tokenizer)

  batcher, valid = _batchers(config, workdir, dataset, index, examples, tokenizer, t0)
  seed = config.seed
  pi, pc = jax.process_index(), jax.process_count()
  train_params, mask = trained_tree(config, params, cfg)
  tail = None
  is_lora = isinstance(train_params, lora_lib.LoraTree)
  callbacks = [evaluate_lib.validation_hook(
      model, tokenizer, dataset, index, config.eval, config.tasks,
      params_fn=(lambda s: s.params.params) if is_lora else (lambda s: s.params),
      lora_fn=(lambda s: s.params.lora) if is_lora else None)]
  result = trainer.train(
      config, layout.train_dir, model, train_params,
      lambda epoch, start: batcher.batches(seed, epoch, start, pi, pc),
      batcher.steps_per_epoch, trainable_mask=mask,
      eval_batches=lambda: valid.batches(seed, 0, 0, pi, pc), eval_callbacks=callbacks,
      tx_tail=tail, packed=batcher.packed is not None)
  if result.stopped_early:
    logging.warning("train stage: stopped early at step %d (preemption); rerun to resume",
                    result.step)
    raise SystemExit(1)

  _export(result, layout, cfg, tokenizer)
  return out_dir


def _batchers(config, workdir: str, dataset: Dataset, index: ItemIndex, examples, tokenizer,
              t0: float) -> tuple[grain_batches.GrainBatcher, grain_batches.GrainBatcher]:
  """Tokenizes the training and validation examples once (array_record under
  ``train/examples/``) and returns their grain batchers ``(train, validation)``; with
  ``tasks.history_loss_tasks`` the history codes are labels too."""
  history_tasks = tuple(config.tasks.history_loss_tasks or ())
  code_ids = tokenizer.code_token_ids(index).ravel() if history_tasks else None
  tokenized = {
      "train": batching.tokenize_examples(examples, tokenizer, config.tasks.buckets,
                                          add_bos=config.tasks.add_bos, show_progress=True),
      "validation": batching.tokenize_examples(_valid_examples(config, dataset, index),
                                               tokenizer, config.tasks.buckets,
                                               add_bos=config.tasks.add_bos)}
  records = _write_examples(workdir, tokenized)
  pack = int(config.tasks.pack_length)
  batcher = grain_batches.GrainBatcher(records, "train", batch_size=config.train.batch_size,
                                       prompt_label_ids=code_ids,
                                       prompt_label_tasks=history_tasks,
                                       pack_length=pack, seed=config.seed,
                                       pack_rows=str(config.tasks.pack_rows))
  valid = grain_batches.GrainBatcher(records, "validation",
                                     batch_size=config.train.batch_size)
  logging.info("tasks: %d training examples, %d steps per epoch (%.1fs to build)",
               len(examples), batcher.steps_per_epoch, time.perf_counter() - t0)
  if batcher.packed is not None:
    logging.info("tasks: packed into %d rows of <= %d tokens (%.2f examples per row)",
                 len(batcher.packed), pack, len(examples) / max(len(batcher.packed), 1))
  return batcher, valid


def _export(result, layout, cfg, tokenizer) -> None:
  """The HF export ``model/`` (LoRA merged) and ``model/DONE``.

  An output for other tools (eval restores the checkpoint). The params may be sharded
  over several hosts (fsdp): every process joins the gather, process 0 writes whole
  tensors.
  """
  final = multihost_utils.process_allgather(result.state.params, tiled=True)
  lora_params = None
  if isinstance(final, lora_lib.LoraTree):
    final, lora_params = final.params, final.lora
  if fs.is_primary():  # one writer for the shared workdir (local or gs://)
    export.export_hf(layout.model_dir, final, cfg, lora=lora_params, tokenizer=tokenizer)
    fs.write_text(layout.model_done, f"step {result.step}\n")
  fs.barrier("train_stage_exported")  # the eval stage reads model/ on every process
  logging.info("train stage: model exported to %s", layout.model_dir)


def run(ctx, force: bool) -> str:
  """The stage (:class:`lcrec_jax.pipeline.stage.Stage`)."""
  return run_train_stage(ctx.settings, ctx.workdir, ctx.dataset, ctx.index, force=force)
