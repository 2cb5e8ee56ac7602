"""The run spec (lcrec_jax/pipeline/spec.py): defaults in one place, every bad value caught before work.

Each rule is checked on the quick recipe with one field broken, and the error must name
that field. The command-line checks run `lcrec_jax.main` (in this process, tests/entry.py) and
require it to fail in seconds (before any stage) with the field in the message.
"""

from __future__ import annotations

import importlib.util
import pathlib
import time

import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.errors import ConfigError
from tests import entry

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py"
                 and not p.name.startswith("_"))


def _load(path):
  s = importlib.util.spec_from_file_location(f"_spec_recipe_{path.stem}", path)
  module = importlib.util.module_from_spec(s)
  s.loader.exec_module(module)
  return module.get_config()


def _quick():
  return _load(ROOT / "configs" / "ml100k_quick.py")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_passes_the_spec(path):
  c = spec.validate(_load(path), num_devices=16, stages=())
  assert set(spec.flatten(c)) == set(spec.BY_NAME)  # resolved: every key present


def test_recipe_values_survive_resolution():
  raw = _quick()
  c = spec.resolve(raw)
  assert c.train.lr == raw.train.lr == 2e-3 and c.train.num_steps == 4500
  assert tuple(c.eval.template_ids) == (0, 1)
  # a key the recipe leaves out gets the one declared default
  del raw.eval["seed"]
  assert spec.resolve(raw).eval.seed == spec.BY_NAME["eval.seed"].default


def test_default_train_config_is_the_spec_section():
  t = spec.section("train")
  assert set(t.keys()) == {k.name.split(".", 1)[1] for k in spec.KEYS
                           if k.name.startswith("train.")}
  assert t.lr == spec.BY_NAME["train.lr"].default


def _broken(field: str, value):
  c = _quick()
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  return c


@pytest.mark.parametrize("field,value,words", [
    ("eval.num_beams", 5, "K=10"),
    ("train.batch_size", -8, ">"),
    ("eval.shard", "yes", "expected bool"),  # a key the recipe leaves to the default
    ("rqvae.schedule", "cosine", "not one of"),
    ("eval.modes", ("trie", "beam"), "'beam'"),
    ("model.lora.targets", ("q_proj", "qkv"), "'qkv'"),
    ("rqvae.sk_epsilons", (0.0, 0.003), "one value per level"),
    ("tasks.sample_nums", (1, 2), "one value per task"),
    ("tasks.buckets", (256, 128), "increasing"),
    ("train.max_label_tokens", 32, "history loss"),
    ("train.warmup_ratio", 1.5, "[0.0, 1.0)"),
    ("mesh.fsdp", 0, "> 0 or -1"),
    ("model.overrides", {"hiden": 64}, "hiden"),
    ("data.path", "/no/such/dir", "no such file"),
    ("embed.encoder", "npy", "embed.npy_path"),
])
def test_bad_value_names_its_field(field, value, words):
  with pytest.raises(ConfigError) as e:
    spec.validate(_broken(field, value), num_devices=8)
  msg = str(e.value)
  assert (field.split(".")[0] if field == "embed.encoder" else field) in msg
  assert words in msg, msg


def test_batch_must_split_over_the_mesh():
  c = _broken("train.batch_size", 12)
  spec.validate(c, num_devices=4)  # 12 = 3 x 4
  with pytest.raises(ConfigError, match=r"train.batch_size=12: .* data\*fsdp \(8 of 8"):
    spec.validate(c, num_devices=8)
  c = _broken("train.grad_accum_steps", 3)  # 16 % (3 x 1)
  with pytest.raises(ConfigError, match="grad_accum_steps"):
    spec.validate(c, num_devices=1)


def test_unknown_key_is_named_with_the_closest_one():
  c = _quick()
  c.train.warmup_step = 5
  with pytest.raises(ConfigError, match=r"train.warmup_step .*did you mean train.warmup_steps"):
    spec.validate(c)
  c = _quick()
  c.tasks.eval_template_ids = (0,)  # what _lcrec_paper.py used to set; nothing reads it
  with pytest.raises(ConfigError, match=r"tasks.eval_template_ids .* eval.template_ids"):
    spec.validate(c)


def test_paths_checked_only_for_stages_that_read_them(tmp_path):
  c = _broken("model.hf_dir", str(tmp_path / "missing"))
  spec.validate(c, stages=("index",))
  with pytest.raises(ConfigError, match="model.hf_dir"):
    spec.validate(c, stages=("index", "train"))


def _main(tmp_path, *args, recipe="configs/ml100k_quick.py"):
  """`python -m lcrec_jax.main` in this process (tests/entry.py): the check is main's, the
  process boundary is tested once in test_cli.py."""
  t0 = time.perf_counter()
  proc = entry.run("main", f"--config={recipe}", f"--workdir={tmp_path / 'run'}", *args,
                   cwd=str(ROOT))
  return proc, time.perf_counter() - t0


@pytest.mark.parametrize("flag,field", [
    ("--config.eval.num_beams=5", "eval.num_beams"),
    ("--config.train.batch_size=-4", "train.batch_size"),
    ("--config.train.lrr=0.1", "lrr"),
    ("--force=index", "--force"),  # a forced stage must be among --stages
])
def test_main_fails_in_seconds_naming_the_flag(tmp_path, flag, field):
  args = [flag] + (["--stages=train"] if flag.startswith("--force") else [])
  proc, seconds = _main(tmp_path, *args)
  assert proc.returncode == 2
  assert field in proc.stderr, proc.stderr[-2000:]
  assert seconds < 60  # the check only: no dataset, no stage
  assert not (tmp_path / "run" / "index").exists()


def test_main_rejects_a_recipe_key_nothing_reads(tmp_path):
  recipe = tmp_path / "recipe.py"
  recipe.write_text(
      "from lcrec_jax.recipes import sibling\n"
      f"quick = sibling({str(ROOT / 'configs' / 'x.py')!r}, 'ml100k_quick.py')\n"
      "def get_config():\n"
      "  c = quick.get_config()\n"
      "  c.tasks.eval_template_ids = (0,)\n"
      "  return c\n")
  proc, seconds = _main(tmp_path, recipe=str(recipe))
  assert proc.returncode == 2 and seconds < 60
  assert "tasks.eval_template_ids" in proc.stderr, proc.stderr[-2000:]


def test_main_refuses_a_workdir_it_cannot_create(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  t0 = time.perf_counter()
  proc = entry.run("main", "--config=configs/ml100k_quick.py", f"--workdir={blocker / 'run'}",
                   cwd=str(ROOT))
  assert proc.returncode == 2 and time.perf_counter() - t0 < 60
  assert proc.stderr.startswith("main: error: --workdir=") and "cannot create" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_file_formats_need_a_directory_and_a_stem(tmp_path):
  c = _broken("data.format", "lcrec")
  c.data.path = ""
  with pytest.raises(ConfigError, match="data.path"):
    spec.validate(c, stages=("index",))
  c.data.path, c.data.name = str(tmp_path), ""
  with pytest.raises(ConfigError, match="data.name"):
    spec.validate(c, stages=("index",))


def test_baseline_config_defaults_are_the_specs():
  """SASRecConfig / GRU4RecConfig keep defaults for direct library use (RecBole's settings);
  they must be the spec's, so a library caller trains what a run trains."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from lcrec_jax.baselines import gru4rec, sasrec  # pylint: disable=g-import-not-at-top
  for name, cls in (("sasrec", sasrec.SASRecConfig), ("gru4rec", gru4rec.GRU4RecConfig)):
    section = spec.section("baseline")[name]
    for f in dataclasses.fields(cls):
      assert f.default == section[f.name], (name, f.name, f.default, section[f.name])
    assert {f.name for f in dataclasses.fields(cls)} == set(section.keys())
