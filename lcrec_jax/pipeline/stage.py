"""The stage interface: what the plan and the runner know about each pipeline stage.

A :class:`Stage` is declarative (name, upstream stages, the config fields it reads, its
directory and done marker, the outputs downstream stages read) plus ``run(ctx, force)``,
which imports the stage's module only when it runs (planning a run imports no JAX).
The stages are registered once, in :data:`lcrec_jax.pipeline.stages.REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import Any, Callable

from absl import logging

from lcrec_jax.errors import WorkdirError


@dataclasses.dataclass(frozen=True)
class Stage:
  """One pipeline stage.

  Attributes:
    name: ``--stages`` name.
    upstream: stages whose outputs it reads (pipeline order).
    reads: config fields it reads (``"x."`` = the whole section); what its manifest records.
    dir: directory (under the workdir) of its DONE marker and MANIFEST.json.
    done: the file in ``dir`` whose presence means it finished.
    state_dirs: directories a from-scratch run removes first (checkpoints included).
    output_patterns: paths (relative to the workdir) hashed into the manifest when it
      finishes and checked before it is reused; a trailing ``/`` is every file below,
      ``{latest}`` the newest numbered checkpoint (:meth:`outputs` resolves them).
    optional_upstream: upstream stages used only when they finished (eval and rl).
    resumes: what an unfinished re-run keeps (the plan line's words), "" if nothing.
    impl: ``"module:function"`` (or a callable) run as ``impl(ctx, force)``.
  """
  name: str
  upstream: tuple[str, ...]
  reads: tuple[str, ...]
  dir: str
  done: str
  state_dirs: tuple[str, ...]
  output_patterns: tuple[str, ...]
  impl: str | Callable[["Context", bool], Any]
  optional_upstream: tuple[str, ...] = ()
  resumes: str = ""

  def outputs(self, layout: Any) -> dict[str, str]:
    """``{path relative to the workdir: path}`` of the outputs that exist in ``layout``
    (a :class:`~lcrec_jax.pipeline.workdir.Layout`), what the manifest records."""
    from lcrec_jax.pipeline import workdir  # pylint: disable=g-import-not-at-top
    return workdir.output_files(layout.root, self.name)

  def run(self, ctx: "Context", force: bool) -> Any:
    """Runs the stage (``force``: even when its done marker exists)."""
    fn = self.impl
    if isinstance(fn, str):
      module, _, name = fn.partition(":")
      fn = getattr(importlib.import_module(module), name)
    return fn(ctx, force)


def as_settings(config: Any) -> Any:
  """The frozen :class:`~lcrec_jax.pipeline.spec.RunSettings` of ``config`` (a recipe's
  ConfigDict, resolved here: the spec's defaults for every key it leaves out), or
  ``config`` itself when it already is one. What the stages hand the library."""
  from lcrec_jax.pipeline import spec  # pylint: disable=g-import-not-at-top
  if isinstance(config, spec.RunSettings):
    return config
  return spec.settings(spec.resolve(config))


def finished(stage: str, marker: str, force: bool) -> bool:
  """Whether ``stage``'s completion ``marker`` exists and ``force`` does not ask for a re-run
  (logged as a skip): the check every stage runs before any work."""
  from lcrec_jax import fs  # pylint: disable=g-import-not-at-top
  if force or not fs.exists(marker):
    return False
  logging.info("%s stage: %s exists, skipping (--force=%s to run again)", stage, marker, stage)
  return True


class Context:
  """One run: the resolved config, the workdir layout, and the artefacts stages share
  (dataset, item embeddings, item index), each computed once, when first needed."""

  def __init__(self, config, workdir: str):
    from lcrec_jax.pipeline.workdir import Layout  # pylint: disable=g-import-not-at-top
    self.config = config
    self.settings = as_settings(config)
    self.workdir = workdir
    self.layout = Layout(workdir)
    self._dataset = None
    self._embeddings = None
    self._index = None

  @property
  def dataset(self):
    if self._dataset is None:
      from lcrec_jax.data.loaders import load_dataset  # pylint: disable=g-import-not-at-top
      self._dataset = load_dataset(self.settings.data)
      logging.info("dataset %s: %s", self._dataset.name, self._dataset.summary())
    return self._dataset

  @property
  def embeddings(self):
    if self._embeddings is None:
      from lcrec_jax.encoders.item_embeddings import item_embeddings  # pylint: disable=g-import-not-at-top
      t0 = time.perf_counter()
      self._embeddings = item_embeddings(self.settings.embed,
                                         self.dataset.item_texts(),
                                         cache_dir=self.layout.cache_dir)
      logging.info("item embeddings %s in %.1fs", self._embeddings.shape,
                   time.perf_counter() - t0)
    return self._embeddings

  @property
  def index(self):
    if self._index is None:
      from lcrec_jax.pipeline.stages.index import load_index  # pylint: disable=g-import-not-at-top
      from lcrec_jax import fs  # pylint: disable=g-import-not-at-top
      if not fs.exists(self.layout.index_done):
        raise WorkdirError(f"{self.workdir}/index is not finished",
                           hint="run --stages=index first")
      self._index = load_index(self.workdir, self.dataset)
    return self._index

  @index.setter
  def index(self, value):
    self._index = value
