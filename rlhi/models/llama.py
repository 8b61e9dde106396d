"""Llama-family decoder (Llama 3.x, Qwen2, Mistral) in Flax Linen.

Pure-functional: parameters are plain pytrees created by `init_params` and
passed to `forward`; the KV cache is an explicit `KVCache` pytree that goes in
and comes back out, so no mutable Flax collections leak to callers.

Parameter layout mirrors the Hugging Face module names (so `hf_io` is a table,
not a puzzle)::

  embed_tokens/embedding                 [vocab, embed]
  layers/input_layernorm/scale           [layers, embed]           (scanned)
  layers/self_attn/q_proj/kernel         [layers, embed, heads, head_dim]
  layers/self_attn/q_proj/bias           [layers, heads, head_dim] (qkv_bias)
  layers/self_attn/{k,v}_proj/kernel     [layers, embed, kv_heads, head_dim]
  layers/self_attn/o_proj/kernel         [layers, heads, head_dim, embed]
  layers/post_attention_layernorm/scale  [layers, embed]
  layers/mlp/{gate,up}_proj/kernel       [layers, embed, mlp]
  layers/mlp/down_proj/kernel            [layers, mlp, embed]
  norm/scale                             [embed]
  lm_head/kernel                         [embed, vocab]            (untied)

With `scan_layers=False` the layers are `layers_0`, `layers_1`, ... without the
leading `layers` axis.

Typical use::

  config = llama.get_config("tiny")
  params = llama.init_params(config, jax.random.key(0))
  hidden = llama.forward(params, config, tokens, positions, segment_ids)
  logps = llama.token_logprobs(params, config, tokens, positions, segment_ids,
                               targets, chunk_size=128)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from rlhi import sharding
from rlhi.models import families
from rlhi.models.llama_config import REMAT_POLICIES, LlamaConfig, RopeScaling  # pylint: disable=unused-import  (re-exported)

Array = jax.Array
Params = Any  # A nested dict of arrays.


# ---------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------


# The named sizes (tiny, small, llama3_8b, ...) are declared by their model families
# (rlhi/models/families/), once, with the training defaults configs/common.py uses.
# Built-in families only: the names there are when this module is imported.
CONFIG_NAMES = tuple(families.named_sizes())


def get_config(name: str, **overrides: Any) -> LlamaConfig:
  """Returns the named config, with `dataclasses.replace` overrides applied."""
  sizes = families.named_sizes()
  if name not in sizes:
    raise ValueError(f"Unknown model config {name!r}; known: {tuple(sizes)}")
  return dataclasses.replace(sizes[name].config, **overrides)


# ---------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------


def _constrain(x: Array, names: tuple[str | None, ...]) -> Array:
  """Logical sharding constraint; a no-op outside a mesh + rules context."""
  return nn.with_logical_constraint(x, names)


def _dense(x: Array, kernel: Array, in_ndim: int, flatten: bool,
           dtype: jnp.dtype) -> Array:
  """Contracts the last `in_ndim` dims of x with the first of kernel.

  x: [*batch, *in], kernel: [*in, *out] -> [*batch, *out], accumulated in
  float32 and returned in `dtype`.
  """
  batch_shape = x.shape[:x.ndim - in_ndim]
  in_shape, out_shape = kernel.shape[:in_ndim], kernel.shape[in_ndim:]
  x = x.astype(dtype)
  kernel = kernel.astype(dtype)
  if flatten:
    # A plain 2-D matmul: much faster forward+backward on XLA:CPU.
    y = jnp.dot(x.reshape(math.prod(batch_shape), math.prod(in_shape)),
                kernel.reshape(math.prod(in_shape), math.prod(out_shape)),
                preferred_element_type=jnp.float32)
    y = y.reshape(batch_shape + out_shape)
  else:
    contract = (tuple(range(x.ndim - in_ndim, x.ndim)), tuple(range(in_ndim)))
    y = lax.dot_general(x, kernel, (contract, ((), ())),
                        preferred_element_type=jnp.float32)
  return y.astype(dtype)


def _dense_params(module: nn.Module, cfg: LlamaConfig, in_shape, features,
                  axes, use_bias: bool) -> tuple[Array, Array | None]:
  """Creates `kernel` [*in_shape, *features] (and `bias` [*features])."""
  kernel = module.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                   tuple(axes)),
      tuple(in_shape) + tuple(features), cfg.params_dtype)
  bias = None
  if use_bias:
    bias = module.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                     tuple(axes[len(in_shape):])),
        tuple(features), cfg.params_dtype)
  return kernel, bias


def _apply_dense(x: Array, kernel: Array, bias: Array | None, in_ndim: int,
                 cfg: LlamaConfig, out_dtype: Any = None) -> Array:
  y = _dense(x, kernel, in_ndim, cfg.flatten, cfg.compute_dtype)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y.astype(out_dtype or cfg.compute_dtype)


class Dense(nn.Module):
  """Dense layer with a multi-dimensional, logically annotated kernel.

  Kernel shape is `in_shape + features`, where `in_shape` is the last `in_ndim`
  dims of the input; `axes` names every kernel dim.
  """

  config: LlamaConfig
  features: tuple[int, ...]
  axes: tuple[str, ...]
  in_ndim: int = 1
  use_bias: bool = False
  out_dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = _dense_params(
        self, self.config, x.shape[x.ndim - self.in_ndim:], self.features,
        self.axes, self.use_bias)
    return _apply_dense(x, kernel, bias, self.in_ndim, self.config,
                        self.out_dtype)


class DenseWeights(nn.Module):
  """The parameters of a Dense layer, returned instead of applied, so that
  several projections of the same input can run as one matmul."""

  config: LlamaConfig
  features: tuple[int, ...]
  axes: tuple[str, ...]
  use_bias: bool = False

  @nn.compact
  def __call__(self, in_shape: tuple[int, ...]):
    return _dense_params(self, self.config, in_shape, self.features,
                         self.axes, self.use_bias)


def _fused_dense(x: Array, weights, cfg: LlamaConfig) -> list[Array]:
  """Applies several [E, *out_i] projections of x [..., E] as one matmul.

  Used when decoding: the concatenated kernel is loop-invariant, so XLA
  hoists it out of the decode loop, and one [B, E] x [E, sum] matmul beats
  several small ones. Training keeps separate matmuls (no weight copies, and
  no resharding of concatenated tensor-parallel kernels).
  """
  e = x.shape[-1]
  kernel = jnp.concatenate([k.reshape(e, -1) for k, _ in weights], axis=1)
  bias = None
  if weights[0][1] is not None:
    bias = jnp.concatenate([b.reshape(-1) for _, b in weights])
  y = _apply_dense(x, kernel, bias, 1, cfg)
  sizes = [math.prod(k.shape[1:]) for k, _ in weights]
  parts = jnp.split(y, np.cumsum(sizes)[:-1], axis=-1)
  return [p.reshape(x.shape[:-1] + k.shape[1:])
          for p, (k, _) in zip(parts, weights)]


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, scaled in the compute dtype (as HF does)."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                              ("embed",)),
        (cfg.hidden_size,), cfg.params_dtype)
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = (xf * lax.rsqrt(var + cfg.norm_eps)).astype(cfg.compute_dtype)
    return y * scale.astype(cfg.compute_dtype)


def rope_inv_frequencies(config: LlamaConfig) -> np.ndarray:
  """Inverse RoPE frequencies [head_dim // 2], incl. Llama-3 scaling.

  Computed in float32 like HF `_compute_llama3_parameters`, so that converted
  checkpoints reproduce HF logits.
  """
  dim = config.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
  inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(
      np.float32)
  rs = config.rope_scaling
  if rs is None:
    return inv_freq
  old_len = rs.original_max_position_embeddings
  low_freq_wavelen = old_len / rs.low_freq_factor
  high_freq_wavelen = old_len / rs.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
  smooth = ((old_len / wavelen - rs.low_freq_factor)
            / (rs.high_freq_factor - rs.low_freq_factor))
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: Array, config: LlamaConfig) -> tuple[Array, Array]:
  """positions [B, T] -> (cos, sin), each [B, T, head_dim] float32."""
  inv_freq = jnp.asarray(rope_inv_frequencies(config))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  # HF's rotate_half layout: frequencies repeated over the two halves.
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [B, T, N, D] rotated by per-position (cos, sin) [B, T, D]."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def attention_mask(q_slots: Array, k_slots: Array, q_segments: Array,
                   k_segments: Array, sliding_window: int | None,
                   q_responses: Array | None = None,
                   k_responses: Array | None = None) -> Array:
  """Causal + segment mask [B, T, S] (True = may attend).

  Slots are indices along the (cached) sequence and order the tokens; segment
  id 0 marks padding and never attends or is attended to.

  Response ids (shared-prompt packing, rlhi/inputs/batches.py `pack`): within a segment,
  response id 0 is the shared prompt and 1, 2 the two responses laid out after
  it; a token sees the prompt and its own response, never the other response.

  Args:
    q_slots: [T] or [B, T] int.
    k_slots: [S] or [B, S] int.
    q_segments: [B, T] int.
    k_segments: [B, S] int.
    sliding_window: if set, a query sees only the last `sliding_window` keys.
    q_responses: [B, T] int or None (no responses: plain causal segments).
    k_responses: [B, S] int or None.
  """
  q_slots = jnp.broadcast_to(q_slots, q_segments.shape)
  k_slots = jnp.broadcast_to(k_slots, k_segments.shape)
  diff = q_slots[:, :, None] - k_slots[:, None, :]
  mask = diff >= 0
  if sliding_window is not None:
    mask &= diff < sliding_window
  mask &= q_segments[:, :, None] == k_segments[:, None, :]
  mask &= k_segments[:, None, :] != 0
  if q_responses is not None:
    mask &= ((k_responses[:, None, :] == 0)
             | (q_responses[:, :, None] == k_responses[:, None, :]))
  return mask


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array,
                          causal_block: int | None = None) -> Array:
  """Grouped-query attention.

  k and v come in the cache layouts, chosen so that both dots are plain
  (non-transposed) batched matmuls over (B, K): no per-step copy of the
  cache, and XLA:CPU runs them ~2x faster than the transposed form.

  With `causal_block`, queries go by blocks of that many rows and block i
  reads keys [0, (i + 1) * causal_block) only: the upper triangle (about half
  the scores, softmax and PV work of a causal pass) is never computed. Exact
  when query i sits at key slot i (a training pass: no cache, T == S), since
  the mask is still applied within each block; the skipped keys are masked for
  every query of the block. Fully masked rows (padding queries) average over
  the block's keys instead of all of them; no valid token reads them.

  Args:
    q: [B, T, H, D] with H a multiple of K.
    k: [B, K, D, S] (keys transposed).
    v: [B, K, S, D].
    mask: [B, T, S] bool.
    causal_block: query rows per block, or None (one block of all T rows).

  Returns:
    [B, T, H, D] in q's dtype. Fully masked rows (padding queries) give a
    uniform average instead of NaN.
  """
  b, t, h, d = q.shape
  kv = k.shape[1]
  g = h // kv
  q = q * jnp.asarray(d ** -0.5, q.dtype)
  q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
  if causal_block is None or causal_block >= t:
    bounds = [(0, t, k.shape[-1])]
  else:
    if k.shape[-1] != t:
      raise ValueError(f"causal_block needs T == S (a pass without cache); got "
                       f"T={t}, S={k.shape[-1]}")
    bounds = [(lo, min(lo + causal_block, t), min(lo + causal_block, t))
              for lo in range(0, t, causal_block)]
  big_neg = jnp.finfo(jnp.float32).min
  outs = []
  for lo, hi, keys in bounds:
    n = hi - lo
    # [B, K, G*n, D]: the query rows of one kv head form one matmul.
    qi = q[:, :, :, lo:hi].reshape(b, kv, g * n, d)
    logits = jnp.einsum("bkqd,bkds->bkqs", qi, k[..., :keys],
                        preferred_element_type=jnp.float32)
    logits = logits.reshape(b, kv, g, n, keys)
    logits = jnp.where(mask[:, None, None, lo:hi, :keys], logits, big_neg)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(b, kv, g * n, keys),
                     v[:, :, :keys])
    outs.append(out.reshape(b, kv, g, n, d))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# ---------------------------------------------------------------------------
# KV cache.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
  """Explicit KV cache; all rows advance together through the slots.

  One array per layer (not a stacked one): a decode step then updates each
  layer's buffer in place and reads it without slicing copies.

  Attributes:
    k: num_layers arrays [batch, kv_heads, head_dim, max_len] (transposed,
      see `dot_product_attention`), compute dtype.
    v: num_layers arrays [batch, kv_heads, max_len, head_dim].
    segment_ids: [batch, max_len] int32 segment id of each filled slot; 0 for
      empty slots and padding.
    index: [] int32, the next slot to be written.
  """

  k: tuple[Array, ...]
  v: tuple[Array, ...]
  segment_ids: Array
  index: Array


K_CACHE_AXES = ("batch", "kv_heads", "head_dim", "length")
V_CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


def init_cache(config: LlamaConfig, batch_size: int, max_len: int) -> KVCache:
  """An empty cache for `max_len` slots (prompt + new tokens)."""
  b, k, d = batch_size, config.num_kv_heads, config.head_dim

  def zeros(shape, axes):
    return _constrain(jnp.zeros(shape, config.compute_dtype), axes)

  # Distinct buffers, so that all of them can be donated.
  return KVCache(
      k=tuple(zeros((b, k, d, max_len), K_CACHE_AXES)
              for _ in range(config.num_layers)),
      v=tuple(zeros((b, k, max_len, d), V_CACHE_AXES)
              for _ in range(config.num_layers)),
      segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
      index=jnp.zeros((), jnp.int32))


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
  """The same cache with `max_len` slots (new slots empty)."""
  extra = max_len - cache.segment_ids.shape[1]
  if extra < 0:
    raise ValueError(f"Cannot shrink a cache of {cache.segment_ids.shape[1]} "
                     f"slots to {max_len}")

  def pad(x, axis, axes):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return _constrain(jnp.pad(x, widths), axes)

  return KVCache(
      k=tuple(pad(k, 3, K_CACHE_AXES) for k in cache.k),
      v=tuple(pad(v, 2, V_CACHE_AXES) for v in cache.v),
      segment_ids=jnp.pad(cache.segment_ids, ((0, 0), (0, extra))),
      index=cache.index)


# ---------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------


class Attention(nn.Module):
  """GQA self-attention with RoPE, writing into the layer's KV cache if given.

  layer_cache: None or (k [B, K, D, S], v [B, K, S, D]); returned updated.
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, x, rope, mask, layer_cache, cache_index):
    cfg = self.config
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    e = (cfg.hidden_size,)
    weights = [
        DenseWeights(cfg, (h, d), ("embed", "heads", "head_dim"),
                     cfg.qkv_bias, name="q_proj")(e),
        DenseWeights(cfg, (kvh, d), ("embed", "kv_heads", "head_dim"),
                     cfg.qkv_bias, name="k_proj")(e),
        DenseWeights(cfg, (kvh, d), ("embed", "kv_heads", "head_dim"),
                     cfg.qkv_bias, name="v_proj")(e),
    ]
    if layer_cache is not None:
      q, k, v = _fused_dense(x, weights, cfg)
    else:
      q, k, v = (_apply_dense(x, w, b, 1, cfg) for w, b in weights)
    q = _constrain(q, ("batch", "length", "heads", "head_dim"))
    q = apply_rope(q, *rope)
    k = apply_rope(k, *rope).transpose(0, 2, 3, 1)  # [B, K, D, T]
    v = v.transpose(0, 2, 1, 3)                      # [B, K, T, D]
    k = _constrain(k, K_CACHE_AXES)
    v = _constrain(v, V_CACHE_AXES)
    if layer_cache is not None:
      # Only the new tokens are written: an in-place update of the buffer.
      k_cache, v_cache = layer_cache
      k = lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype),
                                   (0, 0, 0, cache_index))
      v = lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype),
                                   (0, 0, cache_index, 0))
      layer_cache = (k, v)
    # Without a cache query i is key slot i: skip the causal upper triangle.
    out = dot_product_attention(
        q, k, v, mask,
        cfg.attention_block if layer_cache is None else None)
    out = _constrain(out, ("batch", "length", "heads", "head_dim"))
    out = Dense(cfg, (cfg.hidden_size,), ("heads", "head_dim", "embed"),
                in_ndim=2, name="o_proj")(out)
    return out, layer_cache


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, fused: bool = False) -> Array:
    cfg = self.config
    f = cfg.intermediate_size
    e = (cfg.hidden_size,)
    weights = [
        DenseWeights(cfg, (f,), ("embed", "mlp"), name="gate_proj")(e),
        DenseWeights(cfg, (f,), ("embed", "mlp"), name="up_proj")(e),
    ]
    if fused:
      gate, up = _fused_dense(x, weights, cfg)
    else:
      gate, up = (_apply_dense(x, w, b, 1, cfg) for w, b in weights)
    hidden = _constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return Dense(cfg, (cfg.hidden_size,), ("mlp", "embed"),
                 name="down_proj")(hidden)


class Block(nn.Module):
  """Pre-norm decoder layer. Scan-compatible: (x, layer_cache, ...) ->
  (x, new_layer_cache), with x [B, T, E] as the carry."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x, layer_cache, rope, mask, cache_index):
    cfg = self.config
    h = RMSNorm(cfg, name="input_layernorm")(x)
    attn, layer_cache = Attention(cfg, name="self_attn")(
        h, rope, mask, layer_cache, cache_index)
    x = x + attn
    h = RMSNorm(cfg, name="post_attention_layernorm")(x)
    # With a cache (prefill / decode) projections of one input are fused.
    x = x + Mlp(cfg, name="mlp")(h, fused=layer_cache is not None)
    x = _constrain(x, ("batch", "length", "embed"))
    return x, layer_cache


class Embed(nn.Module):
  """Token embedding; `attend` is the tied LM head."""

  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                     ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), cfg.params_dtype)

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(
        self.config.compute_dtype)

  def attend(self, x: Array) -> Array:
    cfg = self.config
    return _dense(x, self.embedding.T, 1, cfg.flatten, cfg.compute_dtype
                  ).astype(jnp.float32)


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(nn.Module):
  """The decoder. `__call__` returns final hidden states; `logits` is the head.

  __call__(tokens [B, T], positions [B, T], segment_ids [B, T], cache=None,
           response_ids=None)
    -> hidden [B, T, E]                   if cache is None
    -> (hidden [B, T, E], new KVCache)    otherwise; the T tokens are written
                                          at slots [cache.index, +T).
  logits(hidden [..., E]) -> [..., vocab] float32.
  """

  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = Embed(cfg)
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=_REMAT[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
          out_axes=0,
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg)
    else:
      self.layers = [block(cfg) for _ in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = Dense(cfg, (cfg.vocab_size,), ("embed", "vocab"),
                           out_dtype=jnp.float32)

  def __call__(self, tokens: Array, positions: Array, segment_ids: Array,
               cache: KVCache | None = None, response_ids: Array | None = None):
    cfg = self.config
    _, t = tokens.shape
    x = _constrain(self.embed_tokens(tokens), ("batch", "length", "embed"))
    rope = rope_tables(positions, cfg)
    if response_ids is not None and cache is not None:
      raise ValueError("response_ids (packed pairs) are for training passes, not "
                       "with a KV cache")
    if cache is None:
      slots = jnp.arange(t)
      mask = attention_mask(slots, slots, segment_ids, segment_ids,
                            cfg.sliding_window, response_ids, response_ids)
      index = jnp.zeros((), jnp.int32)
      layer_caches = [None] * cfg.num_layers
    else:
      index = cache.index
      cache_segments = lax.dynamic_update_slice(
          cache.segment_ids, segment_ids.astype(jnp.int32), (0, index))
      mask = attention_mask(index + jnp.arange(t),
                            jnp.arange(cache.segment_ids.shape[1]),
                            segment_ids, cache_segments, cfg.sliding_window)
      layer_caches = list(zip(cache.k, cache.v))

    if cfg.scan_layers:
      # Stacking the cache copies it; decoding loops should run unscanned
      # (see `unstack_layers`), training has no cache.
      stacked = None if cache is None else (jnp.stack(cache.k),
                                            jnp.stack(cache.v))
      x, stacked = self.layers(x, stacked, rope, mask, index)
      if cache is not None:
        layer_caches = list(zip(stacked[0], stacked[1]))
    else:
      for i, layer in enumerate(self.layers):
        x, layer_caches[i] = layer(x, layer_caches[i], rope, mask, index)
    hidden = self.norm(x)

    if self.is_initializing():
      self.logits(hidden[:, :1])  # Creates the LM head's parameters.
    if cache is None:
      return hidden
    new_cache = KVCache(k=tuple(c[0] for c in layer_caches),
                        v=tuple(c[1] for c in layer_caches),
                        segment_ids=cache_segments, index=index + t)
    return hidden, new_cache

  def logits(self, hidden: Array) -> Array:
    if self.config.tie_embeddings:
      return self.embed_tokens.attend(hidden)
    return self.lm_head(hidden)


# ---------------------------------------------------------------------------
# Functional API.
# ---------------------------------------------------------------------------


def positions_from_segment_ids(segment_ids: Array) -> Array:
  """Position of each token within its run of equal segment ids.

  Works for left padding ([0 0 1 1 1] -> [0 1 0 1 2]; padding positions are
  irrelevant) and packing ([1 1 2 2 2] -> [0 1 0 1 2]).
  segment_ids [B, T] -> positions [B, T] int32.
  """
  t = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  prev = jnp.concatenate(
      [jnp.full_like(segment_ids[..., :1], -1), segment_ids[..., :-1]], -1)
  starts = jnp.where(segment_ids != prev, idx, 0)
  return idx - lax.cummax(starts, axis=segment_ids.ndim - 1)


def _inputs(tokens, positions, segment_ids):
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens, dtype=jnp.int32)
  if positions is None:
    positions = positions_from_segment_ids(segment_ids)
  return tokens, positions, segment_ids


def _dummy_inputs():
  tokens = jnp.zeros((1, 1), jnp.int32)
  return tokens, tokens, jnp.ones_like(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config: LlamaConfig, rng: Array) -> Params:
  # No activation constraints while tracing the 1x1 dummy input: under a mesh its
  # batch of one could not take the batch sharding.
  with nn.logical_axis_rules(()):
    boxed = Llama(config).init(rng, *_dummy_inputs())["params"]
  return sharding.strip_boxes(boxed)


def init_params(config: LlamaConfig, rng: Array, shardings: Any = None
                ) -> Params:
  """Random parameters as a plain (unboxed) pytree.

  Args:
    config: the model config.
    rng: a jax PRNG key.
    shardings: optional pytree of shardings (e.g. from
      `sharding.logical_shardings`); parameters are then created directly in
      place, without first materialising them on one device.
  """
  if shardings is None:
    return _init_params(config, rng)
  return jax.jit(_init_params.__wrapped__, static_argnums=0,
                 out_shardings=shardings)(config, rng)


def abstract_params(config: LlamaConfig) -> Params:
  """Shapes/dtypes boxed with logical axis names (nn.LogicallyPartitioned).

  Input to `rlhi.sharding.logical_shardings`; allocates nothing.
  """
  with nn.logical_axis_rules(()):
    return jax.eval_shape(
        lambda: Llama(config).init(jax.random.key(0), *_dummy_inputs())
    )["params"]


def param_count(config: LlamaConfig) -> int:
  shapes = sharding.strip_boxes(abstract_params(config))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def unstack_layers(params: Params,
                   config: LlamaConfig) -> tuple[Params, LlamaConfig]:
  """Scanned params -> the equivalent unscanned params and config.

  Decoding wants unrolled layers: a scan slices (copies) every layer's
  weights on every step. Inside jit the slicing here happens once.
  """
  if not config.scan_layers:
    return params, config
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(config.num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params, dataclasses.replace(config, scan_layers=False)


def stack_layers(params: Params,
                 config: LlamaConfig) -> tuple[Params, LlamaConfig]:
  """Inverse of `unstack_layers`."""
  if config.scan_layers:
    return params, config
  params = dict(params)
  layers = [params.pop(f"layers_{i}") for i in range(config.num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params, dataclasses.replace(config, scan_layers=True)


def forward(params: Params, config: LlamaConfig, tokens: Array,
            positions: Array | None = None, segment_ids: Array | None = None,
            cache: KVCache | None = None, response_ids: Array | None = None):
  """Final hidden states [B, T, E] (and the new cache if one is given).

  Args:
    params: from `init_params` / `hf_io.load_checkpoint`.
    config: the model config.
    tokens: [B, T] int token ids.
    positions: [B, T] int RoPE positions; default derived from segment_ids.
    segment_ids: [B, T] int; 0 = padding, tokens attend within their segment.
    cache: optional KVCache; the tokens are written at slots
      [cache.index, cache.index + T).
    response_ids: [B, T] int or None; packed preference pairs (0 = shared
      prompt, 1 / 2 = the responses, which never see each other), see
      `attention_mask`. Give explicit positions with them.
  """
  tokens, positions, segment_ids = _inputs(tokens, positions, segment_ids)
  return Llama(config).apply({"params": params}, tokens, positions,
                             segment_ids, cache, response_ids)


def lm_logits(params: Params, config: LlamaConfig, hidden: Array) -> Array:
  """hidden [..., E] -> logits [..., vocab] float32."""
  return Llama(config).apply({"params": params}, hidden, method=Llama.logits)


def forward_logits(params: Params, config: LlamaConfig, tokens: Array,
                   positions: Array | None = None,
                   segment_ids: Array | None = None) -> Array:
  """Convenience: full [B, T, vocab] float32 logits (small models / tests)."""
  hidden = forward(params, config, tokens, positions, segment_ids)
  return lm_logits(params, config, hidden)


def token_logprobs(params: Params, config: LlamaConfig, tokens: Array,
                   positions: Array | None, segment_ids: Array | None,
                   targets: Array, chunk_size: int | None = 256,
                   response_ids: Array | None = None,
                   score_positions: Array | None = None) -> Array:
  """log p(targets[b, t] | tokens[b, :t+1]) as [B, T] float32.

  The LM head and log-softmax run over chunks of `chunk_size` positions inside
  a rematerialised scan, so neither the forward nor the backward holds
  [B, T, vocab] float32 logits. Positions whose segment id is 0 get a value
  too; callers mask them (e.g. with segment_ids != 0 shifted as they need).

  Args:
    params, config: the model.
    tokens: [B, T] inputs.
    positions: [B, T] or None (derived from segment_ids).
    segment_ids: [B, T] or None (all ones).
    targets: [B, T] token ids to score; usually tokens shifted left by one.
    chunk_size: positions per LM-head chunk; None = all at once.
    response_ids: [B, T] or None; packed pairs (see `forward`).
    score_positions: [B, K] int or None; score only these columns (the LM head
      runs on K positions per row instead of T) and return [B, K], entry [b, k]
      for column score_positions[b, k].
  """
  hidden = forward(params, config, tokens, positions, segment_ids,
                   response_ids=response_ids)
  if score_positions is not None:
    hidden = jnp.take_along_axis(hidden, score_positions[..., None], axis=1)
    targets = jnp.take_along_axis(targets, score_positions, axis=1)
  b, t, e = hidden.shape
  # Equal chunks of at most chunk_size: 384 positions go as 2 x 192, not 2 x 256.
  n_chunks = 1 if chunk_size is None else -(-t // chunk_size)
  chunk = -(-t // n_chunks)
  pad = n_chunks * chunk - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  # [n_chunks, B, chunk, ...] so that scan walks over length.
  hidden_c = hidden.reshape(b, n_chunks, chunk, e).swapaxes(0, 1)
  targets_c = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(h, tgt):
    logits = lm_logits(params, config, h)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    return picked - logz

  _, logps = lax.scan(lambda c, xs: (c, one_chunk(*xs)), None,
                      (hidden_c, targets_c))
  return logps.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
  """Forward FLOPs per token at sequence length `seq_len`.

  2 * (matmul parameters, incl. the LM head, excl. the embedding lookup)
  + attention 2 * 2 * layers * heads * head_dim * seq_len (QK^T and PV over
  the full length; PaLM's convention, which model FLOPs and MFU use even where
  `attention_block` skips the causal upper triangle: `attended_keys` gives the
  keys computed). Training is about 3x this.
  """
  c = config
  attn_proj = c.hidden_size * c.head_dim * (2 * c.num_heads
                                            + 2 * c.num_kv_heads)
  mlp = 3 * c.hidden_size * c.intermediate_size
  head = c.hidden_size * c.vocab_size
  matmul_params = c.num_layers * (attn_proj + mlp) + head
  attention = 4 * c.num_layers * c.num_heads * c.head_dim * seq_len
  return float(2 * matmul_params + attention)


def attended_keys(config: LlamaConfig, seq_len: int) -> float:
  """Keys per query that a training pass over `seq_len` tokens computes scores
  for: `seq_len` for one dense block, fewer with `attention_block` (block i of
  n rows reads (i + 1) * block keys)."""
  block = config.attention_block
  if block is None or block >= seq_len:
    return float(seq_len)
  return sum((hi - lo) * hi for lo in range(0, seq_len, block)
             for hi in [min(lo + block, seq_len)]) / seq_len
