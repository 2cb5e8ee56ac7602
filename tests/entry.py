"""Run a command (``python -m lcrec_jax.<prog> ARGS``) inside the test process.

``run("main", "--config=...", "--workdir=...")`` -> ``Result(returncode, stdout, stderr)``,
through the same one-line error boundary as the real command (``lcrec_jax.cli``), with the
flags on a fresh ``FlagValues``: no new process, so no second JAX import and no compile
that this process already did. Tests of a command's behaviour use this; each command keeps
one real subprocess test (marked ``slow``) for the process boundary itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os

from lcrec_jax import cli

# prog -> (module, the function `python -m` runs behind cli.run)
COMMANDS = {
    "main": ("lcrec_jax.main", "_main"),
    "recommend": ("lcrec_jax.recommend", "main"),
    "generate": ("lcrec_jax.generate", "main"),
    "synthetic": ("lcrec_jax.data.synthetic", "main"),
}


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str
  stderr: str


def run(prog: str, *argv: str, cwd: str | None = None) -> Result:
  """Runs ``prog`` with ``argv``; the environment and working directory are restored after
  (``main`` appends XLA:CPU flags to ``XLA_FLAGS``, as the real command does)."""
  module_name, fn = COMMANDS[prog]
  module = importlib.import_module(module_name)
  env, here = dict(os.environ), os.getcwd()
  out, err = io.StringIO(), io.StringIO()
  try:
    if cwd:
      os.chdir(cwd)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = cli.run_in_process(module.define_flags, getattr(module, fn), prog, list(argv))
  finally:
    os.chdir(here)
    os.environ.clear()
    os.environ.update(env)
  return Result(code, out.getvalue(), err.getvalue())
