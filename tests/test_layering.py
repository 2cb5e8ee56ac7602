"""The package layering (ARCHITECTURE.md), checked over every import in ``lcrec_jax/``.

An AST walk (lazy imports inside functions included) maps each module to the top-level
unit it belongs to (a package such as ``train``, or a root module such as ``fs``) and each
import to the unit it names; a unit may import only itself and units of lower ranks. The
library (every rank below ``pipeline``) never imports ``pipeline``; entry modules (``main``,
``recommend``, ...) sit on top.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lcrec_jax")

# rank -> units; a unit imports only units of a lower rank (and itself).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("fs", "progress", "interrupt", "log_filters", "cpu_flags", "recipes"),
    ("lock", "cli"),
    ("runtime",),                       # generic training runtime: loop, checkpoint, ...
    ("data",),
    ("index", "encoders"),
    ("llm", "tasks"),
    ("decode",),
    ("train",),
    ("eval",),
    ("baselines",),
    ("rl",),
    ("pipeline",),
    ("recommend", "generate", "plan", "main"),
    ("serve",),
)
RANK = {u: r for r, units in enumerate(LAYERS) for u in units}
PIPELINE = RANK["pipeline"]


def _unit(module: str) -> str:
  """``lcrec_jax.train.step`` -> ``train``; ``lcrec_jax.fs`` -> ``fs``."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _is_module(base: str, dotted: str) -> bool:
  rel = os.path.join(base, *dotted.split("."))
  return os.path.isfile(rel + ".py") or os.path.isdir(rel)


def imports(root: str = ROOT) -> list[tuple[str, str, int]]:
  """``(module, imported lcrec_jax module, line)`` for every import under ``root``."""
  out = []
  base = os.path.dirname(root)
  for dirpath, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(dirpath, name)
      mod = os.path.relpath(path, base)[:-3].replace(os.sep, ".").removesuffix(".__init__")
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          out += [(mod, a.name, node.lineno) for a in node.names
                  if a.name.startswith("lcrec_jax")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (
            node.module or "").startswith("lcrec_jax"):
          for a in node.names:  # `from lcrec_jax import fs` names the module fs
            sub = f"{node.module}.{a.name}"
            out.append((mod, sub if _is_module(base, sub) else node.module, node.lineno))
  return out


def violations(root: str = ROOT) -> list[str]:
  bad = []
  for mod, target, line in imports(root):
    src, dst = _unit(mod), _unit(target)
    if not dst or src == dst:
      continue
    if src not in RANK or dst not in RANK:
      bad.append(f"{mod}:{line} imports {target}: unit {src if src not in RANK else dst!r} "
                 "has no layer (add it to LAYERS)")
    elif RANK[dst] >= RANK[src]:
      why = ("the library imports the pipeline" if dst == "pipeline" and RANK[src] < PIPELINE
             else f"{dst} (rank {RANK[dst]}) is not below {src} (rank {RANK[src]})")
      bad.append(f"{mod}:{line} imports {target}: {why}")
  return bad


def test_every_unit_has_a_layer():
  units = {n.removesuffix(".py") for n in os.listdir(ROOT)
           if not n.startswith(("_", ".")) and (n.endswith(".py") or os.path.isdir(
               os.path.join(ROOT, n)))}
  assert units - {"__pycache__"} <= set(RANK), sorted(units - set(RANK))


def test_no_import_goes_up_or_sideways():
  assert violations() == []


def test_the_check_sees_a_back_edge(tmp_path):
  """A library module importing the pipeline (lazily, inside a function) is caught."""
  pkg = tmp_path / "lcrec_jax"
  (pkg / "data").mkdir(parents=True)
  (pkg / "pipeline").mkdir()
  (pkg / "pipeline" / "spec.py").write_text("")
  (pkg / "data" / "x.py").write_text(
      "def f():\n  from lcrec_jax.pipeline import spec\n  return spec\n")
  (bad,) = violations(str(pkg))
  assert bad.startswith("lcrec_jax.data.x:2 imports lcrec_jax.pipeline.spec: the library "
                        "imports the pipeline")


def test_choice_lists_are_the_librarys():
  """The spec's choice lists are the library's objects, not copies that could drift."""
  from lcrec_jax.llm import config as llm_config
  from lcrec_jax.llm import lora, names
  from lcrec_jax.pipeline import spec
  from lcrec_jax.pipeline import stages
  from lcrec_jax.tasks import prompts
  from lcrec_jax.train import mesh
  key = spec.BY_NAME
  assert key["tasks.names"].choices is prompts.TASK_NAMES
  assert key["model.dtype"].choices is names.DTYPE_NAMES
  assert set(names.DTYPE_NAMES) < set(llm_config.DTYPES)
  assert key["model.remat_policy"].choices is llm_config.REMAT_POLICIES
  assert key["model.lora.targets"].choices is lora.TARGETS
  assert key["model.preset"].choices == tuple(llm_config.PRESETS)
  assert key["mesh.axis_rules"].default is mesh.DEFAULT_AXIS_RULES
  assert tuple(stages.REGISTRY) == ("index", "train", "rl", "eval", "baseline")
