"""Flax Linen LLaMA decoder: RMSNorm, half-split RoPE, GQA, SwiGLU, KV cache, LoRA hook.

Parameter tree (`scan_layers=False`; with `scan_layers=True` the layers are one
module "layers" whose leaves carry a leading `[L]` axis):

  embed_tokens/embedding              [V, E]        ("vocab", "embed")
  layers_{i}/input_layernorm/scale    [E]           ("norm",)
  layers_{i}/self_attn/q_proj/kernel  [E, H, D]     ("embed", "heads", "head_dim")
  layers_{i}/self_attn/k_proj/kernel  [E, KV, D]    ("embed", "kv_heads", "head_dim")
  layers_{i}/self_attn/v_proj/kernel  [E, KV, D]    ("embed", "kv_heads", "head_dim")
  layers_{i}/self_attn/o_proj/kernel  [H, D, E]     ("heads", "head_dim", "embed")
  layers_{i}/post_attention_layernorm/scale [E]     ("norm",)
  layers_{i}/mlp/{gate,up}_proj/kernel [E, F]       ("embed", "mlp")
  layers_{i}/mlp/down_proj/kernel     [F, E]        ("mlp", "embed")
  norm/scale                          [E]           ("norm",)
  lm_head/kernel                      [E, V]        ("embed", "vocab")   (absent if tied)

Activations are annotated with `nn.with_logical_constraint` ("activation_batch",
"activation_length", "activation_embed", "activation_heads", "activation_kv_heads",
"activation_mlp", "activation_vocab"); without logical axis rules in scope these are
no-ops. RoPE uses HF's rotate_half layout, so HF checkpoints load without permutation.

LoRA adapters (see `lora.py`) can be applied on the fly by passing `lora=` to
`__call__`: each targeted projection adds `scale * (x @ A) @ B`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcrec_jax.llm.config import LlamaConfig
from lcrec_jax.llm.kv_cache import BeamKVCache, BeamLayerKV, KVCache, LayerKV

Array = jax.Array
_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite "minus infinity" for masks


def _constrain(x: Array, names: tuple[str | None, ...]) -> Array:
  return nn.with_logical_constraint(x, names)


# --- rotary embeddings -----------------------------------------------------------------


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies `[head_dim // 2]` float32, with the configured scaling.

  Follows HF's float32 arithmetic (`1 / theta ** (arange(0, D, 2) / D)`), then linear
  or llama3 (LLaMA 3.1) scaling.
  """
  d = cfg.head_dim
  exps = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
  inv = (1.0 / (np.float32(cfg.rope_theta) ** exps)).astype(np.float32)
  rs = cfg.rope_scaling
  if rs is None:
    return inv
  if rs.rope_type == "linear":
    return (inv / np.float32(rs.factor)).astype(np.float32)
  # llama3: long wavelengths divided by factor, short kept, smooth in between.
  old = float(rs.original_max_position_embeddings)
  low_wl = old / rs.low_freq_factor
  high_wl = old / rs.high_freq_factor
  wavelen = 2 * np.pi / inv
  scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
  smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  medium = (wavelen >= high_wl) & (wavelen <= low_wl)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: LlamaConfig, positions: Array) -> tuple[Array, Array]:
  """cos and sin tables `[B, T, head_dim]` float32 for integer positions `[B, T]`."""
  inv = jnp.asarray(rope_inv_freq(cfg))
  freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates `x [B, T, heads, D]` with tables `[B, T, D]` (HF rotate_half layout)."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rot * sin[:, :, None, :]
  return out.astype(x.dtype)


# --- layers ------------------------------------------------------------------------------


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned scale (statistics in float32)."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`x [..., E]` -> `[..., E]` in the compute dtype."""
    cfg = self.config
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), cfg.weight_dtype)
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(var + cfg.rms_norm_eps)).astype(cfg.compute_dtype)
    return y * scale.astype(cfg.compute_dtype)


class Projection(nn.Module):
  """Bias-free linear map contracting the trailing `len(in_shape)` input dims.

  Kernel `[*in_shape, *out_shape]`; an optional LoRA adapter
  `{"lora_a": [*in_shape, r], "lora_b": [r, *out_shape]}` adds `scale * (x A) B`.
  """
  config: LlamaConfig
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]

  @nn.compact
  def __call__(self, x: Array, lora: dict[str, Array] | None = None,
               lora_scale: Array | float = 0.0) -> Array:
    """`x [..., *in_shape]` -> `[..., *out_shape]`."""
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        self.in_shape + self.out_shape, cfg.weight_dtype)
    dt = cfg.compute_dtype
    n = len(self.in_shape)
    contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
    x = x.astype(dt)
    y = jax.lax.dot_general(x, kernel.astype(dt), (contract, ((), ())))
    if lora is not None:
      a = lora["lora_a"].astype(dt)
      b = lora["lora_b"].astype(dt)
      xa = jax.lax.dot_general(x, a, (contract, ((), ())))
      y = y + jnp.asarray(lora_scale, dt) * jnp.tensordot(xa, b, axes=1)
    return y


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional per-layer KV cache."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, ctx: dict[str, Array], layer_cache, lora):
    """Attends.

    Args:
      x: `[B, T, E]` normed hidden states.
      ctx: shared tensors: cos/sin `[B, T, D]`, allowed `[B, T, S]` bool, index `[]`,
        lora_scale `[]`; with a beam cache also prompt_allowed `[U, P]` bool.
      layer_cache: None, a `kv_cache.LayerKV` (k, v each `[B, S, KV, D]`), or a
        `kv_cache.BeamLayerKV`: prompt keys/values `[U, P, KV, D]` shared by the `B // U`
        consecutive rows of each of U users, and per-row keys/values `[B, S, KV, D]` of
        generated tokens.
      lora: None or this module's adapters.

    Returns:
      (`[B, T, E]`, the new `LayerKV` (k, v with the T tokens written) or None).
    """
    cfg = self.config
    e, h, kv, d = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   cfg.head_dim)
    lora = lora or {}
    sc = ctx["lora_scale"]
    proj = lambda name, ins, outs, axes: Projection(cfg, ins, outs, axes, name=name)
    q = proj("q_proj", (e,), (h, d), ("embed", "heads", "head_dim"))(x, lora.get("q_proj"), sc)
    k = proj("k_proj", (e,), (kv, d), ("embed", "kv_heads", "head_dim"))(x, lora.get("k_proj"), sc)
    v = proj("v_proj", (e,), (kv, d), ("embed", "kv_heads", "head_dim"))(x, lora.get("v_proj"), sc)
    q = _constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
    k = _constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
    v = _constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", None))
    q = apply_rope(q, ctx["cos"], ctx["sin"])
    k = apply_rope(k, ctx["cos"], ctx["sin"])

    new_cache = None
    prompt_kv = None
    if layer_cache is not None:
      if isinstance(layer_cache, BeamLayerKV):
        prompt_kv = (layer_cache.prompt_k.astype(cfg.compute_dtype),
                     layer_cache.prompt_v.astype(cfg.compute_dtype))
      elif not isinstance(layer_cache, LayerKV):
        raise TypeError(f"Attention: layer_cache must be a LayerKV or BeamLayerKV, got "
                        f"{type(layer_cache).__name__}")
      idx = ctx["index"]
      ck, cv = layer_cache.k, layer_cache.v
      ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, idx, 0, 0))
      cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, idx, 0, 0))
      new_cache = LayerKV(k=ck, v=cv)
      k, v = ck.astype(cfg.compute_dtype), cv.astype(cfg.compute_dtype)

    b, t = q.shape[:2]
    if prompt_kv is None:
      qg = q.reshape(b, t, kv, cfg.num_groups, d)
      scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                          preferred_element_type=jnp.float32) * (d ** -0.5)
      allowed = ctx["allowed"][:, None, None, :, :]
      scores = jnp.where(allowed, scores, _NEG)
      probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
      out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)
    else:
      out = _split_attention(q, k, v, prompt_kv, ctx["allowed"], ctx["prompt_allowed"],
                             cfg.num_groups, cfg.compute_dtype)
    out = _constrain(out, ("activation_batch", "activation_length", "activation_heads", None))
    y = proj("o_proj", (h, d), (e,), ("heads", "head_dim", "embed"))(out, lora.get("o_proj"), sc)
    return y, new_cache


def _split_attention(q: Array, k: Array, v: Array, prompt_kv: tuple[Array, Array],
                     allowed: Array, prompt_allowed: Array, groups: int, dtype) -> Array:
  """Attention over a shared prompt cache plus per-row generated slots, one softmax.

  Args:
    q: `[B, T, H, D]` queries; rows `[u * W, (u + 1) * W)` belong to user u (B = U * W).
    k: `[B, S, KV, D]` keys of the generated slots (per row).
    v: `[B, S, KV, D]` values of the generated slots.
    prompt_kv: prompt keys and values, each `[U, P, KV, D]`, shared by a user's W rows.
    allowed: `[B, T, S]` bool, which generated slots each query sees.
    prompt_allowed: `[U, P]` bool, the real prompt slots.
    groups: query heads per kv head.
    dtype: compute dtype of the output.

  Returns:
    `[B, T, H, D]`: softmax over the concatenated prompt and generated scores, so the
    result equals attention over a cache holding the prompt copied into every row.
  """
  pk, pv = prompt_kv
  b, t, h, d = q.shape
  users, p, kv = pk.shape[0], pk.shape[1], pk.shape[2]
  w = b // users
  qg = q.reshape(users, w, t, kv, groups, d)
  kg, vg = k.reshape(users, w, -1, kv, d), v.reshape(users, w, -1, kv, d)
  scale = d ** -0.5
  s_prompt = jnp.einsum("uwtkgd,upkd->uwkgtp", qg, pk,
                        preferred_element_type=jnp.float32) * scale
  s_gen = jnp.einsum("uwtkgd,uwskd->uwkgts", qg, kg,
                     preferred_element_type=jnp.float32) * scale
  s_prompt = jnp.where(prompt_allowed[:, None, None, None, None, :], s_prompt, _NEG)
  s_gen = jnp.where(allowed.reshape(users, w, 1, 1, t, -1), s_gen, _NEG)
  probs = jax.nn.softmax(jnp.concatenate([s_prompt, s_gen], axis=-1), axis=-1).astype(dtype)
  out = (jnp.einsum("uwkgtp,upkd->uwtkgd", probs[..., :p], pv)
         + jnp.einsum("uwkgts,uwskd->uwtkgd", probs[..., p:], vg))
  return out.reshape(b, t, h, d)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, lora, lora_scale) -> Array:
    """`x [B, T, E]` -> `[B, T, E]`."""
    cfg = self.config
    e, f = cfg.hidden_size, cfg.intermediate_size
    lora = lora or {}
    gate = Projection(cfg, (e,), (f,), ("embed", "mlp"), name="gate_proj")(
        x, lora.get("gate_proj"), lora_scale)
    up = Projection(cfg, (e,), (f,), ("embed", "mlp"), name="up_proj")(
        x, lora.get("up_proj"), lora_scale)
    hmid = nn.silu(gate) * up
    hmid = _constrain(hmid, ("activation_batch", "activation_length", "activation_mlp"))
    return Projection(cfg, (f,), (e,), ("mlp", "embed"), name="down_proj")(
        hmid, lora.get("down_proj"), lora_scale)


class DecoderLayer(nn.Module):
  """Pre-norm decoder layer. Scan-compatible signature: (x, ctx, cache, lora) -> (x, cache)."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, ctx: dict[str, Array], layer_cache, lora):
    """`x [B, T, E]` -> (`[B, T, E]`, new layer cache or None)."""
    cfg = self.config
    lora = lora or {}
    h, new_cache = Attention(cfg, name="self_attn")(
        RMSNorm(cfg, name="input_layernorm")(x), ctx, layer_cache, lora.get("self_attn"))
    x = x + h
    x = x + MLP(cfg, name="mlp")(
        RMSNorm(cfg, name="post_attention_layernorm")(x), lora.get("mlp"), ctx["lora_scale"])
    x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, new_cache


_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(nn.Module):
  """LLaMA causal LM.

  Attributes:
    config: a `LlamaConfig`.
  """
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
        dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    block = DecoderLayer
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, 0, 0), length=cfg.num_hidden_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    else:
      self.layers = [block(cfg) for _ in range(cfg.num_hidden_layers)]
    self.norm = RMSNorm(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = Projection(cfg, (cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"))

  def logits(self, hidden: Array) -> Array:
    """Output head: final-normed hidden `[..., E]` -> logits `[..., V]` (compute dtype)."""
    cfg = self.config
    if cfg.tie_word_embeddings:
      out = self.embed_tokens.attend(hidden.astype(cfg.compute_dtype))
    else:
      out = self.lm_head(hidden)
    if out.ndim == 3:
      out = _constrain(out, ("activation_batch", "activation_length", "activation_vocab"))
    return out

  def __call__(self, tokens: Array, *, positions: Array | None = None,
               attention_mask: Array | None = None, cache: KVCache | None = None,
               return_hidden: bool = False, lora: Any = None,
               segment_ids: Array | None = None):
    """Runs the decoder.

    Args:
      tokens: `[B, T]` int32 ids.
      positions: `[B, T]` int32 RoPE positions; default: running count of real tokens
        (`cumsum(attention_mask) - 1`, offset by `cache.next_pos`), which is right for
        left and right padding.
      attention_mask: `[B, T]`, 1 for real tokens, 0 for padding; default all ones.
      cache: a `KVCache`; the T tokens are written at slots `[cache.index, +T)` and
        attend to every earlier real slot. Or a `BeamKVCache` (B = users * beams): the
        tokens go to its per-beam slots and also attend to their user's prompt slots.
      return_hidden: return the final-normed hidden states `[B, T, E]` instead of
        logits (use `method=Llama.logits` on the positions you need).
      lora: optional `lora.LoraParams` applied on the fly (base params unchanged).
      segment_ids: optional `[B, T]` int32 ids of the packed examples of each row
        (`tasks.batching` packing; 0 = padding): a token attends only to earlier tokens
        of its own segment (block-diagonal causal). Pass per-segment `positions` with
        it. Not with a cache.

    Returns:
      (logits `[B, T, V]` or hidden `[B, T, E]`, updated cache or None). Outputs at
      padding positions are finite but meaningless.
    """
    cfg = self.config
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    if attention_mask is None:
      mask = jnp.ones((b, t), jnp.bool_)
    else:
      mask = jnp.asarray(attention_mask).astype(jnp.bool_)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
      if cache is not None:
        positions = positions + cache.next_pos[:, None]
    positions = jnp.asarray(positions, jnp.int32)

    beam_cache = isinstance(cache, BeamKVCache)
    if cache is None:
      index = jnp.zeros((), jnp.int32)
      key_mask = mask
      key_slots = jnp.arange(t)
    else:
      index = cache.index
      key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
      key_slots = jnp.arange(cache.max_len)
    query_slots = index + jnp.arange(t)
    allowed = key_mask[:, None, :] & (key_slots[None, None, :] <= query_slots[None, :, None])
    if segment_ids is not None:
      if cache is not None:
        raise ValueError("Llama: segment_ids (packed rows) cannot be used with a cache")
      seg = jnp.asarray(segment_ids, jnp.int32)
      allowed = allowed & (seg[:, :, None] == seg[:, None, :])
    cos, sin = rope_cos_sin(cfg, positions)
    lora_scale = 0.0 if lora is None else lora.scale
    adapters = None if lora is None else lora.adapters
    ctx = dict(cos=cos, sin=sin, allowed=allowed, index=index,
               lora_scale=jnp.asarray(lora_scale, jnp.float32))
    if beam_cache:
      ctx["prompt_allowed"] = cache.prompt_mask

    x = self.embed_tokens(tokens)
    x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    new_cache = None
    stacked = None if cache is None else cache.layers()  # LayerKV | BeamLayerKV, [L, ...]
    if cfg.scan_layers:
      layer_lora = None if adapters is None else adapters.get("layers")
      x, kv = self.layers(x, ctx, stacked, layer_lora)
      if cache is not None:
        new_k, new_v = kv.k, kv.v
    else:
      ks, vs = [], []
      for i, layer in enumerate(self.layers):
        lc = None if stacked is None else jax.tree.map(lambda a, i=i: a[i], stacked)
        ll = None if adapters is None else adapters.get(f"layers_{i}")
        x, kv = layer(x, ctx, lc, ll)
        if cache is not None:
          ks.append(kv.k)
          vs.append(kv.v)
      if cache is not None:
        new_k, new_v = jnp.stack(ks), jnp.stack(vs)
    if cache is not None:
      new_cache = cache._replace(
          k=new_k, v=new_v, mask=key_mask, index=index + t,
          next_pos=cache.next_pos + jnp.sum(mask, axis=1).astype(jnp.int32))

    x = self.norm(x)
    if return_hidden:
      return x, new_cache
    return self.logits(x), new_cache


# --- helpers -----------------------------------------------------------------------------


def init_params(cfg: LlamaConfig, key: Array, boxed: bool = False) -> dict[str, Any]:
  """Random parameters: normal(initializer_range) kernels and embeddings, unit norms.

  Values are drawn on the host with numpy (seeded from `key`): compiling the random
  init of a deep model with XLA takes far longer than drawing it. For sharded init of
  a large model use `Llama(cfg).init` under `jax.jit` with out_shardings instead.

  Args:
    cfg: model config.
    key: PRNG key.
    boxed: keep the `nn.LogicallyPartitioned` boxes (for sharding specs).

  Returns:
    The "params" collection, jax arrays of `cfg.param_dtype`.
  """
  shapes = jax.eval_shape(
      lambda k: Llama(cfg).init(k, jnp.zeros((1, 2), jnp.int32))["params"], key)
  seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).tolist()
  rng = np.random.default_rng(seed)
  dt = cfg.weight_dtype

  def draw(path, leaf):
    names = [getattr(p, "key", str(p)) for p in path]
    if names[-1] == "scale" or (len(names) > 1 and names[-2] == "scale"):
      return jnp.ones(leaf.shape, dt)
    w = rng.standard_normal(leaf.shape, dtype=np.float32) * cfg.initializer_range
    return jnp.asarray(w.astype(dt))

  params = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes))
  if boxed:
    return jax.tree.map(lambda box, v: box.replace_boxed(v), shapes, params,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return params


def logical_axes(cfg: LlamaConfig) -> dict[str, Any]:
  """Pytree of `PartitionSpec`s of logical axis names, matching `init_params(cfg, key)`."""
  shapes = jax.eval_shape(
      lambda k: Llama(cfg).init(k, jnp.zeros((1, 2), jnp.int32))["params"],
      jax.random.PRNGKey(0))
  return nn.get_partition_spec(shapes)
