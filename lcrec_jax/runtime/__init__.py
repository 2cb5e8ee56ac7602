"""Generic training runtime, shared by every trainer (LLM SFT, RL, RQ-VAE, baselines).

* :mod:`~lcrec_jax.runtime.loop`: the step-loop skeleton (periodic checkpoint / validation
  / early stopping, preemption save, progress, metrics read one step late);
* :mod:`~lcrec_jax.runtime.checkpoint`: orbax checkpointing with resume, keep-N, the
  corrupt-checkpoint fallback and the preemption signal;
* :mod:`~lcrec_jax.runtime.finite`: the NaN/inf guard (:class:`NonFiniteError`);
* :mod:`~lcrec_jax.runtime.summaries`: ``metrics.jsonl`` + TensorBoard writer, throughput
  and MFU.

Nothing here knows a model, a config or a workdir layout.
"""
