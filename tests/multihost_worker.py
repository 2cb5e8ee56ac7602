"""One process of the multi-host test (tests/test_multihost.py launches it).

Modes:

  pair    process `--process_id` of 2, 4 simulated CPU devices each, joined by
          `jax.distributed.initialize` on localhost (gloo CPU collectives); trains the
          tiny LLaMA through `lcrec_jax.train.trainer.train`, each process feeding only
          its own rows of every global batch. Process 0 writes the losses and the final
          (all-gathered) params to `--out`.
  single  one process with 8 simulated devices: the same training run on the whole
          global batch (the reference), then restores the pair's last checkpoint from
          `--restore_from` into its own 8-device mesh; writes all of it to `--out`.
  pipe_pair / pipe_single
          the real stages on MovieLens-100K (`pipeline_config`): index (a tiny RQ-VAE on
          the item embeddings of `--embeddings`) -> train (6 steps) -> HF export -> eval
          (checkpoint restored onto the mesh), on a (data=1, fsdp=2, tensor=4) mesh; in
          the pair the fsdp axis spans the two processes, so every weight sharded over
          `embed` lives half on each. Writes codes, losses, metrics and shard facts.

The device count must be fixed before jax is imported, hence a separate script.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--mode", choices=("pair", "single", "pipe_pair", "pipe_single"),
                 required=True)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--restore_from", default="")
  p.add_argument("--embeddings", default="", help="pipe_*: [1682, dim] .npy item embeddings")
  return p.parse_args()


ARGS = _parse()
_PAIR = ARGS.mode in ("pair", "pipe_pair")
_LOCAL_DEVICES = 4 if _PAIR else 8
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_LOCAL_DEVICES}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if _PAIR:
  jax.distributed.initialize(coordinator_address=f"localhost:{ARGS.port}",
                             num_processes=ARGS.num_processes, process_id=ARGS.process_id,
                             initialization_timeout=120)

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lcrec_jax.pipeline import spec
from lcrec_jax.llm.config import tiny
from lcrec_jax.llm.model import Llama
from lcrec_jax.runtime import checkpoint as ckpt_lib
from lcrec_jax.train import mesh as mesh_lib
from lcrec_jax.train import state as state_lib
from lcrec_jax.train import trainer as trainer_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

VOCAB, GLOBAL_BATCH, SEQ = 256, 8, 16
STEPS_PER_EPOCH, NUM_STEPS = 3, 4
MESH = (2, 2, 2)  # data spans the two processes; fsdp and tensor within each.


def global_batch(epoch: int, step: int) -> dict[str, np.ndarray]:
  """The whole `[GLOBAL_BATCH, SEQ]` batch of (epoch, step), the same in every process."""
  rs = np.random.RandomState(1000 * epoch + step)
  toks = rs.randint(3, 19, (GLOBAL_BATCH, SEQ)).astype(np.int32)
  labels = np.full((GLOBAL_BATCH, SEQ), -100, np.int32)
  labels[:, SEQ // 2:] = toks[:, SEQ // 2:]
  lengths = rs.randint(SEQ - 4, SEQ + 1, (GLOBAL_BATCH, 1))
  mask = (np.arange(SEQ)[None] < lengths).astype(np.int32)
  labels = np.where(mask == 1, labels, -100).astype(np.int32)
  return dict(tokens=toks, labels=labels, attention_mask=mask,
              positions=np.tile(np.arange(SEQ, dtype=np.int32), (GLOBAL_BATCH, 1)))


def batches(epoch: int, start: int):
  """This process's rows `[p * B / P, (p + 1) * B / P)` of every global batch."""
  pc, pi = jax.process_count(), jax.process_index()
  rows = slice(pi * GLOBAL_BATCH // pc, (pi + 1) * GLOBAL_BATCH // pc)
  for s in range(start, STEPS_PER_EPOCH):
    yield {k: v[rows] for k, v in global_batch(epoch, s).items()}


def make_config() -> ml_collections.ConfigDict:
  """Trainer config: 4 steps over epochs of 3, checkpoints every 2 steps, float32."""
  c = ml_collections.ConfigDict()
  c.train = spec.section("train")
  c.train.update(dict(batch_size=GLOBAL_BATCH, num_steps=NUM_STEPS, lr=1e-2, warmup_steps=1,
                      checkpoint_every=2, keep_checkpoints=3, seed=5, tensorboard=False))
  c.mesh = spec.section("mesh")
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = MESH
  return c


def model_and_params():
  """The tiny LLaMA and its params (same PRNG key, so identical in every process)."""
  model = Llama(tiny(vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64))
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, jax.device_get(params)


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
  """`{prefix + keypath: numpy array}` of a host tree."""
  return {prefix + jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def restore_checkpoint(model, params, config, checkpoint_dir: str):
  """Reads the newest checkpoint under `checkpoint_dir` into this process's mesh."""
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.axis_rules(config.mesh)
  tx, _ = state_lib.make_optimizer(config.train, NUM_STEPS)
  boxed = state_lib.abstract_boxed_params(model, np.zeros((1, 8), np.int32))
  shardings = state_lib.state_shardings(tx, boxed, None, mesh, rules)
  abstract = state_lib.abstract_state(shardings, boxed, tx, None)
  tree = {"step": abstract.step, "trainable": abstract.trainable,
          "opt_state": abstract.opt_state, "rng": abstract.rng}
  with ckpt_lib.Checkpointer(checkpoint_dir, async_save=False) as ckpt:
    step = ckpt.latest_step()
    restored, data = ckpt.restore(tree, step)
  return step, restored, data


def pipeline_config(embeddings: str) -> ml_collections.ConfigDict:
  """The quick recipe cut to seconds: 3 x 16 codes, 6 train steps, 16 users evaluated."""
  from configs import ml100k_quick  # pylint: disable=g-import-not-at-top
  c = ml100k_quick.get_config()
  c.embed.encoder, c.embed.npy_path = "npy", embeddings
  c.rqvae.update(dict(encoder_layers=(32,), e_dim=8, num_levels=3, codebook_size=16,
                      sk_epsilons=(0.0, 0.0, 0.003), kmeans_iters=10, warmup_epochs=1,
                      batch_size=512, epochs=4, eval_every=2, checkpoint_every=2))
  c.index.repair_rounds = 2
  c.tasks.names, c.tasks.sample_nums = ("seqrec", "item2index"), (160, 80)
  c.tasks.prompt_sample_nums, c.tasks.history_loss_tasks = (1, 1), ("seqrec",)
  c.tasks.buckets = (256,)
  c.model.tokenizer_vocab = 512
  c.model.overrides.hidden, c.model.overrides.intermediate = 32, 64
  c.train.update(dict(batch_size=8, num_steps=6, checkpoint_every=100, valid_users=8,
                      tensorboard=False, async_checkpoint=False))
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 4  # fsdp spans the two processes
  c.eval.update(dict(max_users=16, batch_size=8, num_beams=10, template_ids=(0,),
                     splits=("test",), quick_users=8))
  return c


def pipeline() -> None:
  """index -> train -> export -> eval through the real stages (modes pipe_*)."""
  import json  # pylint: disable=g-import-not-at-top
  from lcrec_jax.data.loaders import load_dataset  # pylint: disable=g-import-not-at-top
  from lcrec_jax.encoders.item_embeddings import item_embeddings  # pylint: disable=g-import-not-at-top
  from lcrec_jax.pipeline.stages import eval as eval_stage  # pylint: disable=g-import-not-at-top
  from lcrec_jax.pipeline.stages import index as index_stage  # pylint: disable=g-import-not-at-top
  from lcrec_jax.pipeline.stages import train as train_stage  # pylint: disable=g-import-not-at-top
  c = pipeline_config(ARGS.embeddings)
  dataset = load_dataset(c.data)
  x = item_embeddings(c.embed, dataset.item_texts())
  index = index_stage.run_index_stage(c, ARGS.workdir, dataset, x)
  train_stage.run_train_stage(c, ARGS.workdir, dataset, index)
  results = eval_stage.run_eval_stage(c, ARGS.workdir, dataset, index)
  model, params, tokenizer = eval_stage.load_trained(c, ARGS.workdir, index)
  gate = params["layers_0"]["mlp"]["gate_proj"]["kernel"]  # [embed 32, mlp 64]
  # The ranked lists behind the metrics (6 steps teach little: metrics may be all zero).
  from lcrec_jax.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from lcrec_jax.tasks.builders import seqrec_eval_examples  # pylint: disable=g-import-not-at-top
  prompts = [evaluate_lib.eval_prompt_ids(tokenizer, ex.instruction, c.tasks, index.num_levels)
             for ex in seqrec_eval_examples(dataset, index, "test", 0, 20)[:8]]
  decoder = evaluate_lib.Decoder(model, tokenizer, index, c.tasks.buckets,
                                 mesh=eval_stage.params_mesh(params))
  items, scores = decoder.rank(params, prompts, num_beams=10, mode="trie", batch_size=8)
  with open(os.path.join(ARGS.workdir, "train", "metrics.jsonl"), encoding="utf-8") as f:
    losses = [json.loads(l)["train/loss"] for l in f if "train/loss" in l]
  m = results["test"]["mean"]
  out = {"codes": np.asarray(index.codes), "loss": np.asarray(losses),
         "beam_items": items, "beam_scores": scores,
         "metrics": np.asarray([m[k] for k in sorted(m)]),
         "metric_names": np.asarray(sorted(m)),
         "process_count": np.asarray(jax.process_count()),
         "gate_fully_addressable": np.asarray(gate.is_fully_addressable),
         "gate_local_rows": np.asarray(sorted({s.index[0].start or 0
                                               for s in gate.addressable_shards}))}
  out.update(flat(multihost_utils.process_allgather(params, tiled=True), "params"))
  if jax.process_index() == 0:
    np.savez(ARGS.out, **out)
  if _PAIR:
    multihost_utils.sync_global_devices("lcrec_jax multihost pipeline done")


def main() -> None:
  assert jax.local_device_count() == _LOCAL_DEVICES, jax.local_devices()
  if ARGS.mode.startswith("pipe_"):
    pipeline()
    return
  model, params = model_and_params()
  config = make_config()
  res = trainer_lib.train(config, os.path.join(ARGS.workdir, "train"), model, params, batches,
                          STEPS_PER_EPOCH)  # the train stage's layout: <workdir>/train/
  out = {
      "loss": np.asarray([h["loss"] for h in res.history]),
      "grad_norm": np.asarray([h["grad_norm"] for h in res.history]),
      "process_count": np.asarray(jax.process_count()),
      "device_count": np.asarray(jax.device_count()),
  }
  final = multihost_utils.process_allgather(res.state.params, tiled=True)
  out.update(flat(final, "params"))
  if ARGS.mode == "single" and ARGS.restore_from:
    step, restored, data = restore_checkpoint(
        model, params, config, os.path.join(ARGS.restore_from, "train", "checkpoints"))
    out["restored_step"] = np.asarray(step)
    out["restored_epoch"] = np.asarray(data["epoch"])
    out["restored_step_in_epoch"] = np.asarray(data["step_in_epoch"])
    out.update(flat(jax.device_get(restored["trainable"]), "restored"))
    shard = restored["trainable"]["lm_head"]["kernel"].addressable_shards[0].data
    out["restored_shard_rows"] = np.asarray(shard.shape[0])
  if jax.process_index() == 0:
    np.savez(ARGS.out, **out)
  if ARGS.mode == "pair":
    multihost_utils.sync_global_devices("lcrec_jax multihost test done")


if __name__ == "__main__":
  main()
