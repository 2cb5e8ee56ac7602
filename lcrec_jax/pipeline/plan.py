"""Memory and throughput planner: compile a recipe's real train step without weights.

    python -m lcrec_jax.plan --config=configs/lcrec_instruments_llama7b.py --mesh=fsdp=8
    python -m lcrec_jax.plan --config=configs/lcrec_games_llama7b.py \
        --mesh=data=1,fsdp=16,tensor=1 --seq_len=512 --peak_flops=275e12 --mfu=0.4

The train step (`lcrec_jax.train.step.make_train_step`, with the recipe's model,
optimizer, accumulation, label buffer and compute dtype) is lowered and compiled for
a mesh of *simulated* CPU devices from `jax.ShapeDtypeStruct` inputs that carry the
trainer's shardings: params and optimizer state come from `jax.eval_shape`, so no
weight is ever allocated and a 7B model plans on a laptop. Printed per device:

- params and optimizer state, summed leaf by leaf from their shardings (exact),
- the compiled executable's `memory_analysis()`: arguments (state + batch), outputs,
  temporaries (activations, gradients, collectives' buffers) and the output bytes
  aliased to donated inputs, hence the peak estimate arguments + outputs - alias +
  temporaries,
- FLOPs per step: the compiled `cost_analysis()` (XLA counts a scanned layer's loop
  body once, so with `scan_layers` this undercounts; shown for reference) and the
  model estimate 6 N + 12 L d T per token that MFU is defined by,
- tokens/s per chip at a target MFU and a peak-FLOPs figure.

The CPU compiler's memory numbers are the CPU backend's (layouts, fusion and
rematerialisation differ on TPU); treat them as a plan, not a measurement.

`--step=eval` plans the eval stage instead (`plan_decode`): the constrained beam search
with the params in `train.compute_dtype`, sharded by the training rules as the eval
stage restores them from the checkpoint, `eval.batch_size` users x `eval.num_beams` beams
over a trie of the catalogue, and says whether the peak fits a v4-32 (32 GiB per chip)
and a v5e-16 (16 GiB per chip) slice:

    python -m lcrec_jax.plan --config=configs/lcrec_arts_llama7b.py --step=eval \
        --mesh=fsdp=16 --seq_len=1024
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

GIB = 1024 ** 3


@dataclasses.dataclass
class Plan:
  """What `plan_train_step` found (bytes are per device unless named global).

  Attributes:
    mesh_shape: `{"data": ., "fsdp": ., "tensor": .}`.
    num_params: parameter count of the model (analytic, `LlamaConfig.num_params`).
    global_batch: examples per optimizer step.
    seq_len: tokens per example.
    grad_accum_steps: micro-batches per step.
    param_bytes: params per device, from their shardings.
    param_bytes_global: params summed over the whole tree (unsharded).
    opt_state_bytes: optimizer state per device, from its shardings.
    batch_bytes: the step's input batch per device.
    argument_bytes, output_bytes, temp_bytes, alias_bytes, code_bytes: from
      `compiled.memory_analysis()`.
    peak_bytes: argument + output - alias + temp.
    xla_flops: `compiled.cost_analysis()["flops"]` (per device program), or NaN.
    model_flops_per_step: 6 N + 12 L d T per token, times the step's tokens (global).
    tokens_per_step: global tokens per step.
    tokens_per_s_per_chip: at `target_mfu` of `peak_flops`; NaN without peak FLOPs.
    target_mfu: the MFU assumed.
    peak_flops: peak FLOP/s per chip assumed.
  """
  mesh_shape: dict[str, int]
  num_params: int
  global_batch: int
  seq_len: int
  grad_accum_steps: int
  param_bytes: int
  param_bytes_global: int
  opt_state_bytes: int
  batch_bytes: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int
  peak_bytes: int
  xla_flops: float
  model_flops_per_step: float
  tokens_per_step: int
  tokens_per_s_per_chip: float
  target_mfu: float
  peak_flops: float


def parse_mesh(spec: str) -> dict[str, int]:
  """`"fsdp=8"` or `"data=2,fsdp=4,tensor=1"` -> axis sizes (unnamed axes are 1).

  Raises:
    ValueError: naming the `--mesh` flag, for unknown axes or bad sizes.
  """
  from lcrec_jax.train.mesh import MESH_AXES  # pylint: disable=g-import-not-at-top
  out = {a: 1 for a in MESH_AXES}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in out or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh: expected comma-separated axis=size with axes {MESH_AXES}, "
                       f"got {part!r} in {spec!r}")
    size = int(value)
    if size < 1:
      raise ValueError(f"--mesh: axis {name} must be >= 1, got {size}")
    out[name] = size
  return out


def _resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with the run spec's default for every key the recipe leaves out."""
  from lcrec_jax.pipeline import spec  # pylint: disable=g-import-not-at-top
  return spec.resolve(config)


def model_config_for_plan(config: ml_collections.ConfigDict, vocab_size: int | None = None):
  """The recipe's `LlamaConfig`: `c.model.hf_dir`'s config.json if present, else the preset.

  The vocabulary grows by the item-code tokens (`c.rqvae.num_levels *
  c.rqvae.codebook_size`) as `lcrec_jax.llm.build` does, unless `vocab_size` is given.
  Compute dtype, scan and remat come from `c.model` (`dtype`, `param_dtype`,
  `scan_layers`, `remat_policy`).
  """
  from lcrec_jax.llm import config as config_lib  # pylint: disable=g-import-not-at-top
  config = _resolved(config)
  mc = config.model
  kw = dict(dtype=mc.dtype, param_dtype=mc.param_dtype, scan_layers=bool(mc.scan_layers),
            remat_policy=mc.remat_policy)
  hf_dir = mc.hf_dir
  if hf_dir and os.path.isfile(os.path.join(hf_dir, "config.json")):
    from lcrec_jax.llm import safetensors_io  # pylint: disable=g-import-not-at-top
    cfg = safetensors_io.load_hf_config(hf_dir, **kw)
  else:
    overrides = dict(mc.overrides or {})
    if mc.preset == "tiny":
      cfg = config_lib.tiny(**overrides, **kw)
    else:
      cfg = config_lib.preset(mc.preset, **{**overrides, **kw})
  if vocab_size is None:
    codes = int(config.rqvae.num_levels) * int(config.rqvae.codebook_size)
    vocab_size = cfg.vocab_size + codes
  return cfg.replace(vocab_size=int(vocab_size))


def _sharded_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with NamedShardings.

  Every device of a NamedSharding holds an equally shaped shard, so device 0's shard
  shape is every device's.
  """
  import jax  # pylint: disable=g-import-not-at-top
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(tuple(x.shape))
    total += math.prod(shard) * x.dtype.itemsize
  return int(total)


def _global_bytes(tree: Any) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _mesh(config, mesh_shape: dict, devices):
  """``(shape, mesh, axis rules)`` for ``--mesh`` over ``devices`` (default: the first ones)."""
  import jax  # pylint: disable=g-import-not-at-top
  from lcrec_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  shape = tuple(int(mesh_shape.get(a, 1)) for a in mesh_lib.MESH_AXES)
  n_dev = math.prod(shape)
  if devices is None:
    if len(jax.devices()) < n_dev:
      raise ValueError(f"--mesh: {dict(zip(mesh_lib.MESH_AXES, shape))} needs {n_dev} "
                       f"devices, {len(jax.devices())} are available (set --devices)")
    devices = jax.devices()[:n_dev]
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(zip(mesh_lib.MESH_AXES, shape))),
                            devices)
  return shape, mesh, mesh_lib.axis_rules(_resolved(config).mesh)


def plan_train_step(config: ml_collections.ConfigDict, mesh_shape: Mapping[str, int], *,
                    seq_len: int, global_batch: int | None = None,
                    grad_accum_steps: int | None = None, target_mfu: float = 0.4,
                    peak_flops: float | None = None, vocab_size: int | None = None,
                    devices: Sequence[Any] | None = None) -> Plan:
  """Lowers and compiles the recipe's train step on a mesh; nothing is allocated.

  Args:
    config: a recipe (`c.model`, `c.train`, `c.mesh.axis_rules`, `c.rqvae`).
    mesh_shape: `{"data": ., "fsdp": ., "tensor": .}`; the product must equal the
      number of `devices`.
    seq_len: tokens per example T (the batch is `[global_batch, T]`).
    global_batch: examples per step (default `c.train.batch_size`).
    grad_accum_steps: micro-batches (default `c.train.grad_accum_steps`).
    target_mfu: the MFU assumed for tokens/s.
    peak_flops: peak FLOP/s per chip (default `c.train.peak_flops_per_device`).
    vocab_size: override the vocabulary (default: preset + item-code tokens).
    devices: devices of the mesh (default the first `prod(mesh_shape)` of
      `jax.devices()`; on CPU, simulated ones).

  Returns:
    A `Plan`.
  """
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lcrec_jax.llm.model import Llama
  from lcrec_jax.train import mesh as mesh_lib
  from lcrec_jax.train import state as state_lib
  from lcrec_jax.train import step as step_lib
  from lcrec_jax.runtime import summaries
  # pylint: enable=g-import-not-at-top
  config = _resolved(config)
  tc = config.train
  shape, mesh, rules = _mesh(config, mesh_shape, devices)
  global_batch = int(global_batch or tc.batch_size)
  accum = max(int(grad_accum_steps or tc.grad_accum_steps), 1)
  batch_ways = shape[0] * shape[1]
  if global_batch % (accum * batch_ways):
    raise ValueError(f"plan: global batch {global_batch} must be divisible by "
                     f"grad_accum_steps ({accum}) x data*fsdp ({batch_ways})")
  peak = float(peak_flops if peak_flops is not None else tc.peak_flops_per_device)
  compute_dtype = jnp.dtype(tc.compute_dtype)

  cfg = model_config_for_plan(config, vocab_size)
  model = Llama(cfg)
  tx, schedule = state_lib.make_optimizer(tc, 1000)
  boxed = state_lib.abstract_boxed_params(model, np.zeros((1, 8), np.int32))
  shardings = state_lib.state_shardings(tx, boxed, None, mesh, rules)
  abstract = state_lib.abstract_state(shardings, boxed, tx, None)
  b_shape = (global_batch, seq_len) if accum == 1 else (accum, global_batch // accum, seq_len)
  b_sharding = step_lib.train_batch_sharding(mesh, accum)
  packed = int(config.tasks.pack_length) > 0
  batch = {k: jax.ShapeDtypeStruct(b_shape, jnp.int32, sharding=b_sharding)
           for k in (step_lib.PACKED_KEYS if packed else step_lib.BATCH_KEYS)}
  step_fn = step_lib.make_train_step(
      model, tx, shardings=shardings, mesh=mesh, rules=rules, schedule=schedule,
      grad_accum_steps=accum, max_label_tokens=int(tc.max_label_tokens),
      compute_dtype=compute_dtype, packed=packed)
  with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
    lowered = step_fn.jitted.lower(abstract, batch)
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  xla_flops = float((cost or {}).get("flops", float("nan")))

  params = abstract.trainable
  tokens = global_batch * seq_len
  fpt = summaries.train_flops_per_token(cfg.num_params(), cfg.num_hidden_layers,
                                        cfg.hidden_size, seq_len)
  tok_per_chip = target_mfu * peak / fpt if peak > 0 else float("nan")
  arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  tmp, alias = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
  return Plan(
      mesh_shape=dict(zip(mesh_lib.MESH_AXES, shape)), num_params=cfg.num_params(),
      global_batch=global_batch, seq_len=seq_len, grad_accum_steps=accum,
      param_bytes=_sharded_bytes(params), param_bytes_global=_global_bytes(params),
      opt_state_bytes=_sharded_bytes(abstract.opt_state), batch_bytes=_sharded_bytes(batch),
      argument_bytes=arg, output_bytes=out, temp_bytes=tmp, alias_bytes=alias,
      code_bytes=int(getattr(mem, "generated_code_size_in_bytes", 0)),
      peak_bytes=arg + out - alias + tmp, xla_flops=xla_flops,
      model_flops_per_step=fpt * tokens, tokens_per_step=tokens,
      tokens_per_s_per_chip=tok_per_chip, target_mfu=target_mfu, peak_flops=peak)


# HBM per chip of the slices the paper recipes target (16 chips each).
SLICE_HBM_GIB = {"v4-32": 32.0, "v5e-16": 16.0}


@dataclasses.dataclass
class DecodePlan:
  """What `plan_decode` found for the eval stage's beam search (bytes per device).

  Attributes:
    mesh_shape: `{"data": ., "fsdp": ., "tensor": .}` (the training mesh, which eval uses).
    num_params: parameter count.
    dtype: the params' dtype (`train.compute_dtype`, what eval restores them in).
    batch: users per beam-search call (`eval.batch_size` rounded up to data x fsdp).
    prompt_len: padded prompt tokens (the largest bucket by default).
    num_beams: beams per user.
    num_items: catalogue size of the trie.
    param_bytes: params per device, from their training shardings.
    param_bytes_replicated_f32: what every device held when eval re-read the float32
      HF export replicated (the former handoff), for comparison.
    argument_bytes, output_bytes, temp_bytes, code_bytes: `compiled.memory_analysis()`.
    peak_bytes: argument + output + temp.
  """
  mesh_shape: dict[str, int]
  num_params: int
  dtype: str
  batch: int
  prompt_len: int
  num_beams: int
  num_items: int
  param_bytes: int
  param_bytes_replicated_f32: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  code_bytes: int
  peak_bytes: int


def plan_decode(config: ml_collections.ConfigDict, mesh_shape: Mapping[str, int], *,
                prompt_len: int | None = None, batch: int | None = None,
                num_beams: int | None = None, num_items: int = 20956,
                vocab_size: int | None = None, devices: Sequence[Any] | None = None
                ) -> DecodePlan:
  """Lowers and compiles the eval stage's constrained beam search; nothing is allocated.

  The params are `jax.ShapeDtypeStruct`s in `train.compute_dtype` with the shardings the
  training rules give them (as `lcrec_jax.eval.restore` places them); the prompt batch is
  split over data x fsdp (as `lcrec_jax.eval.evaluate.Decoder` does); the trie is built
  for `num_items` items with random distinct codes of `c.rqvae.num_levels` x
  `c.rqvae.codebook_size` (default 20,956: Arts, the largest of the paper's datasets).

  Args:
    config: a recipe (`c.model`, `c.train.compute_dtype`, `c.mesh.axis_rules`,
      `c.eval`, `c.tasks.buckets`, `c.rqvae`).
    mesh_shape: `{"data": ., "fsdp": ., "tensor": .}`.
    prompt_len: padded prompt length (default: the largest of `c.tasks.buckets`).
    batch: users per call (default `c.eval.batch_size`), rounded up to data x fsdp.
    num_beams: beams per user (default `c.eval.num_beams`).
    num_items: catalogue size.
    vocab_size: override the vocabulary (default: preset + item-code tokens).
    devices: mesh devices (default the first `prod(mesh_shape)` of `jax.devices()`).
  """
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lcrec_jax.decode.beam_search import constrained_beam_search
  from lcrec_jax.decode.trie import build_trie
  from lcrec_jax.index.item_index import ItemIndex
  from lcrec_jax.llm.model import Llama
  from lcrec_jax.train import mesh as mesh_lib
  from lcrec_jax.train import state as state_lib
  # pylint: enable=g-import-not-at-top
  config = _resolved(config)
  shape, mesh, rules = _mesh(config, mesh_shape, devices)
  ways = shape[0] * shape[1]
  batch = int(batch or config.eval.batch_size)
  batch = -(-batch // ways) * ways
  prompt_len = int(prompt_len or max(config.tasks.buckets))
  num_beams = int(num_beams or config.eval.num_beams)
  dtype = jnp.dtype(config.train.compute_dtype)

  cfg = model_config_for_plan(config, vocab_size)
  model = Llama(cfg)
  boxed = state_lib.abstract_boxed_params(model, np.zeros((1, 8), np.int32))
  shardings = mesh_lib.param_shardings(boxed, mesh, rules)
  params = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(
          x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=sh),
      nn.unbox(boxed), shardings)
  levels, k = int(config.rqvae.num_levels), int(config.rqvae.codebook_size)
  rng = np.random.default_rng(0)
  codes = np.unique(rng.integers(0, k, (2 * num_items, levels)), axis=0)
  codes = rng.permutation(codes)[:num_items]
  index = ItemIndex(tuple(str(i) for i in range(len(codes))), codes, (k,) * levels)
  rep = mesh_lib.replicated(mesh)
  trie = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                      build_trie(index))
  code_ids = jax.ShapeDtypeStruct((levels, k), jnp.int32, sharding=rep)
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh_lib.BATCH_AXES))
  prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=row)
  compiled = constrained_beam_search.lower(
      model, params, prompt, prompt, code_ids, trie, None, num_beams=num_beams,
      mode="trie").compile()
  mem = compiled.memory_analysis()
  arg, out, tmp = (int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                   int(mem.temp_size_in_bytes))
  return DecodePlan(
      mesh_shape=dict(zip(mesh_lib.MESH_AXES, shape)), num_params=cfg.num_params(),
      dtype=str(dtype), batch=batch, prompt_len=prompt_len, num_beams=num_beams,
      num_items=len(codes), param_bytes=_sharded_bytes(params),
      param_bytes_replicated_f32=4 * cfg.num_params(), argument_bytes=arg,
      output_bytes=out, temp_bytes=tmp,
      code_bytes=int(getattr(mem, "generated_code_size_in_bytes", 0)),
      peak_bytes=arg + out + tmp)


def format_decode_plan(p: DecodePlan) -> str:
  """Human-readable report of a `DecodePlan`, with the fit on the paper's slices."""
  g = lambda b: f"{b / GIB:8.3f} GiB"
  mesh = ", ".join(f"{k}={v}" for k, v in p.mesh_shape.items())
  n_dev = math.prod(p.mesh_shape.values())
  fits = ", ".join(f"{name} ({hbm:.0f} GiB/chip): "
                   f"{'fits' if p.peak_bytes <= hbm * GIB else 'does NOT fit'}"
                   for name, hbm in SLICE_HBM_GIB.items())
  return "\n".join([
      f"eval beam search, mesh ({mesh}) = {n_dev} devices; {p.num_params / 1e9:.3f} B params "
      f"in {p.dtype}; {p.batch} users x {p.num_beams} beams, prompts of {p.prompt_len} "
      f"tokens, trie of {p.num_items} items",
      "per device:",
      f"  params (sharded as in training) {g(p.param_bytes)}   (float32 replicated, the "
      f"former HF-export handoff: {g(p.param_bytes_replicated_f32)})",
      f"  compiled arguments       {g(p.argument_bytes)}",
      f"  compiled outputs         {g(p.output_bytes)}",
      f"  temporaries (KV cache, activations) {g(p.temp_bytes)}",
      f"  peak estimate            {g(p.peak_bytes)}",
      f"  {fits}",
  ])


def format_plan(p: Plan) -> str:
  """Human-readable report of a `Plan`."""
  g = lambda b: f"{b / GIB:8.3f} GiB"
  mesh = ", ".join(f"{k}={v}" for k, v in p.mesh_shape.items())
  n_dev = math.prod(p.mesh_shape.values())
  lines = [
      f"mesh ({mesh}) = {n_dev} devices; {p.num_params / 1e9:.3f} B params; global batch "
      f"{p.global_batch} x {p.seq_len} tokens, {p.grad_accum_steps} micro-batch(es)",
      "per device:",
      f"  params (float32 master)  {g(p.param_bytes)}   (global {g(p.param_bytes_global)})",
      f"  optimizer state          {g(p.opt_state_bytes)}",
      f"  batch                    {g(p.batch_bytes)}",
      f"  compiled arguments       {g(p.argument_bytes)}",
      f"  compiled outputs         {g(p.output_bytes)}   (aliased to donated inputs "
      f"{g(p.alias_bytes)})",
      f"  temporaries (activations, grads, buffers) {g(p.temp_bytes)}",
      f"  peak estimate            {g(p.peak_bytes)}",
      f"FLOPs per step: model 6N+12LdT {p.model_flops_per_step:.4g} (global); XLA cost "
      f"analysis {p.xla_flops:.4g} per device (loop bodies counted once)",
  ]
  if p.peak_flops > 0:
    lines.append(f"at MFU {p.target_mfu:.0%} of {p.peak_flops:.4g} FLOP/s per chip: "
                 f"{p.tokens_per_s_per_chip:,.0f} tokens/s per chip, "
                 f"{p.tokens_per_s_per_chip * n_dev / p.tokens_per_step:.3f} steps/s")
  else:
    lines.append("tokens/s per chip: pass --peak_flops (bf16 per chip: v4 275e12, v5e 197e12, "
                 "v5p 459e12, v6e 918e12)")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  """CLI entry point (see the module docstring)."""
  del argv
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  flags = absl_flags.FLAGS
  mesh_shape = parse_mesh(flags.mesh)
  if flags.step == "eval":
    print(format_decode_plan(plan_decode(flags.config, mesh_shape,
                                         prompt_len=flags.seq_len or None,
                                         batch=flags.batch_size or None)))
    return
  p = plan_train_step(flags.config, mesh_shape, seq_len=flags.seq_len,
                      global_batch=flags.batch_size or None,
                      grad_accum_steps=flags.grad_accum_steps or None,
                      target_mfu=flags.mfu,
                      peak_flops=flags.peak_flops if flags.peak_flops > 0 else None)
  print(format_plan(p))


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "recipe file, e.g. configs/lcrec_arts_llama7b.py")
  flags.DEFINE_string("mesh", "fsdp=8", "mesh axis sizes, e.g. 'fsdp=8' or "
                      "'data=2,fsdp=4,tensor=1' (unnamed axes are 1)")
  flags.DEFINE_enum("step", "train", ["train", "eval"], "what to plan: the train step, or "
                    "the eval stage's beam search (--seq_len = padded prompt length, "
                    "--batch_size = users per call, 0 = the recipe's eval.batch_size)")
  flags.DEFINE_integer("devices", 0, "simulated CPU devices (0 = the mesh's size)")
  flags.DEFINE_integer("seq_len", 512, "tokens per example")
  flags.DEFINE_integer("batch_size", 0, "global batch (0 = the recipe's train.batch_size)")
  flags.DEFINE_integer("grad_accum_steps", 0, "micro-batches (0 = the recipe's)")
  flags.DEFINE_float("mfu", 0.4, "target model FLOPs utilisation")
  flags.DEFINE_float("peak_flops", 0.0, "peak FLOP/s per chip (0 = the recipe's "
                     "train.peak_flops_per_device)")
  return flags.FLAGS


def _set_simulated_devices(argv: Sequence[str]) -> None:
  """Sets the CPU device count from --devices / --mesh before the backend starts."""
  n = 0
  mesh = "fsdp=8"
  for a in argv:
    if a.startswith("--devices="):
      n = int(a.split("=", 1)[1])
    elif a.startswith("--mesh="):
      mesh = a.split("=", 1)[1]
  if n <= 0:
    n = math.prod(parse_mesh(mesh).values())
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", n)
