"""Batched generation with a KV cache, in one jitted loop.

Prefill of the left-padded prompts, then `lax.while_loop`s that decode one
token per step for all rows, writing keys/values into the cache in place and
exiting early once every row has stopped. The cache grows between loops (by
~25% each time) so that early steps read only the slots that can be filled:
decoding is bound by memory traffic.

Only shapes, the model config, `max_new_tokens` and the active logical-axis
rules are static: new prompts of the same padded shape, seeds, temperatures,
top-k/top-p, stop ids and per-row limits reuse the compiled loop. Pad prompts
to a few bucket lengths (`left_pad(..., multiple=...)`) to bound compiles.

Runs under a mesh with sharded params: call it inside
`sharding.use_mesh(mesh)`; the activation and cache constraints follow the
rules that are active at the call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax
import flax.linen as nn
from flax.core.spmd import get_logical_axis_rules
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from rlhi.models import llama

Array = jax.Array


@flax.struct.dataclass
class SampleOutput:
  """Result of `generate`.

  Attributes:
    tokens: [B, max_new_tokens] int32 generated tokens; a row's stop token is
      included, everything after the row ended is `pad_id`.
    logprobs: [B, max_new_tokens] float32 log-probability of each generated
      token under the model's *unmodified* distribution: softmax of the raw
      logits at temperature 1, before top-k/top-p filtering (what RL
      objectives need). 0 after the row ended. For greedy rows it is the
      log-prob of the argmax token.
    lengths: [B] int32 number of generated tokens, incl. the stop token.
  """

  tokens: Array
  logprobs: Array
  lengths: Array


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0,
             length: int | None = None,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to [B, L] (L rounded up to `multiple`).

  Returns:
    (tokens [B, L] int32, lengths [B] int32).
  """
  lengths = np.array([len(s) for s in sequences], np.int32)
  if length is None:
    length = int(lengths.max()) if len(lengths) else 1
  length = -(-length // multiple) * multiple
  if (lengths > length).any():
    raise ValueError(f"A sequence of length {lengths.max()} exceeds the "
                     f"padded length {length}")
  tokens = np.full((len(sequences), length), pad_id, np.int32)
  for row, seq in enumerate(sequences):
    if len(seq):
      tokens[row, length - len(seq):] = seq
  return tokens, lengths


def _ordered_keys(x: Array) -> Array:
  """float32 -> int32 with the same order (IEEE bits, negatives flipped)."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _largest_key_where(pred, lo: Array, hi: Array) -> Array:
  """Largest int32 key in [lo, hi) with pred(key) true, by bisection.

  pred must be monotone (true then false) with pred(lo) true. lo, hi: [B].
  32 halvings cover the whole int32 range.
  """

  def halve(_, bounds):
    lo, hi = bounds
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo+hi)/2), no wrap.
    ok = pred(mid) & (mid > lo)
    return jnp.where(ok, mid, lo), jnp.where(ok | (mid <= lo), hi, mid)

  return lax.fori_loop(0, 32, halve, (lo, hi))[0]


def filter_logits(logits: Array, temperature: Array, top_k: Array,
                  top_p: Array) -> Array:
  """Temperature, then top-k, then top-p (nucleus) over the top-k survivors.

  Keeps the k largest logits, then the smallest set of those, by decreasing
  probability, whose probability mass reaches top_p (ties with the last kept
  logit are kept too). Removed entries become -inf. Rows with
  temperature <= 0 are filtered at temperature 1 (their caller takes the
  argmax).

  Thresholds are found by bisection over the logits' bit patterns (exact, no
  sort: sorting the vocabulary every step is slow on CPU and TPU).

  Args:
    logits: [B, V] float32.
    temperature: [B] float.
    top_k: [B] int; 0 (or >= V) disables.
    top_p: [B] float; >= 1 disables.

  Returns:
    [B, V] float32 logits whose softmax is the sampling distribution.
  """
  v = logits.shape[-1]
  t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
  scaled = logits.astype(jnp.float32) / t[:, None]

  def apply_filters(x):
    keys = _ordered_keys(x)
    lo = jnp.min(keys, axis=-1)
    hi = jnp.max(keys, axis=-1)
    # Top-k: the k-th largest key (lo if disabled: count(keys >= lo) = V).
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)
    key_k = lax.cond(
        jnp.any(k < v),
        lambda: _largest_key_where(
            lambda tau: jnp.sum(keys >= tau[:, None], axis=-1) >= k,
            lo, hi + 1),
        lambda: lo)

    # Top-p over the top-k survivors.
    def nucleus():
      kept_k = keys >= key_k[:, None]
      probs = jax.nn.softmax(jnp.where(kept_k, x, -jnp.inf), axis=-1)
      return _largest_key_where(
          lambda tau: jnp.sum(jnp.where(keys >= tau[:, None], probs, 0.0),
                              axis=-1) >= top_p, key_k, hi + 1)

    key_p = lax.cond(jnp.any(top_p < 1.0), nucleus, lambda: key_k)
    key = jnp.where(top_p < 1.0, key_p, key_k)
    return jnp.where(keys >= key[:, None], x, -jnp.inf)

  needed = jnp.any((top_k > 0) & (top_k < v)) | jnp.any(top_p < 1.0)
  return lax.cond(needed, apply_filters, lambda x: x, scaled)


def _categorical(rng: Array, logits: Array, block: int = 64) -> Array:
  """Exact draw from softmax(logits) by inverse CDF. [B, V] -> [B] int32.

  One uniform per row instead of Gumbel noise over the whole vocabulary;
  the cumulative sum is two-level (blocks, then within the chosen block) to
  keep it cheap for large vocabularies.
  """
  b, v = logits.shape
  n_blocks = -(-v // block)
  probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  probs = jnp.pad(probs, ((0, 0), (0, n_blocks * block - v)))
  probs = probs.reshape(b, n_blocks, block)
  block_mass = jnp.sum(probs, axis=-1)                       # [B, n_blocks]
  block_end = jnp.cumsum(block_mass, axis=-1)
  u = jax.random.uniform(rng, (b,), minval=jnp.finfo(jnp.float32).tiny)
  target = u * block_end[:, -1]

  def first_positive_at_or_after(i, mass):
    """Guards against float rounding landing on a zero-probability entry."""
    iota = lax.broadcasted_iota(jnp.int32, mass.shape, 1)
    n = mass.shape[1]
    after = jnp.min(jnp.where((iota >= i[:, None]) & (mass > 0), iota, n), 1)
    last = jnp.max(jnp.where(mass > 0, iota, 0), axis=1)
    return jnp.where(after < n, after, last)

  j = jnp.sum(block_end < target[:, None], axis=-1)
  j = first_positive_at_or_after(j, block_mass)
  within = jnp.take_along_axis(probs, j[:, None, None], axis=1)[:, 0]
  start = jnp.take_along_axis(block_end - block_mass, j[:, None], axis=1)
  i = jnp.sum(start + jnp.cumsum(within, axis=-1) < target[:, None], axis=-1)
  i = first_positive_at_or_after(i, within)
  return (j * block + i).astype(jnp.int32)


def _sample_with_logprob(rng: Array, logits: Array, temperature: Array,
                         top_k: Array, top_p: Array) -> tuple[Array, Array]:
  """(tokens [B] int32, log p(token) [B] under softmax(logits)).

  Shares the row max between the argmax and the log-normaliser: every pass
  over [B, vocab] counts in a memory-bound decode step.
  """
  v = logits.shape[-1]
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  iota = lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  # First index of the maximum (XLA:CPU's variadic argmax is ~10x slower).
  greedy = jnp.min(jnp.where(logits == row_max, iota, v), axis=-1)

  def draw(_):
    return _categorical(rng, filter_logits(logits, temperature, top_k, top_p))

  drawn = lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
  token = jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
  log_norm = row_max[:, 0] + jnp.log(
      jnp.sum(jnp.exp(logits - row_max), axis=-1))
  picked = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
  return token, picked - log_norm


def sample_tokens(rng: Array, logits: Array, temperature: Array,
                  top_k: Array, top_p: Array) -> Array:
  """One token per row: argmax where temperature <= 0, else a draw from
  softmax(`filter_logits`). logits [B, V] -> [B] int32."""
  return _sample_with_logprob(rng, logits, temperature, top_k, top_p)[0]


def _per_row(x, batch: int, dtype) -> Array:
  return jnp.broadcast_to(jnp.asarray(x, dtype), (batch,))


def generate(params: llama.Params, config: llama.LlamaConfig,
             prompt_tokens: Array, prompt_lengths: Array, rng: Array, *,
             max_new_tokens: int, temperature: float | Array = 1.0,
             top_k: int | Array = 0, top_p: float | Array = 1.0,
             stop_token_ids: Sequence[int] | Array | None = None,
             max_new_per_row: Array | None = None,
             pad_id: int = 0) -> SampleOutput:
  """Samples continuations of left-padded prompts.

  Args:
    params: model params (may be sharded; call under `sharding.use_mesh`).
    config: model config (static).
    prompt_tokens: [B, P] int, left-padded (see `left_pad`).
    prompt_lengths: [B] int, real tokens per row; each must be >= 1.
    rng: a jax PRNG key; same key + inputs -> same output.
    max_new_tokens: static size of the output buffer.
    temperature: scalar or [B]; 0 means greedy.
    top_k: scalar or [B]; 0 disables.
    top_p: scalar or [B]; 1 disables.
    stop_token_ids: ids that end a row (kept in the output); default
      config.eos_token_ids. Its length is part of the compiled shape.
    max_new_per_row: [B] int limits <= max_new_tokens; default all
      max_new_tokens.
    pad_id: written after a row ends.

  Returns:
    SampleOutput; see its docstring for what the log-probs are.
  """
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  batch = prompt_tokens.shape[0]
  if stop_token_ids is None:
    stop_token_ids = config.eos_token_ids
  stop = jnp.asarray(stop_token_ids, jnp.int32).reshape(-1)
  if stop.size == 0:
    stop = jnp.full((1,), -1, jnp.int32)  # Keeps the shape non-empty.
  if max_new_per_row is None:
    max_new_per_row = max_new_tokens
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                for name, axes in get_logical_axis_rules())
  return _generate(
      params, prompt_tokens, jnp.asarray(prompt_lengths, jnp.int32), rng,
      _per_row(temperature, batch, jnp.float32),
      _per_row(top_k, batch, jnp.int32),
      _per_row(top_p, batch, jnp.float32),
      stop,
      _per_row(max_new_per_row, batch, jnp.int32),
      jnp.asarray(pad_id, jnp.int32),
      config=config, max_new_tokens=max_new_tokens, rules=rules)


@functools.partial(jax.jit,
                   static_argnames=("config", "max_new_tokens", "rules"))
def _generate(params, prompt_tokens, prompt_lengths, rng, temperature, top_k,
              top_p, stop, row_max_new, pad_id, *, config, max_new_tokens,
              rules) -> SampleOutput:
  with nn.logical_axis_rules(rules):
    prompt_len = prompt_tokens.shape[1]
    # Unrolled layers for decoding: a scan would copy every layer's weights
    # out of the stack on every step; this copies them once.
    params, config = llama.unstack_layers(params, config)
    ends = _phase_ends(prompt_len, max_new_tokens)
    state = prefill(params, config, prompt_tokens, prompt_lengths, row_max_new,
                    pad_id, cache_len=prompt_len + ends[0],
                    max_new_tokens=max_new_tokens)

    def body(state):
      return decode_step(params, config, state, rng, temperature, top_k, top_p,
                         stop, row_max_new, pad_id)

    # The cache grows between phases, so that early steps attend over (and
    # read) only the slots that can be filled: decoding is bound by memory
    # traffic, and the cache is a large part of it.
    for i, end in enumerate(ends):
      if i:
        state = (*state[:2], llama.grow_cache(state[2], prompt_len + end),
                 *state[3:])
      state = lax.while_loop(
          lambda s, end=end: (s[0] < end) & ~jnp.all(s[5]), body, state)
    return SampleOutput(tokens=state[3], logprobs=state[4], lengths=state[6])


# The decode loop's state, a tuple: (step [] int32, logits [B, V] float32 of the next
# token, KVCache, tokens [B, max_new] int32, logprobs [B, max_new] float32,
# done [B] bool, lengths [B] int32, positions [B] int32 of the next token).
DecodeState = tuple


def prefill(params, config, prompt_tokens, prompt_lengths, row_max_new, pad_id, *,
            cache_len: int, max_new_tokens: int) -> DecodeState:
  """Runs left-padded prompts [B, P] into a new cache of `cache_len` slots; returns
  the decode loop's first state. Call under the logical-axis rules (as `generate`
  does); params unscanned (`llama.unstack_layers`)."""
  batch, prompt_len = prompt_tokens.shape
  n_pad = prompt_len - prompt_lengths
  slots = jnp.arange(prompt_len)[None, :]
  segment_ids = (slots >= n_pad[:, None]).astype(jnp.int32)
  positions = jnp.maximum(slots - n_pad[:, None], 0)
  cache = llama.init_cache(config, batch, cache_len)
  hidden, cache = llama.forward(params, config, prompt_tokens, positions,
                                segment_ids, cache)
  # Left padding puts every row's last prompt token in the last column.
  logits = llama.lm_logits(params, config, hidden[:, -1])
  return (
      jnp.zeros((), jnp.int32),
      logits,
      cache,
      jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
      jnp.zeros((batch, max_new_tokens), jnp.float32),
      row_max_new <= 0,
      jnp.zeros((batch,), jnp.int32),
      prompt_lengths,
  )


def decode_step(params, config, state: DecodeState, rng, temperature, top_k, top_p,
                stop, row_max_new, pad_id) -> DecodeState:
  """One token for every row: sample from the state's logits, record it, run it
  through the model into the cache. The body of `generate`'s decode loops."""
  step, logits, cache, tokens, logprobs, done, lengths, pos = state
  batch = tokens.shape[0]
  token, logp = _sample_with_logprob(jax.random.fold_in(rng, step),
                                     logits, temperature, top_k, top_p)
  active = ~done
  tokens = lax.dynamic_update_slice(
      tokens, jnp.where(active, token, pad_id)[:, None], (0, step))
  logprobs = lax.dynamic_update_slice(
      logprobs, jnp.where(active, logp, 0.0)[:, None], (0, step))
  lengths = lengths + active
  done = (done | (active & jnp.isin(token, stop))
          | (step + 1 >= row_max_new))
  # Finished rows keep decoding (static batch); their outputs are
  # discarded above. They are fed real tokens, so pad_id need not be one.
  hidden, cache = llama.forward(
      params, config, token[:, None], pos[:, None],
      jnp.ones((batch, 1), jnp.int32), cache)
  logits = llama.lm_logits(params, config, hidden[:, 0])
  return step + 1, logits, cache, tokens, logprobs, done, lengths, pos + 1


def _phase_ends(prompt_len: int, max_new_tokens: int, step: int = 32,
                growth: float = 1.25) -> list[int]:
  """New-token counts at which the cache grows, then max_new_tokens.

  Each phase's cache is ~`growth` times the previous one (in multiples of
  `step` tokens): a step reads at most ~25% (or `step`) more slots than are
  filled, while the number of compiled loop bodies stays logarithmic.
  E.g. prompt 32, 256 new tokens: [32, 64, 96, 128, 192, 256].
  """
  ends, end = [], step
  while end < max_new_tokens:
    ends.append(end)
    grown = math.ceil((prompt_len + end) * growth) - prompt_len
    end = max(end + step, -(-grown // step) * step)
  return ends + [max_new_tokens]
