"""Loading one recipe file from another, by path.

Recipe files in ``configs/`` are loaded by path (``--config=configs/x.py``), not as a
package, so one recipe that builds on another (the SmolLM2 and long recipes on the quick
one, the paper recipes on ``_lcrec_paper.py``) loads its sibling file by path too; then
any working directory works.
"""

from __future__ import annotations

import importlib.util
import os
import types


def sibling(config_file: str, name: str) -> types.ModuleType:
  """The module in file ``name`` next to ``config_file`` (pass ``__file__``)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"recipe {config_file} builds on {path}, which does not exist")
  stem = os.path.splitext(name)[0]
  spec = importlib.util.spec_from_file_location(f"_lcrec_recipe_{stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
