"""A finished run's test quality under both protocols, next to its baselines.

  python benchmarks/eval_protocols.py --workdir=runs/ml100k
  python benchmarks/eval_protocols.py --workdir=runs/ml100k --num_beams=1682  # exhaustive

Loads the run as ``recommend`` does (the eval stage's params from the checkpoint, on the
recipe's mesh; ``--params=export``: the HF export ``<workdir>/model``), config, dataset and
index, and runs
the eval stage's evaluation (the run's ``eval`` settings: templates, modes, users) twice:
``eval.exclude_seen=False`` (every item ranked: LC-Rec's paper, and RecBole's full-sort
evaluation of sequential models) and ``True`` (each user's seen items banned inside the
constrained beam search). With
``--num_beams`` equal to the catalogue size the beam search ranks every item exactly.
Prints both tables, one line per protocol with the baselines of
``<workdir>/baselines/results.json`` when that stage has run, and writes everything to
``--out`` (default ``<workdir>/eval/protocols.json``); the eval stage's own
``eval/results.json`` is left as it is.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcrec_jax import fs  # noqa: E402
from lcrec_jax.pipeline.stages import baseline as baseline_stage  # noqa: E402
from lcrec_jax.eval import evaluate as ev  # noqa: E402
from lcrec_jax.eval import report  # noqa: E402
from lcrec_jax.recommend import define_params_flag, load_finished_run  # noqa: E402

flags.DEFINE_string("workdir", None, "A finished run directory (lcrec_jax.main).")
define_params_flag(flags.FLAGS)  # --params, as recommend's
_BEAMS = flags.DEFINE_integer("num_beams", 0, "Beams per user; 0 = the run's eval.num_beams.")
_USERS = flags.DEFINE_integer("max_users", -1, "Users evaluated; -1 = the run's eval.max_users.")
_OUT = flags.DEFINE_string("out", "", "Output json; default <workdir>/eval/protocols.json.")


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  if not workdir:
    raise app.UsageError("--workdir is required")
  run = load_finished_run(workdir, flags.FLAGS.params)
  decoder = ev.Decoder(run.model, run.tokenizer, run.index, run.config.tasks.buckets,
                       mesh=run.mesh) if run.mesh is not None else None
  cfg_eval = run.config.eval.to_dict() if hasattr(run.config.eval, "to_dict") else dict(
      run.config.eval)
  if _BEAMS.value:
    cfg_eval["num_beams"] = _BEAMS.value
  if _USERS.value >= 0:
    cfg_eval["max_users"] = _USERS.value
  out = {}
  for exclude in (False, True):
    t0 = time.perf_counter()
    res = ev.evaluate(run.model, run.params, run.tokenizer, run.dataset, run.index,
                      {**cfg_eval, "exclude_seen": exclude}, run.config.tasks,
                      decoder=decoder)
    out[ev.PROTOCOLS[exclude]] = res
    print(report.format_results(res), flush=True)
    print(f"({ev.PROTOCOLS[exclude]}: {time.perf_counter() - t0:.0f} s)", flush=True)
  print("\ntest HR@10 / NDCG@10 by protocol")
  for protocol, baseline_key in (("all_items", "unmasked"), ("seen_excluded", "masked")):
    m = out[protocol]["test"]["mean"]
    print(f"  {protocol:<14} lcrec-jax  {m['HR@10']:.4f} / {m['NDCG@10']:.4f}")
  bpath = baseline_stage.results_path(workdir)
  if fs.exists(bpath):
    print("\n".join(baseline_stage.summary_lines(fs.read_json(bpath))))
  path = _OUT.value or fs.join(workdir, "eval", "protocols.json")
  fs.write_json(path, out, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
