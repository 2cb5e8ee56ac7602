"""The default logical -> mesh axis rules (MaxText-like), without importing JAX: the run
spec's ``mesh.axis_rules`` default and :mod:`lcrec_jax.train.mesh` both use this tuple.
Names without a rule stay unsharded."""

from typing import Any

BATCH_AXES = ("data", "fsdp")

LogicalRules = tuple[tuple[str, Any], ...]

DEFAULT_AXIS_RULES: LogicalRules = (
    # Weights.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # LoRA rank axis (if the adapter module names it).
    ("lora_rank", None),
    # Activations.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)
