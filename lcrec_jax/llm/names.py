"""Names the LLM accepts, without importing JAX (the run spec's choice lists come from
here): dtype names, remat policies, LoRA target projections, preset names."""

# Dtype names a config may give (model dtypes, `train.compute_dtype`);
# `lcrec_jax.llm.config.DTYPES` maps them (and float64, for test references) to jnp.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# The projections LoRA can adapt (`lcrec_jax.llm.lora`).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# `lcrec_jax.llm.config.PRESETS` keys (a test checks they agree).
PRESET_NAMES = ("llama1_7b", "llama2_7b", "llama3_8b", "llama3_1_8b", "llama3_2_1b",
                "smollm2_135m", "tiny")
