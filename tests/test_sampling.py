"""Tests for rlhi.sampling against cache-free rollouts and NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhi import sampling
from rlhi.models import llama

# init_std 0.1: a random model with peaked next-token distributions, so that
# greedy decoding is robust to float noise between the compared paths.
CONFIG = llama.get_config("tiny", num_layers=2, hidden_size=128,
                          intermediate_size=256, num_heads=4, num_kv_heads=2,
                          head_dim=32, vocab_size=512, eos_token_ids=(),
                          init_std=0.1)
PROMPTS = [[5, 17, 301], [9, 8, 7, 6, 5, 4, 3], [100, 200, 300, 400, 50]]
MAX_NEW = 8
ROLLOUT_WIDTH = 16  # Longest prompt + MAX_NEW, rounded up.

_forward_logits = jax.jit(llama.forward_logits, static_argnums=1)


@pytest.fixture(scope="module")
def params():
  return llama.init_params(CONFIG, jax.random.key(0))


def _full_logits(params, seq):
  """Last-position logits of `seq` by a full forward pass: no cache, no left
  padding (right padding with segment 0 keeps one compiled shape)."""
  tokens = np.zeros((1, ROLLOUT_WIDTH), np.int32)
  segments = np.zeros((1, ROLLOUT_WIDTH), np.int32)
  tokens[0, :len(seq)] = seq
  segments[0, :len(seq)] = 1
  logits = _forward_logits(params, CONFIG, jnp.asarray(tokens), None,
                           jnp.asarray(segments))
  return np.asarray(logits[0, len(seq) - 1], np.float64)


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


@pytest.fixture(scope="module")
def greedy_rollouts(params):
  """Per prompt: (tokens, log-probs) of an independent argmax loop."""
  out = []
  for prompt in PROMPTS:
    seq, logps = list(prompt), []
    for _ in range(MAX_NEW):
      logits = _full_logits(params, seq)
      token = int(np.argmax(logits))
      logps.append(_log_softmax(logits)[token])
      seq.append(token)
    out.append((seq[len(prompt):], logps))
  return out


def _generate(params, **kwargs):
  tokens, lengths = sampling.left_pad(PROMPTS, length=8)
  kwargs.setdefault("max_new_tokens", MAX_NEW)
  kwargs.setdefault("rng", jax.random.key(0))
  return jax.device_get(
      sampling.generate(params, CONFIG, tokens, lengths, **kwargs))


def test_left_pad():
  tokens, lengths = sampling.left_pad([[1, 2], [3], [4, 5, 6]], pad_id=0,
                                      multiple=4)
  np.testing.assert_array_equal(tokens, [[0, 0, 1, 2], [0, 0, 0, 3],
                                         [0, 4, 5, 6]])
  np.testing.assert_array_equal(lengths, [2, 1, 3])
  with pytest.raises(ValueError, match="exceeds"):
    sampling.left_pad([[1, 2, 3]], length=2)


def test_greedy_equals_uncached_argmax_rollout(params, greedy_rollouts):
  out = _generate(params, temperature=0.0)
  for row, (want_tokens, want_logps) in enumerate(greedy_rollouts):
    np.testing.assert_array_equal(out.tokens[row], want_tokens)
    np.testing.assert_allclose(out.logprobs[row], want_logps, atol=2e-4)
  np.testing.assert_array_equal(out.lengths, [MAX_NEW] * 3)


def test_scanned_and_unscanned_params_sample_the_same(params):
  unscanned, config = llama.unstack_layers(params, CONFIG)
  tokens, lengths = sampling.left_pad(PROMPTS)
  a = sampling.generate(params, CONFIG, tokens, lengths, jax.random.key(3),
                        max_new_tokens=MAX_NEW, temperature=1.0)
  b = sampling.generate(unscanned, config, tokens, lengths, jax.random.key(3),
                        max_new_tokens=MAX_NEW, temperature=1.0)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_stop_tokens_and_per_row_limits(params, greedy_rollouts):
  row0 = greedy_rollouts[0][0]
  stop = row0[2]
  max_new_per_row = np.array([8, 3, 6])
  out = _generate(params, temperature=0.0, stop_token_ids=[stop],
                  max_new_per_row=max_new_per_row, pad_id=-1)
  for row, (rollout, logps) in enumerate(greedy_rollouts):
    n = int(max_new_per_row[row])
    if stop in rollout[:n]:
      n = rollout.index(stop) + 1  # The stop token is kept.
    assert out.lengths[row] == n
    np.testing.assert_array_equal(out.tokens[row, :n], rollout[:n])
    assert (out.tokens[row, n:] == -1).all()
    assert (out.logprobs[row, n:] == 0).all()
    np.testing.assert_allclose(out.logprobs[row, :n], logps[:n], atol=2e-4)
  assert out.lengths[0] <= 3


def test_mixed_greedy_and_sampled_rows(params, greedy_rollouts):
  out = _generate(params, temperature=np.array([0.0, 1.0, 0.0]))
  np.testing.assert_array_equal(out.tokens[0], greedy_rollouts[0][0])
  np.testing.assert_array_equal(out.tokens[2], greedy_rollouts[2][0])


def test_seeded_reproducibility(params):
  a = _generate(params, rng=jax.random.key(7), temperature=1.0)
  b = _generate(params, rng=jax.random.key(7), temperature=1.0)
  c = _generate(params, rng=jax.random.key(8), temperature=1.0)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert not np.array_equal(a.tokens, c.tokens)


def test_sampled_logprobs_are_unmodified_model_logprobs(params):
  """Sampling with temperature/top-k still reports log p at temperature 1."""
  out = _generate(params, rng=jax.random.key(1), temperature=0.7, top_k=5,
                  top_p=0.9)
  for row, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for t in range(MAX_NEW):
      token = int(out.tokens[row, t])
      logp = _log_softmax(_full_logits(params, seq))
      np.testing.assert_allclose(out.logprobs[row, t], logp[token],
                                 atol=2e-4)
      # top-k 5: the token is among the 5 most likely.
      assert (logp > logp[token]).sum() < 5
      seq.append(token)


def test_new_values_do_not_recompile(params):
  _generate(params, temperature=0.5)
  size = sampling._generate._cache_size()
  _generate(params, rng=jax.random.key(5), temperature=1.3, top_k=7,
            top_p=0.5, stop_token_ids=[3], max_new_per_row=np.array([1, 2, 3]),
            pad_id=9)
  _generate(params, temperature=np.array([0.0, 1.0, 2.0]), top_k=0)
  assert sampling._generate._cache_size() == size


# ---------------------------------------------------------------------------
# Filtering and drawing vs NumPy.
# ---------------------------------------------------------------------------


def _numpy_filtered_probs(logits, temperature, top_k, top_p):
  """The sampling distribution, computed by sorting (independent path)."""
  x = np.asarray(logits, np.float64) / (temperature if temperature > 0 else 1)
  order = np.argsort(-x, kind="stable")
  k = top_k if 0 < top_k < len(x) else len(x)
  keep = np.zeros(len(x), bool)
  keep[order[:k]] = True
  p = np.where(keep, np.exp(x - x.max()), 0.0)
  p /= p.sum()
  if top_p < 1:
    mass, nucleus = 0.0, np.zeros(len(x), bool)
    for i in order[:k]:
      nucleus[i] = True
      mass += p[i]
      if mass >= top_p:
        break
    p = np.where(nucleus, p, 0.0)
    p /= p.sum()
  return p


SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 10, 0.5),
    (0.5, 3, 0.9), (2.0, 50, 0.3), (1.0, 1, 1.0), (1.0, 0, 0.0)]


def test_filter_logits_matches_numpy():
  logits = jax.random.normal(jax.random.key(0), (len(SETTINGS), 50)) * 2
  t, k, p = (np.array(c) for c in zip(*SETTINGS))
  got = jax.nn.softmax(jax.jit(sampling.filter_logits)(
      logits, jnp.asarray(t, jnp.float32), jnp.asarray(k, jnp.int32),
      jnp.asarray(p, jnp.float32)), axis=-1)
  for row, (ti, ki, pi) in enumerate(SETTINGS):
    want = _numpy_filtered_probs(logits[row], ti, ki, pi)
    np.testing.assert_allclose(got[row], want, atol=1e-6)


@pytest.mark.parametrize("setting", [(1.0, 0, 1.0), (0.9, 6, 0.8),
                                     (1.5, 0, 0.7)])
def test_sampled_frequencies_match_numpy(setting):
  temperature, top_k, top_p = setting
  n = 20000
  logits = jax.random.normal(jax.random.key(1), (12,)) * 1.5
  batch = jnp.broadcast_to(logits, (n, 12))
  draws = jax.jit(sampling.sample_tokens)(
      jax.random.key(2), batch, jnp.full((n,), temperature),
      jnp.full((n,), top_k, jnp.int32), jnp.full((n,), top_p))
  freq = np.bincount(np.asarray(draws), minlength=12) / n
  want = _numpy_filtered_probs(logits, temperature, top_k, top_p)
  assert (freq[want == 0] == 0).all()
  # 4.5 standard deviations of a frequency estimate from n draws.
  np.testing.assert_allclose(freq, want, atol=4.5 * np.sqrt(0.25 / n))


def test_greedy_argmax_takes_first_maximum():
  logits = jnp.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0]])
  got = sampling.sample_tokens(jax.random.key(0), logits, jnp.zeros(2),
                               jnp.zeros(2, jnp.int32), jnp.ones(2))
  np.testing.assert_array_equal(got, [1, 0])
