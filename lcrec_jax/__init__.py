"""lcrec-jax: LC-Rec (learned item codes + an LLM that generates them) in JAX/Flax.

Stages, one sub-package each: ``data`` (datasets, splits), ``encoders`` (item text
embeddings), ``index`` (RQ-VAE, Sinkhorn, conflict-free item codes), ``llm`` (Flax
LLaMA, weights, tokenizer, LoRA), ``tasks`` (LC-Rec alignment tasks, batching),
``train`` (mesh, sharding, trainer), ``decode`` (trie, constrained beam search),
``eval`` (full-ranking metrics). ``main`` is the entry point.
"""

__version__ = "0.1.0"
