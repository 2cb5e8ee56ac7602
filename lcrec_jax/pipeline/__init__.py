"""The pipeline layer: everything a run is, above the library.

* :mod:`~lcrec_jax.pipeline.spec`: the run spec, every config key with its default, type
  and range (the only place defaults live), and the frozen typed settings the library
  is called with;
* :mod:`~lcrec_jax.pipeline.workdir`: the workdir :class:`~lcrec_jax.pipeline.workdir.Layout`
  (every path a stage reads or writes), the stage manifests and the plan;
* :mod:`~lcrec_jax.pipeline.stage`: the :class:`~lcrec_jax.pipeline.stage.Stage` interface
  and the per-run :class:`~lcrec_jax.pipeline.stage.Context`;
* :mod:`~lcrec_jax.pipeline.stages`: the stages (index, train, rl, eval, baseline) and
  their one registry;
* :mod:`~lcrec_jax.pipeline.runner`: ``python -m lcrec_jax.main`` (flags, plan, stages).

Nothing below this package imports it (``tests/test_layering.py``). See ARCHITECTURE.md.
"""
