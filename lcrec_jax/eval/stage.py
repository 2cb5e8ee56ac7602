"""The eval stage: full-ranking HR/NDCG of the exported model on valid and test.

Loads ``<workdir>/model/`` (written by the train stage), runs
:func:`lcrec_jax.eval.evaluate.evaluate` over the configured seqrec templates and
masks, writes ``<workdir>/eval/results.json`` atomically and prints the table, next to
the baselines of ``<workdir>/baselines/results.json`` when that stage has run.
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import logging

from lcrec_jax.data.dataset import Dataset
from lcrec_jax.eval import evaluate as evaluate_lib
from lcrec_jax.eval import report
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm import build, safetensors_io
from lcrec_jax.llm.model import Llama
from lcrec_jax.llm.tokenizer import LCRecTokenizer


def _baseline_lines(workdir: str) -> list[str]:
  path = os.path.join(workdir, "baselines", "results.json")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    b = json.load(f)
  rows = [("popularity", b["popularity"]["unmasked"]["test"])]
  if "sasrec" in b:
    rows.append(("SASRec", b["sasrec"]["test"]))
  return [f"baseline {name:<12} test HR@10 {m['HR@10']:.4f}  NDCG@10 {m['NDCG@10']:.4f}"
          for name, m in rows]


def run_eval_stage(config: ml_collections.ConfigDict, workdir: str, dataset: Dataset,
                   index: ItemIndex, force: bool = False) -> dict:
  path = evaluate_lib.results_path(workdir)
  if os.path.exists(path) and not force:
    logging.info("eval stage: %s exists, skipping (--force=eval to run again)", path)
    results = evaluate_lib.load_results(workdir)
  else:
    model_dir = build.model_dir(workdir)
    if not os.path.exists(os.path.join(model_dir, "DONE")):
      raise FileNotFoundError(f"{model_dir}/DONE not found: run the train stage first "
                              "(--stages=train)")
    params, model_cfg = safetensors_io.load_hf_dir(model_dir)
    tokenizer = LCRecTokenizer.from_dir(model_dir)
    results = evaluate_lib.evaluate(Llama(model_cfg), params, tokenizer, dataset, index,
                                    config.eval, config.tasks)
    evaluate_lib.write_results(results, workdir)
  text = report.format_results(results)
  lines = _baseline_lines(workdir)
  print(text + ("\n" + "\n".join(lines) if lines else ""), flush=True)
  return results
