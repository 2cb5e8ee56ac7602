"""The eval stage: full-ranking HR/NDCG of the exported model on valid and test.

Loads ``<workdir>/model/`` (written by the train stage), runs
:func:`lcrec_jax.eval.evaluate.evaluate` over the configured seqrec templates and
masks, writes ``<workdir>/eval/results.json`` atomically and prints the table, next to
the baselines of ``<workdir>/baselines/results.json`` when that stage has run.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from lcrec_jax import fs
from lcrec_jax.data.dataset import Dataset
from lcrec_jax.eval import evaluate as evaluate_lib
from lcrec_jax.eval import report
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm import build, safetensors_io
from lcrec_jax.llm.model import Llama
from lcrec_jax.llm.tokenizer import LCRecTokenizer


def _baseline_lines(workdir: str) -> list[str]:
  path = fs.join(workdir, "baselines", "results.json")
  if not fs.exists(path):
    return []
  from lcrec_jax.baselines.stage import summary_lines  # pylint: disable=g-import-not-at-top
  return summary_lines(fs.read_json(path))  # each model under both protocols, named


def run_eval_stage(config: ml_collections.ConfigDict, workdir: str, dataset: Dataset,
                   index: ItemIndex, force: bool = False) -> dict:
  path = evaluate_lib.results_path(workdir)
  if fs.exists(path) and not force:
    logging.info("eval stage: %s exists, skipping (--force=eval to run again)", path)
    results = evaluate_lib.load_results(workdir)
  else:
    model_dir = build.model_dir(workdir)
    if not fs.exists(fs.join(model_dir, "DONE")):
      raise FileNotFoundError(f"{model_dir}/DONE not found: run the train stage first "
                              "(--stages=train)")
    with fs.local_copy(model_dir) as local:  # gs://: downloaded to a temp dir
      params, model_cfg = safetensors_io.load_hf_dir(local)
      tokenizer = LCRecTokenizer.from_dir(local)
    results = evaluate_lib.evaluate(Llama(model_cfg), params, tokenizer, dataset, index,
                                    config.eval, config.tasks)
    evaluate_lib.write_results(results, workdir)  # process 0 only
    fs.barrier("eval_stage_written")
  text = report.format_results(results)
  lines = _baseline_lines(workdir)
  print(text + ("\n" + "\n".join(lines) if lines else ""), flush=True)
  return results
