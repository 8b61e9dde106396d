"""Packed batches (rlhi/inputs/batches.py `pack`): several examples per row, a pair's prompt
shared by its two responses. The layout is checked by hand; every number a packed batch
gives (log-probs, reward scores, the SFT / RM / DPO losses and their gradients, train
steps with accumulation on 8 devices, the reference pass) against the unpacked path,
which tests/test_dpo.py checks against full logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhi import inputs
from rlhi import sharding
from rlhi.models import llama
from rlhi.models import reward
from rlhi.train import objectives
from rlhi.train import reference
from rlhi.train import step as step_lib
from tests import test_dpo

CONFIG = test_dpo.CONFIG  # its DPO train steps run here on packed batches
BUCKETS = (64, 128)


def _ragged_pairs(n, seed, *, max_prompt=60, max_response=30):
  """Pairs of random lengths: a one-token prompt, empty responses, long prompts."""
  r = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p = 1 if i == 0 else int(r.integers(1, max_prompt))
    c = 0 if i == 1 else int(r.integers(0, max_response))
    x = 0 if i == 2 else int(r.integers(1, max_response))
    out.append(dict(prompt_ids=r.integers(1, 4000, p), chosen_ids=r.integers(1, 4000, c),
                    rejected_ids=r.integers(1, 4000, x), pair_id=str(i), user_id="u",
                    ref_chosen_logps=np.float32(-r.random() * 50),
                    ref_rejected_logps=np.float32(-r.random() * 50)))
  return out


def _params(seed=1):
  return llama.init_params(CONFIG, jax.random.PRNGKey(seed))


def _by_example(packed_values, batch):
  """Slot-ordered [N] values of a packed batch -> the examples' order."""
  index = np.asarray(batch["example_index"]).reshape(-1)
  out = np.full(index.max() + 1, np.nan, np.float32)
  out[index[index >= 0]] = np.asarray(packed_values)[index >= 0]
  return out


def _one_device_mesh():
  return sharding.make_mesh(dict(fsdp=1), devices=jax.devices()[:1])


# ----------------------------------------------------------------------------------------
# Layout.
# ----------------------------------------------------------------------------------------


def test_pack_lays_out_a_pair_by_hand():
  pair = dict(prompt_ids=[5, 6, 7], chosen_ids=[8, 9], rejected_ids=[10],
              ref_chosen_logps=-1.5, ref_rejected_logps=-2.5)
  sft = dict(tokens=[11, 12, 13], loss_mask=[0, 1, 1])
  b = inputs.pack([pair, pair], [[0, 1]], num_rows=2, length=16, slots=2, pad_id=0)
  row = b["tokens"][0]
  np.testing.assert_array_equal(row[:14], [5, 6, 7, 8, 9, 7, 10] * 2)
  np.testing.assert_array_equal(b["positions"][0, :7], [0, 1, 2, 3, 4, 2, 3])
  np.testing.assert_array_equal(b["response_ids"][0, :7], [0, 0, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(b["segment_ids"][0], [1] * 7 + [2] * 7 + [0, 0])
  # Targets 8, 9 (chosen) and 10 (rejected), predicted from the prompt's last token
  # (its copy) and the responses' own tokens; never across responses or pairs.
  np.testing.assert_array_equal(b["loss_mask"][0, :7], [0, 0, 1, 1, 0, 1, 0])
  np.testing.assert_array_equal(b["targets"][0, :7], [6, 7, 8, 9, 7, 10, 5])
  np.testing.assert_array_equal(b["chosen_end"][0], [4, 11])
  np.testing.assert_array_equal(b["rejected_end"][0], [6, 13])
  np.testing.assert_array_equal(b["prompt_length"][0], [3, 3])
  np.testing.assert_array_equal(b["valid"], [[True, True], [False, False]])
  np.testing.assert_array_equal(b["example_index"], [[0, 1], [-1, -1]])
  np.testing.assert_array_equal(b["ref_rejected_logps"][0], [-2.5, -2.5])
  assert not b["tokens"][1].any() and not b["segment_ids"][1].any()
  assert inputs.packed_length(pair) == 7

  s = inputs.pack([sft, sft], [[1], [0]], num_rows=2, length=4, slots=1, pad_id=0,
                  first_index=5)
  np.testing.assert_array_equal(s["loss_mask"], [[1, 1, 0, 0]] * 2)
  np.testing.assert_array_equal(s["example_index"], [[6], [5]])
  assert "response_ids" not in s


def test_attention_mask_separates_the_two_responses():
  seg = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 0]])
  resp = jnp.asarray([[0, 0, 1, 1, 2, 0, 1, 0]])
  slots = jnp.arange(8)
  m = np.asarray(llama.attention_mask(slots, slots, seg, seg, None, resp, resp))[0]
  expected = np.zeros((8, 8), bool)
  for q in range(8):
    for k in range(q + 1):
      same = seg[0, q] == seg[0, k] != 0
      sees = resp[0, k] == 0 or resp[0, k] == resp[0, q]
      expected[q, k] = bool(same and sees)
  np.testing.assert_array_equal(m, expected)
  assert not m[4, 2] and not m[4, 3] and m[4, 1] and m[3, 2]  # rejected skips chosen


def test_plan_rows_is_first_fit_decreasing():
  # 9 opens row 0; 6 row 1; 5 does not fit 6's row: row 2; 4 joins 6, 3 joins 5.
  assert inputs.plan_rows([5, 9, 4, 3, 6], 10) == [[1], [2, 4], [0, 3]]
  assert inputs.plan_rows([10, 10], 10) == [[0], [1]]
  with pytest.raises(ValueError, match="does not fit"):
    inputs.plan_rows([11], 10)


def test_make_batches_packs_each_host_and_hosts_agree_on_shapes():
  examples = _ragged_pairs(24, seed=3)
  per_host = {}
  for host in range(2):
    ds = inputs.make_batches(examples, per_host_batch_size=6, pad_id=0,
                             bucket_lengths=BUCKETS, seed=1, process_index=host,
                             process_count=2, num_epochs=1, packing=True, row_multiple=2)
    per_host[host] = [ds[i] for i in range(len(ds))]
  plain = inputs.make_batches(examples, per_host_batch_size=12, pad_id=0,
                              bucket_lengths=BUCKETS, seed=1, num_epochs=1,
                              with_metadata=True)
  for k, (b0, b1) in enumerate(zip(per_host[0], per_host[1])):
    assert {n: v.shape for n, v in b0.items()} == {n: v.shape for n, v in b1.items()}
    assert b0["tokens"].shape[0] % 2 == 0
    index = np.concatenate([b0["example_index"].reshape(-1),
                            b1["example_index"].reshape(-1)])
    assert sorted(index[index >= 0]) == list(range(12))  # each example once
    # Slot (r, j) holds the example the unpacked global batch has at its index.
    want = plain[k]
    for host, b in ((0, b0), (1, b1)):
      for r, j in zip(*np.nonzero(b["valid"])):
        g = b["example_index"][r, j]
        assert (host * 6 <= g < host * 6 + 6)
        row = b["tokens"][r][b["segment_ids"][r] == j + 1]
        n = want["prompt_length"][g]
        np.testing.assert_array_equal(row[:n - 1], want["chosen_tokens"][g, :n - 1])
  # A state saved with packing restores without it (same examples per batch).
  it = inputs.make_iterator(examples, per_host_batch_size=6, pad_id=0, packing=True,
                            bucket_lengths=BUCKETS)
  next(it)
  other = inputs.make_iterator(examples, per_host_batch_size=6, pad_id=0,
                               bucket_lengths=BUCKETS)
  other.set_state(it.get_state())


def test_a_pair_longer_than_the_largest_bucket_gets_twice_that_length():
  pair = dict(prompt_ids=np.arange(1, 61), chosen_ids=np.arange(1, 50),
              rejected_ids=np.arange(1, 50))
  b = inputs.pack_batch([pair], pad_id=0, bucket_lengths=(64, 128))
  assert b["tokens"].shape == (1, 256)


# ----------------------------------------------------------------------------------------
# Numbers: packed == unpacked.
# ----------------------------------------------------------------------------------------


def test_packed_logps_scores_and_losses_equal_unpacked():
  examples = _ragged_pairs(12, seed=0)
  # The packed batch runs the LM head on the response targets only (score_positions),
  # the plain one on every column.
  plain = inputs.pad_batch(examples, batch_size=12, pad_id=0, bucket_lengths=BUCKETS)
  packed = inputs.pack_batch(examples, pad_id=0, bucket_lengths=BUCKETS,
                             score_positions=True)
  # Shared prompts: fewer rows and fewer tokens than one pair per row, twice.
  assert packed["tokens"].shape[0] < 12
  assert np.count_nonzero(packed["segment_ids"]) < (
      np.count_nonzero(plain["chosen_segment_ids"])
      + np.count_nonzero(plain["rejected_segment_ids"]))
  params = _params()

  lp, n_p = objectives.sequence_logps(params, CONFIG, packed, chunk=32)
  lu, n_u = objectives.sequence_logps(params, CONFIG, plain, chunk=32)
  slots = packed["valid"].size
  for side in range(2):
    got = _by_example(lp[side * slots:(side + 1) * slots], packed)
    want = np.asarray(lu[side * 12:(side + 1) * 12])
    np.testing.assert_array_equal(_by_example(n_p[side * slots:(side + 1) * slots],
                                              packed), n_u[side * 12:(side + 1) * 12])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  scored = inputs.pad_batch(examples, batch_size=12, pad_id=0, bucket_lengths=BUCKETS,
                            score_positions=True)
  assert scored["chosen_score_positions"].shape[1] < scored["chosen_tokens"].shape[1]
  ls, n_s = objectives.sequence_logps(params, CONFIG, scored, chunk=32)
  np.testing.assert_array_equal(n_s, n_u)
  np.testing.assert_allclose(ls, lu, rtol=1e-5, atol=1e-4)

  rm = reward.init_params(CONFIG, jax.random.PRNGKey(2))
  rm["score"]["kernel"] = jax.random.normal(jax.random.PRNGKey(3), (CONFIG.hidden_size,))
  for got, want in zip(objectives.pair_scores(rm, CONFIG, packed),
                       objectives.pair_scores(rm, CONFIG, plain)):
    np.testing.assert_allclose(_by_example(got, packed), want, rtol=1e-5, atol=1e-5)

  ref = _params(7)
  for name, loss_fn, p in [
      ("dpo", objectives.dpo_loss(CONFIG, loss_type=("sigmoid", "ipo"),
                                  loss_weights=(1.0, 0.5), rpo_alpha=0.3, chunk=32),
       params),
      ("dpo live", objectives.dpo_loss(CONFIG, live_reference=True, chunk=32), params),
      ("reward", objectives.reward_loss(CONFIG, margin=0.1, center_coef=0.01), rm)]:
    extra = (ref,) if "live" in name else ()
    f = jax.jit(step_lib.value_and_grad(
        lambda q, b, f=loss_fn, e=extra: f(q, b, None, *e)))
    out_p, g_p = f(p, packed)
    out_u, g_u = f(p, plain)
    assert float(out_p.loss.count) == float(out_u.loss.count) == 12, name
    np.testing.assert_allclose(float(out_p.loss.sum), float(out_u.loss.sum), rtol=1e-5,
                               err_msg=name)
    for k in out_u.metrics:
      np.testing.assert_allclose(float(out_p.metrics[k].sum), float(out_u.metrics[k].sum),
                                 rtol=1e-4, atol=1e-4, err_msg=f"{name} {k}")
    for x, y in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_u)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5,
                                 err_msg=name)


def test_packed_sft_equals_unpacked():
  r = np.random.default_rng(5)
  examples = []
  for n in (5, 40, 17, 90, 3, 33):
    mask = np.zeros(n, np.int32)
    mask[r.integers(1, n):] = 1
    examples.append(dict(tokens=r.integers(1, 4000, n), loss_mask=mask))
  plain = inputs.pad_batch(examples, batch_size=8, pad_id=0, bucket_lengths=BUCKETS)
  packed = inputs.pack_batch(examples, pad_id=0, bucket_lengths=BUCKETS)
  assert packed["tokens"].shape == (2, 128)
  loss_fn = objectives.sft_loss(CONFIG, chunk=32)
  f = jax.jit(step_lib.value_and_grad(lambda p, b: loss_fn(p, b, None)))
  out_p, g_p = f(_params(), packed)
  out_u, g_u = f(_params(), plain)
  assert float(out_p.loss.count) == float(out_u.loss.count)
  np.testing.assert_allclose(float(out_p.loss.sum), float(out_u.loss.sum), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_u)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5)


def test_packed_train_steps_with_accumulation_on_8_devices_equal_unpacked():
  examples = _ragged_pairs(16, seed=1)
  examples[-1] = dict(examples[-1])
  plain = inputs.pad_batch(examples[:15], batch_size=16, pad_id=0,
                           bucket_lengths=BUCKETS)  # one padding row
  p1, m1 = test_dpo.dpo_train_steps(_one_device_mesh(), 1, plain, chunk=32)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  multiple = sharding.row_multiple(mesh, accum_steps=2)
  assert multiple == 8  # 4 batch shards x 2 microbatches, one process
  packed = inputs.pack_batch(examples[:15], pad_id=0, bucket_lengths=BUCKETS,
                             row_multiple=multiple, score_positions=True)
  assert packed["tokens"].shape[0] == 8
  p8, m8 = test_dpo.dpo_train_steps(mesh, 2, packed, chunk=32)
  for a, b in zip(m1, m8):
    for k in ("loss", "denominator", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "kl_proxy"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
  assert m1[0]["denominator"] == 15
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_packed_reference_pass_equals_unpacked_on_8_devices():
  examples = _ragged_pairs(21, seed=2)  # a last partial batch
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  args = dict(mesh=mesh, batch_size=8, pad_id=0, bucket_lengths=BUCKETS, chunk=32)
  c_u, r_u = reference.compute(_params(4), CONFIG, examples, **args)
  c_p, r_p = reference.compute(_params(4), CONFIG, examples, packing=True, **args)
  assert c_p.shape == (21,)
  np.testing.assert_allclose(c_p, c_u, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(r_p, r_u, rtol=1e-5, atol=1e-4)
