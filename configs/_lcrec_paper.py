"""Shared parts of the LC-Rec paper recipes (LLaMA-7B, full fine-tune, Amazon datasets).

The recipes `lcrec_{instruments,arts,games}_llama7b.py` differ only in the dataset name
and fusionseqrec's sample count. Sources: the paper (Zheng et al., ICDE 2024) and
RUCAIBox/LC-Rec's `run.sh` (torchrun on 8 GPUs, `--per_device_batch_size 8
--gradient_accumulation_steps 2` = global batch 128, `--learning_rate 5e-5 --epochs 4
--weight_decay 0.01 --bf16`, tasks seqrec,item2index,index2item,fusionseqrec,
itemsearch,preferenceobtain with `--train_prompt_sample_num 1,1,1,1,1,1` and
`--train_data_sample_num 0,0,0,N,0,0`: N = 20000 Instruments, 30000 Arts, 100000
Games), its `index/run.sh` (RQ-VAE on `<Dataset>.emb-llama-td.npy`: layers 2048 1024
512 256 128 64, 4 x 256 codes, e_dim 32, sk_epsilons 0 0 0 0.003, beta 0.25, lr 1e-3,
batch 1024) and its fine-tuning defaults (cosine schedule, warmup ratio 0.01, history
20) and `test.sh` (20 beams).

Paths the user sets (LLaMA-7B weights and LC-Rec's released data are user-supplied):

  --config.data.path=<dir holding <Dataset>/<Dataset>.{inter,item,index,user}.json>
  --config.embed.npy_path=<.../<Dataset>.emb-llama-td.npy>   (default: follows data.path)
  --config.model.hf_dir=<HF LLaMA-7B directory: config.json, tokenizer, *.safetensors>

Mesh: a TPU v4-32 slice (16 chips, 32 GiB HBM each) as pure FSDP, `fsdp=16`: the
7B float32 master weights + AdamW moments (12 bytes/param, 75 GiB) split 16 ways are
4.7 GiB per chip; `python -m lcrec_jax.plan --mesh=fsdp=16 --seq_len=512` puts the
whole step (8 examples x 512 tokens per chip, bf16, full remat) at a 12.4 GiB peak
per chip (CPU compiler's estimate). Other slices: `--config.mesh.fsdp=-1` uses every chip as FSDP (v5p-32: 16 chips;
v5e-64: 64 chips of 16 GiB -> fsdp=64, or data=2,fsdp=32); check with
`python -m lcrec_jax.plan --config=<recipe> --mesh=fsdp=16`.
"""

from __future__ import annotations

import ml_collections

from lcrec_jax.recipes import sibling

# The paper's datasets -> fusionseqrec's --train_data_sample_num in LC-Rec's run.sh.
FUSIONSEQREC_SAMPLES = {"Instruments": 20000, "Arts": 30000, "Games": 100000}
TASKS = ("seqrec", "item2index", "index2item", "fusionseqrec", "itemsearch",
         "preferenceobtain")
DATA_PLACEHOLDER = "gs://YOUR_BUCKET/LC-Rec/data"
HF_DIR_PLACEHOLDER = "/path/to/llama-7b-hf"
TPU_SLICE = "v4-32"
PEAK_BF16_FLOPS_V4 = 275e12  # per v4 chip (2 TensorCores), bf16


def _quick_config() -> ml_collections.ConfigDict:
  """configs/ml100k_quick.py's config: every section and field the pipeline reads."""
  return sibling(__file__, "ml100k_quick.py").get_config()


def paper_config(dataset: str) -> ml_collections.ConfigDict:
  """The LC-Rec paper recipe for `dataset` (Instruments | Arts | Games) with LLaMA-7B."""
  if dataset not in FUSIONSEQREC_SAMPLES:
    raise ValueError(f"paper_config: dataset {dataset!r} not one of {sorted(FUSIONSEQREC_SAMPLES)}")
  c = _quick_config()
  c.seed = 42

  # --- data: LC-Rec's released json files --------------------------------------------
  c.data.format = "lcrec"
  c.data.path = DATA_PLACEHOLDER   # <path>/<name>/<name>.inter.json etc.
  c.data.name = dataset
  c.data.on_empty_title = "error"

  # --- item embeddings: LC-Rec's LLaMA text embeddings ---------------------------------
  c.embed.encoder = "npy"
  # Follows --config.data.path (a lazy reference): <path>/<name>/<name>.emb-llama-td.npy.
  c.embed.npy_path = c.data.get_ref("path") + f"/{dataset}/{dataset}.emb-llama-td.npy"

  # --- RQ-VAE (LC-Rec index/run.sh) ----------------------------------------------------
  c.rqvae.encoder_layers = (2048, 1024, 512, 256, 128, 64)
  c.rqvae.e_dim = 32
  c.rqvae.num_levels = 4
  c.rqvae.codebook_size = 256
  c.rqvae.dropout = 0.0
  c.rqvae.batch_norm = False
  c.rqvae.beta = 0.25
  c.rqvae.sk_epsilons = (0.0, 0.0, 0.0, 0.003)
  c.rqvae.lr = 1e-3
  c.rqvae.weight_decay = 1e-4
  c.rqvae.batch_size = 1024
  c.rqvae.epochs = 10000
  c.rqvae.eval_every = 50
  c.rqvae.checkpoint_every = 500
  c.index.checkpoint = "best_collision"

  # --- tasks ------------------------------------------------------------------------
  c.tasks.names = TASKS
  c.tasks.sample_nums = (0, 0, 0, FUSIONSEQREC_SAMPLES[dataset], 0, 0)
  c.tasks.prompt_sample_nums = (1, 1, 1, 1, 1, 1)
  c.tasks.max_history = 20
  # LLaMA tokens: item titles of Amazon data are long; 20 history items with their
  # codes fit in 512, fusionseqrec/itemsearch prompts with titles need more.
  c.tasks.buckets = (256, 512, 768, 1024)
  c.tasks.history_loss_tasks = ()  # the paper trains on responses only
  # bytes (<= tokens): long Amazon titles and descriptions, response title + description fit 1024
  c.tasks.text_budget.title = 192
  c.tasks.text_budget.description = 768

  # --- model: LLaMA-7B, full fine-tune, bf16 compute ---------------------------------
  c.model.init = "pretrained"
  c.model.hf_dir = HF_DIR_PLACEHOLDER
  c.model.gguf_path = ""
  c.model.preset = "llama1_7b"   # the architecture (planner; random init for smoke runs)
  c.model.overrides = ml_collections.ConfigDict()
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat_policy = "full"
  c.model.tokenizer = "base"     # LLaMA's own tokenizer (from hf_dir)
  c.model.lora.rank = 0

  # --- fine-tuning --------------------------------------------------------------------
  c.train.batch_size = 128
  c.train.grad_accum_steps = 1
  c.train.epochs = 4
  c.train.num_steps = 0
  c.train.lr = 5e-5
  c.train.schedule = "cosine"
  # The paper's 1% warmup; steps = ceil(warmup_ratio * total steps), see warmup_steps().
  c.train.warmup_ratio = 0.01
  c.train.warmup_steps = 0
  c.train.end_lr_ratio = 0.0
  c.train.weight_decay = 0.01
  c.train.max_grad_norm = 1.0
  c.train.compute_dtype = "bfloat16"
  c.train.max_label_tokens = 64   # label slots per example (codes + EOS; titles <= 64)
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.eval_every = 0
  c.train.peak_flops_per_device = PEAK_BF16_FLOPS_V4
  c.train.distributed = True

  # --- mesh: TPU v4-32 (16 chips), pure FSDP -------------------------------------------
  c.mesh.tpu_slice = TPU_SLICE
  c.mesh.data = 1
  c.mesh.fsdp = 16
  c.mesh.tensor = 1

  # --- evaluation -------------------------------------------------------------------
  c.eval.num_beams = 20
  c.eval.batch_size = 32
  c.eval.modes = ("trie", "position")  # position = the paper's per-level mask
  c.eval.template_ids = ml_collections.FieldReference(None, field_type=tuple)
  return c


def warmup_steps(num_examples: int, config: ml_collections.ConfigDict) -> int:
  """`ceil(train.warmup_ratio * total steps)` for `num_examples` training examples.

  Total steps = `train.epochs * ceil(num_examples / train.batch_size)` (HF Trainer's
  count with `warmup_ratio`, as LC-Rec ran it).
  """
  tc = config.train
  steps = int(tc.epochs) * -(-int(num_examples) // int(tc.batch_size))
  return -(-int(round(float(tc.warmup_ratio) * steps * 1e6)) // 1_000_000)
