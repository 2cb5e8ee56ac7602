"""Readable tables of evaluation results (see :mod:`lcrec_jax.eval.evaluate` for the layout).

One block per split::

  test (943 users, all items ranked, mask trie, 20 beams)   HR@1 ...   NDCG@10
    template 0                           0.0100  0.0400  0.0700  0.0250  0.0350
    ...
    mean                                 ...
    min / max                            ...
    position mask mean                   ...
    mean, seen dropped after search      ...   (all items protocol only)
    valid beams: trie 1.000, position 0.812
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from absl import logging

COLUMNS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
PROTOCOL_NAMES = {"all_items": "all items ranked", "seen_excluded": "seen items excluded"}
_LABEL_WIDTH = 40


def _row(label: str, metrics: Mapping[str, float]) -> str:
  cells = "".join(f"{metrics.get(c, float('nan')):>9.4f}" for c in COLUMNS)
  return f"  {label:<{_LABEL_WIDTH - 2}}{cells}"


def format_split(name: str, res: Mapping[str, Any], num_beams: int | None = None) -> str:
  """The table of one split's results."""
  beams = f", {num_beams} beams" if num_beams else ""
  protocol = PROTOCOL_NAMES.get(res.get("protocol", "all_items"), res.get("protocol"))
  head = (f"{name} ({res.get('num_users', '?')} users, {protocol}, "
          f"mask {res.get('mode', '?')}{beams})")
  lines = [f"{head}\n{'':<{_LABEL_WIDTH}}" + "".join(f"{c:>9}" for c in COLUMNS)]
  for t, m in res.get("per_template", {}).items():
    lines.append(_row(f"template {t}", m))
  for agg in ("mean", "min", "max"):
    if agg in res:
      lines.append(_row(agg, res[agg]))
  for mode, mres in res.get("modes", {}).items():
    if mode != res.get("mode") and "mean" in mres:
      lines.append(_row(f"{mode} mask mean", mres["mean"]))
  if "seen_excluded" in res:
    lines.append(_row("mean, seen dropped after search", res["seen_excluded"]["mean"]))
  shares = res.get("valid_beam_share", {})
  if shares:
    lines.append("  valid beams: " + ", ".join(f"{m} {s:.3f}" for m, s in shares.items()))
  return "\n".join(lines)


def format_results(results: Mapping[str, Any]) -> str:
  """Tables of every split in ``results``."""
  settings = results.get("settings", {})
  beams = settings.get("num_beams_used", settings.get("num_beams"))
  blocks = [format_split(k, v, beams) for k, v in results.items()
            if isinstance(v, Mapping) and "mean" in v]
  tail = f"evaluated in {results['seconds']:.1f}s" if "seconds" in results else ""
  return "\n\n".join(blocks + ([tail] if tail else []))


def log_results(results: Mapping[str, Any], print_fn: Callable[[str], Any] | None = None
                ) -> str:
  """Logs the tables with absl (``print_fn``, e.g. ``print``, instead if given); returns them."""
  text = format_results(results)
  if print_fn is None:
    for line in text.splitlines():
      logging.info("%s", line)
  else:
    print_fn(text)
  return text
