"""Every recipe in configs/ loads by path and its model, tokenizer and loss fields agree.

Cheap checks (no weights, no JAX work) that catch the combinations the train stage would
only reject after building the examples: a pretrained model with a trained tokenizer, a
history loss whose labels do not fit the label slots, an eval mode the evaluator lacks.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.eval.evaluate import MODES, EvalSettings
from lcrec_jax.llm.lora import TARGETS as LORA_TARGETS

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*.py") if not p.name.startswith("_")
                 and p.name != "__init__.py")


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"_recipe_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_every_recipe_is_found():
  names = {p.name for p in RECIPES}
  assert {"ml100k_quick.py", "ml100k_smollm2.py", "lcrec_instruments_llama7b.py"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_fields_agree(path):
  c = _load(path)
  assert c.model.init in ("random", "pretrained")
  assert c.model.tokenizer in ("base", "trained")
  if c.model.tokenizer == "trained":
    assert c.model.init == "random", "a trained tokenizer needs random init"
    assert c.model.tokenizer_vocab >= 258
  history = tuple(c.tasks.history_loss_tasks or ())
  assert set(history) <= set(c.tasks.names)
  slots = int(c.train.max_label_tokens)
  if history and slots > 0:  # the train stage's rule: (max_history + 1) x (levels + 1)
    assert slots >= (c.tasks.max_history + 1) * (c.rqvae.num_levels + 1)
  # LoRA is one flag away (--config.model.lora.rank=16): its targets must be real names
  assert c.model.lora.targets and set(c.model.lora.targets) <= set(LORA_TARGETS)
  st = EvalSettings.from_config(spec.resolve(c).eval)
  assert set(st.modes) <= set(MODES) and st.num_beams >= 10


def test_train_stage_names_a_bad_lora_target_before_any_work(tmp_path):
  """A wrong adapter name fails at once, naming the field and the valid names."""
  from types import SimpleNamespace

  from lcrec_jax.pipeline.stages.train import run_train_stage
  c = _load(CONFIGS / "ml100k_quick.py")
  c.model.lora.rank = 4
  c.model.lora.targets = ("q", "v_proj")
  with pytest.raises(ValueError, match=r"model\.lora\.targets.*\['q'\].*q_proj"):
    run_train_stage(c, str(tmp_path), dataset=None, index=SimpleNamespace(num_levels=4))
  assert not any(tmp_path.iterdir())  # nothing written
