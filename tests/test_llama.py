"""Tests for rlhi.models.llama against independent computations."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhi.models import llama

# A small variant of `tiny` keeps the tests fast; vocab and GQA as in tiny.
CONFIG = llama.get_config("tiny", num_layers=2, hidden_size=128,
                          intermediate_size=256, num_heads=4, num_kv_heads=2,
                          head_dim=32, vocab_size=512)


# Jitted entry points: eager op-by-op execution would dominate test time.
forward = jax.jit(llama.forward, static_argnums=1)
forward_logits = jax.jit(llama.forward_logits, static_argnums=1)
lm_logits = jax.jit(llama.lm_logits, static_argnums=1)
token_logprobs = jax.jit(llama.token_logprobs, static_argnums=(1, 6))


@pytest.fixture(scope="module")
def params():
  return llama.init_params(CONFIG, jax.random.key(0))


def _tokens(shape, seed=1, vocab=CONFIG.vocab_size):
  return jax.random.randint(jax.random.key(seed), shape, 1, vocab)


def _left_padded(rows, width):
  """Returns tokens, segment_ids, positions for left-padded rows."""
  tokens = np.zeros((len(rows), width), np.int32)
  segments = np.zeros((len(rows), width), np.int32)
  positions = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    n = len(row)
    tokens[i, width - n:] = row
    segments[i, width - n:] = 1
    positions[i, width - n:] = np.arange(n)
  return jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions)


# ---------------------------------------------------------------------------
# Configs and parameters.
# ---------------------------------------------------------------------------


def _param_count_formula(c: llama.LlamaConfig) -> int:
  """Independent count from the architecture's definition."""
  e, f, d = c.hidden_size, c.intermediate_size, c.head_dim
  attn = e * d * (2 * c.num_heads + 2 * c.num_kv_heads)
  if c.qkv_bias:
    attn += d * (c.num_heads + 2 * c.num_kv_heads)
  per_layer = attn + 3 * e * f + 2 * e
  head = 0 if c.tie_embeddings else e * c.vocab_size
  return c.num_layers * per_layer + c.vocab_size * e + e + head


@pytest.mark.parametrize("name,lo,hi", [
    ("tiny", 2e6, 9e6),
    ("small", 80e6, 130e6),
    ("llama3_1b", 1.23e9, 1.24e9),
    ("llama3_8b", 8.02e9, 8.04e9),
    ("llama3_70b", 70.5e9, 70.6e9),
    ("qwen2_7b", 7.6e9, 7.62e9),
])
def test_named_config_param_counts(name, lo, hi):
  config = llama.get_config(name)
  count = llama.param_count(config)  # eval_shape: allocates nothing.
  assert count == _param_count_formula(config)
  assert lo <= count <= hi


def test_named_config_properties():
  tiny = llama.get_config("tiny")
  assert tiny.vocab_size == 4096 and not tiny.tie_embeddings
  assert tiny.num_kv_heads < tiny.num_heads
  assert llama.get_config("qwen2_7b").qkv_bias
  assert llama.get_config("llama3_8b").rope_scaling.factor == 8.0
  assert llama.get_config("tiny", num_layers=7).num_layers == 7
  with pytest.raises(ValueError, match="Unknown model config"):
    llama.get_config("gpt5")
  with pytest.raises(ValueError, match="remat_policy"):
    llama.get_config("tiny", remat_policy="sometimes")


def test_every_param_has_logical_axes():
  allowed = {"batch", "length", "embed", "mlp", "heads", "kv_heads",
             "head_dim", "vocab", "layers"}
  for config in (CONFIG, dataclasses.replace(CONFIG, scan_layers=False),
                 llama.get_config("qwen2_7b", num_layers=2)):
    boxed = llama.abstract_params(config)
    leaves = jax.tree.leaves(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for leaf in leaves:
      assert isinstance(leaf, nn.LogicallyPartitioned)
      assert len(leaf.names) == leaf.value.ndim
      assert set(leaf.names) <= allowed
    if config.scan_layers:
      q = boxed["layers"]["self_attn"]["q_proj"]["kernel"]
      assert q.names == ("layers", "embed", "heads", "head_dim")


def test_param_dtype_and_compute_dtype():
  config = dataclasses.replace(CONFIG, param_dtype="bfloat16",
                               dtype="bfloat16")
  p = llama.init_params(config, jax.random.key(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
  hidden = forward(p, config, _tokens((2, 8)))
  assert hidden.dtype == jnp.bfloat16
  assert lm_logits(p, config, hidden).dtype == jnp.float32


# ---------------------------------------------------------------------------
# Building blocks vs closed forms.
# ---------------------------------------------------------------------------


def test_attention_mask_matches_loop():
  rng = np.random.default_rng(0)
  segments = rng.integers(0, 3, size=(2, 9))
  for window in (None, 3):
    mask = np.asarray(llama.attention_mask(
        jnp.arange(9), jnp.arange(9), jnp.asarray(segments),
        jnp.asarray(segments), window))
    for b in range(2):
      for q in range(9):
        for k in range(9):
          want = (k <= q and segments[b, q] == segments[b, k]
                  and segments[b, k] != 0
                  and (window is None or q - k < window))
          assert mask[b, q, k] == want


def _numpy_attention(q, k, v, mask):
  """Per-head softmax(q k^T / sqrt(d)) v on the standard [B, T, H, D] layout."""
  b, t, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q)
  for i in range(b):
    for j in range(h):
      scores = q[i, :, j] @ k[i, :, j // g].T / math.sqrt(d)
      scores = np.where(mask[i], scores, -np.inf)
      for r in range(t):
        if mask[i, r].any():
          p = np.exp(scores[r] - scores[r].max())
          out[i, r, j] = (p / p.sum()) @ v[i, :, j // g]
  return out


@pytest.mark.parametrize("block", [None, 4, 5, 16])
def test_causal_block_attention_matches_numpy(block):
  """Blocked causal attention (keys after each query block skipped) equals the
  dense softmax on ragged segments with packed responses, T not a multiple of
  the block, and padding; valid rows only (padding rows average other keys)."""
  rng = np.random.default_rng(0)
  b, t, h, kvh, d = 2, 13, 4, 2, 8
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  k = rng.normal(size=(b, t, kvh, d)).astype(np.float32)
  v = rng.normal(size=(b, t, kvh, d)).astype(np.float32)
  segments = np.array([[1] * 6 + [2] * 5 + [0] * 2, [1] * 13])
  responses = np.array([[0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 2, 0, 0],
                        [0] * 5 + [1] * 4 + [2] * 4])
  slots = jnp.arange(t)
  mask = llama.attention_mask(slots, slots, jnp.asarray(segments),
                              jnp.asarray(segments), None,
                              jnp.asarray(responses), jnp.asarray(responses))
  got = jax.jit(llama.dot_product_attention, static_argnums=4)(
      q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask, block)
  want = _numpy_attention(q, k, v, np.asarray(mask))
  valid = segments != 0
  np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=1e-5,
                             atol=1e-6)


def test_attention_block_keeps_logprobs_and_grads(params):
  """The model's training pass with query blocks equals the dense one."""
  tokens = _tokens((2, 24))
  segments = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4])

  def loss(p, config):
    logps = llama.token_logprobs(p, config, tokens, None, segments,
                                 jnp.roll(tokens, -1, axis=1), 8)
    return jnp.sum(jnp.where(segments != 0, logps, 0.0))

  dense = dataclasses.replace(CONFIG, attention_block=None)
  blocked = dataclasses.replace(CONFIG, attention_block=7)
  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (loss_d, grads_d), (loss_b, grads_b) = grad(params, dense), grad(params, blocked)
  np.testing.assert_allclose(loss_b, loss_d, rtol=1e-6)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-4,
                                                       atol=1e-6),
               grads_b, grads_d)


def test_rope_is_relative():
  """<rope(q, m), rope(k, n)> depends on m - n only, and norms are kept."""
  config = llama.get_config("llama3_8b")  # With llama3 frequency scaling.
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 128))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 128))

  def rot(x, pos):
    cos, sin = llama.rope_tables(jnp.array([[pos]]), config)
    return llama.apply_rope(x, cos, sin)

  def score(m, n):
    return float(jnp.sum(rot(q, m) * rot(k, n)))

  np.testing.assert_allclose(score(7, 3), score(1004, 1000), rtol=1e-4)
  np.testing.assert_allclose(score(3, 7), score(20, 24), rtol=1e-4)
  np.testing.assert_allclose(jnp.linalg.norm(rot(q, 12345)),
                             jnp.linalg.norm(q), rtol=1e-5)


def test_llama3_rope_frequencies_closed_form():
  """Checks the three bands of the Llama-3 rule on a hand-made config."""
  rs = llama.RopeScaling(factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0,
                         original_max_position_embeddings=8192)
  config = dataclasses.replace(CONFIG, head_dim=128, rope_theta=500_000.0,
                               rope_scaling=rs)
  base = 1.0 / 500_000.0 ** (np.arange(0, 128, 2) / 128)
  got = llama.rope_inv_frequencies(config)
  wavelen = 2 * np.pi / base
  high = wavelen < 8192 / 4     # Short wavelengths: unchanged.
  low = wavelen > 8192 / 1      # Long wavelengths: divided by the factor.
  np.testing.assert_allclose(got[high], base[high], rtol=1e-6)
  np.testing.assert_allclose(got[low], base[low] / 8, rtol=1e-6)
  mid = ~high & ~low
  assert mid.any()
  assert np.all(got[mid] <= base[mid]) and np.all(got[mid] >= base[mid] / 8)


def test_flops_per_token_matches_xla_cost_analysis(params):
  tokens = _tokens((2, 64))
  # Unrolled: XLA's cost analysis counts a loop body once.
  unscanned, config = llama.unstack_layers(params, CONFIG)
  compiled = jax.jit(llama.forward_logits, static_argnums=1).lower(
      unscanned, config, tokens).compile()
  xla_flops = compiled.cost_analysis()["flops"]
  ours = llama.flops_per_token(CONFIG, 64) * 2 * 64
  # XLA also counts elementwise work (norms, softmax, rope).
  assert ours <= xla_flops <= 1.15 * ours


# ---------------------------------------------------------------------------
# Forward-pass invariants.
# ---------------------------------------------------------------------------


def test_kv_cache_decode_equals_full_recompute(params):
  rows = [list(np.asarray(_tokens((n,), seed=n))) for n in (5, 9, 7)]
  full_rows = [r + list(np.asarray(_tokens((4,), seed=10 + i)))
               for i, r in enumerate(rows)]
  prompt_width, steps = 9, 4
  tokens, segments, positions = _left_padded(rows, prompt_width)
  full_tokens, full_segments, full_positions = _left_padded(
      [r for r in full_rows], prompt_width + steps)
  # Left padding of the prompts carries over to the full rows.
  want = forward_logits(params, CONFIG, full_tokens, full_positions,
                              full_segments)

  for config in (CONFIG, dataclasses.replace(CONFIG, scan_layers=False)):
    p = params if config.scan_layers else llama.unstack_layers(
        params, CONFIG)[0]
    cache = llama.init_cache(config, 3, prompt_width + steps)
    hidden, cache = forward(p, config, tokens, positions, segments,
                                  cache)
    got = [lm_logits(p, config, hidden)]
    pos = jnp.asarray([len(r) for r in rows])
    for t in range(steps):
      step_tokens = full_tokens[:, prompt_width + t][:, None]
      hidden, cache = forward(p, config, step_tokens, pos[:, None] + t,
                                    jnp.ones((3, 1), jnp.int32), cache)
      got.append(lm_logits(p, config, hidden))
    got = jnp.concatenate(got, axis=1)
    real = np.asarray(full_segments) != 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real],
                               rtol=1e-4, atol=1e-4)
    assert int(cache.index) == prompt_width + steps


def test_left_padding_does_not_change_logits(params):
  row = list(np.asarray(_tokens((6,), seed=3)))
  alone = forward_logits(params, CONFIG, jnp.asarray([row]))
  tokens, segments, positions = _left_padded([row, row[:2]], 10)
  padded = forward_logits(params, CONFIG, tokens, positions, segments)
  np.testing.assert_allclose(padded[0, 4:], alone[0], rtol=1e-5, atol=1e-5)


def test_packed_segments_equal_separate_sequences(params):
  a, b = _tokens((5,), seed=4), _tokens((3,), seed=5)
  packed = jnp.concatenate([a, b, jnp.zeros((2,), jnp.int32)])[None]
  segments = jnp.asarray([[1] * 5 + [2] * 3 + [0] * 2])
  got = forward_logits(params, CONFIG, packed, None, segments)
  np.testing.assert_allclose(
      got[0, :5], forward_logits(params, CONFIG, a[None])[0],
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      got[0, 5:8], forward_logits(params, CONFIG, b[None])[0],
      rtol=1e-5, atol=1e-5)


def test_positions_from_segment_ids():
  seg = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 2, 2, 2], [1, 1, 1, 0, 0]])
  want = [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]
  np.testing.assert_array_equal(llama.positions_from_segment_ids(seg), want)


def test_sliding_window_limits_context(params):
  config = dataclasses.replace(CONFIG, sliding_window=3)
  tokens = _tokens((1, 8))
  logits = forward_logits(params, config, tokens)
  # Window 3 and 2 layers: position 7 depends on tokens 3..7 only.
  changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % CONFIG.vocab_size)
  np.testing.assert_allclose(
      forward_logits(params, config, changed)[0, -1], logits[0, -1],
      rtol=1e-6, atol=1e-6)
  # Without the window it does matter.
  full = forward_logits(params, CONFIG, tokens)
  assert not np.allclose(forward_logits(params, CONFIG, changed)[0, -1],
                         full[0, -1], atol=1e-6)


def _loss(params, config, tokens):
  logits = forward_logits(params, config, tokens)
  return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])


_value_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=1)


def test_scan_and_unrolled_layers_agree(params):
  tokens = _tokens((2, 12))
  unscanned, config = llama.unstack_layers(params, CONFIG)
  assert "layers_1" in unscanned and not config.scan_layers
  np.testing.assert_allclose(
      forward(unscanned, config, tokens),
      forward(params, CONFIG, tokens), rtol=1e-5, atol=1e-5)
  _, g_scan = _value_and_grad(params, CONFIG, tokens)
  _, g_unrolled = _value_and_grad(unscanned, config, tokens)
  g_restacked, _ = llama.stack_layers(g_unrolled, config)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               g_scan, g_restacked)


@pytest.mark.parametrize("policy,scan", [
    ("full", True), ("dots_saveable", True),
    ("dots_with_no_batch_dims_saveable", True), ("full", False)])
def test_remat_keeps_outputs_and_grads(params, policy, scan):
  tokens = _tokens((2, 12))
  base = dataclasses.replace(CONFIG, scan_layers=scan)
  p = params if scan else llama.unstack_layers(params, CONFIG)[0]
  remat = dataclasses.replace(base, remat_policy=policy)
  loss, grads = _value_and_grad(p, base, tokens)  # Compiled once per `scan`.
  loss_r, grads_r = _value_and_grad(p, remat, tokens)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               grads_r, grads)


def test_flatten_switch_does_not_change_outputs(params):
  tokens = _tokens((2, 12))
  a = forward_logits(
      params, dataclasses.replace(CONFIG, flatten_dense=True), tokens)
  b = forward_logits(
      params, dataclasses.replace(CONFIG, flatten_dense=False), tokens)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_use_embedding_as_head():
  config = dataclasses.replace(CONFIG, tie_embeddings=True)
  p = llama.init_params(config, jax.random.key(0))
  assert "lm_head" not in p
  hidden = jax.random.normal(jax.random.key(1), (2, 3, config.hidden_size))
  np.testing.assert_allclose(
      lm_logits(p, config, hidden),
      hidden @ p["embed_tokens"]["embedding"].T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Chunked log-probs.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 4, 5, 64])
def test_token_logprobs_matches_full_log_softmax(params, chunk):
  tokens, segments, positions = _left_padded(
      [list(np.asarray(_tokens((11,), seed=6))),
       list(np.asarray(_tokens((7,), seed=7)))], 11)
  targets = jnp.roll(tokens, -1, axis=1)
  got = token_logprobs(params, CONFIG, tokens, positions, segments,
                             targets, chunk_size=chunk)
  logits = np.asarray(forward_logits(params, CONFIG, tokens, positions,
                                           segments), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + (
      logits.max(-1))
  want = np.take_along_axis(logits, np.asarray(targets)[..., None],
                            -1)[..., 0] - logz
  assert got.shape == (2, 11)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_logprobs_gradient_matches_unchunked(params):
  tokens = _tokens((2, 10))
  targets = jnp.roll(tokens, -1, axis=1)

  def chunked(p):
    return token_logprobs(p, CONFIG, tokens, None, None, targets,
                                chunk_size=3).sum()

  def direct(p):
    logits = forward_logits(p, CONFIG, tokens)
    logp = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(logp, targets[..., None], -1).sum()

  g1 = jax.jit(jax.grad(chunked))(params)
  g2 = jax.jit(jax.grad(direct))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6), g1, g2)


def test_init_is_deterministic_and_seeded():
  a = llama.init_params(CONFIG, jax.random.key(3))
  b = llama.init_params(CONFIG, jax.random.key(3))
  c = llama.init_params(CONFIG, jax.random.key(4))
  emb = lambda p: p["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(emb(a), emb(b))
  assert not np.allclose(emb(a), emb(c))
  assert math.isclose(float(jnp.std(emb(a))), CONFIG.init_std, rel_tol=0.05)
