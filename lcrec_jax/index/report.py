"""The index stage's report: ``report.json`` (code statistics) and ``codes.png`` (plots).

Collision rates are LC-Rec's: ``(num_items - number of distinct codes) / num_items``.
Utilization of a level is the fraction of its codes used by at least one item
(``codes_used`` the count); perplexity is ``exp`` of the entropy of the level's code usage
(``K`` when all ``K`` codes are used equally, 1 when one code takes every item).
``distinct_prefixes[l]`` counts the distinct code prefixes of length ``l + 1`` (the nodes
at depth ``l + 1`` of the decoding trie; the last one is ``num_items`` once conflict-free).
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from lcrec_jax import fs
from lcrec_jax.index import assign
from lcrec_jax.index.item_index import ItemIndex


def level_usage(codes: np.ndarray, level_sizes: Sequence[int]) -> dict[str, list]:
  """Per-level code usage of ``codes [N, L]``.

  Returns:
    ``{"utilization": [L], "codes_used": [L], "perplexity": [L],
    "max_items_per_level_code": [L], "distinct_prefixes": [L]}``.
  """
  codes = np.asarray(codes)
  util, used, ppl, mx, prefixes = [], [], [], [], []
  for l, k in enumerate(level_sizes):
    counts = np.bincount(codes[:, l], minlength=int(k)).astype(np.float64)
    used.append(int(np.count_nonzero(counts)))
    util.append(float(used[-1]) / int(k))
    prefixes.append(int(np.unique(codes[:, :l + 1], axis=0).shape[0]) if len(codes) else 0)
    p = counts[counts > 0] / counts.sum()
    ppl.append(float(np.exp(-np.sum(p * np.log(p)))))
    mx.append(int(counts.max()))
  return {"utilization": util, "codes_used": used, "perplexity": ppl,
          "max_items_per_level_code": mx, "distinct_prefixes": prefixes}


def report_json(index: ItemIndex, *, codes_before: np.ndarray, sizes_before: Sequence[int],
                collision_rate_before: float, collision_rate_after_repair: float,
                collision_rate_after: float, colliding_items_before: int,
                max_items_per_code: int, max_items_per_code_argmax: int,
                reconstruction_mse: float | None, repair: Mapping[str, Any],
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The one ``report.json`` layout (trained, k-means and provided indices alike).

  Args:
    index: the final, conflict-free index (``utilization``, ``codes_used``, ... of it).
    codes_before: ``[N, L]`` codes before the uniqueness step (the ``*_argmax`` fields),
      with ``sizes_before`` codes per level.
    collision_rate_before, collision_rate_after_repair, collision_rate_after,
      colliding_items_before, max_items_per_code, max_items_per_code_argmax: the
      assignment's statistics.
    reconstruction_mse: mean squared reconstruction error, None without an RQ-VAE.
    repair: what the repair / uniqueness step did.
    extra: more fields, appended (e.g. the training summary, the source file).
  """
  final = level_usage(index.codes, index.level_sizes)
  before = level_usage(codes_before, sizes_before)
  report = {
      "num_items": index.num_items,
      "num_levels": index.num_levels,
      "level_sizes": list(index.level_sizes),
      "collision_rate_definition": "(num_items - distinct codes) / num_items (LC-Rec)",
      "collision_rate_before": collision_rate_before,
      "collision_rate_after_repair": collision_rate_after_repair,
      "collision_rate_after": collision_rate_after,
      "colliding_items_before": colliding_items_before,
      "utilization": final["utilization"],
      "codes_used": final["codes_used"],
      "perplexity": final["perplexity"],
      "max_items_per_level_code": final["max_items_per_level_code"],
      "distinct_prefixes": final["distinct_prefixes"],
      "utilization_argmax": before["utilization"],
      "codes_used_argmax": before["codes_used"],
      "perplexity_argmax": before["perplexity"],
      "max_items_per_code": max_items_per_code,
      "max_items_per_code_argmax": max_items_per_code_argmax,
      "reconstruction_mse": reconstruction_mse,
      "repair": dict(repair),
  }
  if extra:
    report.update(dict(extra))
  return report


def build_report(index: ItemIndex, stats: assign.AssignStats, encoded: assign.EncodedItems,
                 *, codebook_size: int, extra: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
  """``report.json`` of an assigned (RQ-VAE or k-means) index: :func:`report_json` of
  the assignment's ``stats`` and its argmax pass ``encoded`` (codes before repair,
  reconstruction errors) over levels of ``codebook_size`` codes."""
  return report_json(
      index, codes_before=encoded.codes,
      sizes_before=[codebook_size] * encoded.codes.shape[1],
      collision_rate_before=stats.collision_rate_before,
      collision_rate_after_repair=stats.collision_rate_after_repair,
      collision_rate_after=stats.collision_rate_after,
      colliding_items_before=stats.colliding_items_before,
      max_items_per_code=stats.max_items_per_code_after_repair,
      max_items_per_code_argmax=stats.max_items_per_code_before,
      reconstruction_mse=float(np.mean(encoded.recon_sq_err)), repair=stats.to_dict(),
      extra=extra)


def write_json_atomic(path: str, obj: Any) -> None:
  """``json.dump`` to a temp file in the same directory, then rename over ``path``.

  Goes through :mod:`lcrec_jax.fs` (local or ``gs://``); only process 0 writes.
  """
  fs.write_json(path, obj, indent=2)


def plot_codes(path: str, history: Sequence[Mapping[str, Any]], codes: np.ndarray,
               level_sizes: Sequence[int]) -> None:
  """Writes ``codes.png``: training curves and per-level code-usage histograms.

  Args:
    path: output PNG (written atomically, local or ``gs://``, by process 0 only).
    history: per-epoch rows (``epoch``, ``loss``, ``recon_mse``, ``quant_loss`` and
      optionally ``collision_rate``), e.g. the trainer's ``metrics.jsonl``.
    codes: ``[N, L]`` final codes.
    level_sizes: codes per level.
  """
  num_levels = len(level_sizes)
  fig = Figure(figsize=(max(8.0, 3.2 * num_levels), 7.0), dpi=100)
  FigureCanvasAgg(fig)
  grid = fig.add_gridspec(2, num_levels)
  ax = fig.add_subplot(grid[0, :])
  epochs = [r["epoch"] for r in history]
  for key in ("loss", "recon_mse", "quant_loss"):
    vals = [r.get(key) for r in history]
    if epochs and all(v is not None and v > 0 for v in vals):
      ax.plot(epochs, vals, label=key)
  if epochs:
    ax.set_yscale("log")
  ax.set_xlabel("epoch")
  ax.set_ylabel("loss")
  ax.set_title("RQ-VAE training")
  evals = [(r["epoch"], r["collision_rate"]) for r in history
           if r.get("collision_rate") is not None]
  if evals:
    ax2 = ax.twinx()
    ax2.plot(*zip(*evals), "o--", color="black", label="collision rate (argmax)")
    ax2.set_ylabel("collision rate")
    ax2.legend(loc="upper center")
  ax.legend(loc="upper right")
  codes = np.asarray(codes)
  for l, k in enumerate(level_sizes):
    a = fig.add_subplot(grid[1, l])
    counts = np.bincount(codes[:, l], minlength=int(k))
    a.bar(np.arange(int(k)), counts, width=1.0)
    used = int(np.count_nonzero(counts))
    a.set_title(f"level {chr(ord('a') + l)}: {used}/{int(k)} used")
    a.set_xlabel("code")
    if l == 0:
      a.set_ylabel("items")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  fs.write_bytes(path, buf.getvalue())
