"""MovieLens-100K, quick recipe: sized to finish on a 2-core CPU.

  python -m lcrec_jax.main --config=configs/ml100k_quick.py --workdir=runs/ml100k
  python -m lcrec_jax.main --config=configs/ml100k_quick.py --workdir=runs/ml100k \
      --config.rqvae.epochs=50 --stages=index

Every key starts at its default (lcrec_jax/pipeline/spec.py KEYS: default, type, range and
what it does; README "CLI", Run spec), so `--config.<key>=...` reaches any of them; this
recipe sets only what it changes.
"""

import ml_collections

from lcrec_jax.pipeline import spec


def get_config() -> ml_collections.ConfigDict:
  c = spec.defaults()
  c.seed = 42
  c.data.name = "ml-100k"             # the recbole wheel's ml-100k files

  # --- alignment tasks (lcrec_jax/tasks) ------------------------------------------------
  # Records kept per task, like LC-Rec's --train_data_sample_num (0 = all). ML-100K has
  # 97,171 seqrec/fusionseqrec prefixes, 1,682 items and 943 users. The quick recipe samples
  # 24k of the 97k seqrec prefixes (each also trains its ~20 history items, see
  # tasks.history_loss_tasks), 4k fusionseqrec and a little of every other task.
  c.tasks.sample_nums = (24000, 1000, 1000, 4000, 500, 500)
  # Item text cut before prompts are built (lcrec_jax/tasks/text_budget.py): UTF-8 bytes per
  # field. A byte-level BPE token is >= 1 byte, so title + description (321) + EOS + the
  # frame fit the largest bucket with any tokenizer; ML-100K texts are shorter.
  c.tasks.text_budget.title = 96
  c.tasks.text_budget.description = 224
  c.tasks.text_budget.other = 128

  # --- language model (lcrec_jax/llm/build.py): a 2-layer LLaMA from scratch --------------
  c.model.overrides = ml_collections.ConfigDict(dict(
      hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384))
  # a byte-level BPE learned from the task texts (lcrec_jax/llm/bpe.py): 2,048 tokens + codes
  c.model.tokenizer = "trained"
  c.model.tokenizer_vocab = 2048
  # projections that get adapters when model.lora.rank > 0 (LC-Rec adapts all seven)
  c.model.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj")

  # --- fine-tuning (lcrec_jax/train) ------------------------------------------------------
  # The whole run (index, train, eval) in ~20 minutes on a quiet 2-core CPU; training is
  # what buys quality here (BENCHMARKS.md "Where the quality goes": 1,200 steps on half
  # this sample gave test NDCG@10 0.046, this recipe 0.061, means of 3 seeds).
  c.train.num_steps = 4500            # ~2.3 epochs of the 31,000 sampled examples
  c.train.checkpoint_every = 500
  c.train.lr = 2e-3
  c.train.warmup_steps = 20

  # --- evaluation (lcrec_jax/eval/evaluate.py) and recommend -------------------------------
  # seqrec templates evaluated; None = all 10 (LC-Rec reports mean/min/max over them). The
  # quick recipe takes two to stay within its time budget. Typed, so that
  # --config.eval.template_ids='(0, 3)' or =None can override it.
  c.eval.template_ids = ml_collections.FieldReference((0, 1), field_type=tuple)
  return c
