"""DPO: sequence log-probs, the reference cache, the trainer, and that DPO learns.

The loss formulas themselves are checked against NumPy in tests/test_losses.py; here the
model side: which tokens count, cached == live reference, accumulation and sharding
invariance, the entry point (as a subprocess, one and two processes) and learning.
"""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhi import inputs
from rlhi import sharding
from rlhi.data import files
from rlhi.data.schema import Message, PreferencePair
from rlhi.models import llama
from rlhi.models import tokenizer as tok_lib
from rlhi.train import objectives
from rlhi.train import reference
from rlhi.train import step as step_lib

from tests import test_training as tt

REPO = tt.REPO
CONFIG = llama.get_config("tiny", hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16)
LOG2 = float(np.log(2.0))


@pytest.fixture(scope="module")
def fmt():
  return tok_lib.ChatFormatter(tok_lib.load_tokenizer("bundled"))


@pytest.fixture(scope="module")
def sample_examples(fmt, data_dir):
  d = data_dir
  examples, _ = inputs.pairs_source(os.path.join(d, files.PAIRS.format(split="train")),
                                    fmt, with_persona=True, max_length=512,
                                    max_response_length=256)
  return d, [examples[i] for i in range(len(examples))]  # HF dataset -> list of dicts


def _params(seed=1):
  return llama.init_params(CONFIG, jax.random.PRNGKey(seed))


def _batch(examples, fmt, n=8, bucket=512):
  return inputs.pad_batch(examples[:n], batch_size=n, pad_id=fmt.pad_id,
                          bucket_lengths=(bucket,), score_positions=True)


def _assert_close_trees(a, b, *, rtol, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _one_device_mesh():
  return sharding.make_mesh(dict(fsdp=1), devices=jax.devices()[:1])


def _with_ref(batch, chosen, rejected):
  return dict(batch) | {reference.CHOSEN: np.asarray(chosen, np.float32),
                        reference.REJECTED: np.asarray(rejected, np.float32)}


# ----------------------------------------------------------------------------------------
# Which tokens count.
# ----------------------------------------------------------------------------------------


def _independent_logps(params, example):
  """Sum of log p(response token | everything before it), from full logits, per side."""
  out = []
  p = len(example["prompt_ids"])
  for side in ("chosen", "rejected"):
    seq = np.concatenate([example["prompt_ids"], example[f"{side}_ids"]])
    logits = llama.forward_logits(params, CONFIG, jnp.asarray(seq[None]))[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
    # token t (t >= p) is predicted at position t - 1
    out.append(float(logp[np.arange(p - 1, len(seq) - 1), seq[p:]].sum()))
  return out


def test_sequence_logps_count_response_tokens_only(fmt, sample_examples):
  _, examples = sample_examples
  params = _params()
  batch = _batch(examples, fmt, n=4)
  logps, lengths = jax.jit(lambda p, b: objectives.sequence_logps(p, CONFIG, b, 32))(
      params, batch)
  for i in range(4):
    want = _independent_logps(params, examples[i])
    np.testing.assert_allclose([logps[i], logps[4 + i]], want, rtol=2e-5)
    assert lengths[i] == len(examples[i]["chosen_ids"])
    assert lengths[4 + i] == len(examples[i]["rejected_ids"])


def _left_pad(batch, length):
  """The same rows left-padded to `length`: pads first, positions from 0 at the text."""
  out = dict(batch)
  for side in ("chosen", "rejected"):
    n = batch[f"{side}_segment_ids"].sum(-1)
    for k in inputs.SEQUENCE_FIELDS:
      x = batch[f"{side}_{k}"]
      y = np.zeros((x.shape[0], length), x.dtype)
      for i in range(x.shape[0]):
        y[i, length - n[i]:] = x[i, :n[i]]
      out[f"{side}_{k}"] = y
    mask = out[f"{side}_loss_mask"]
    out[f"{side}_score_positions"] = inputs.score_columns(
        mask, inputs.score_width(int(mask.sum(1).max()), length))
  return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_padding_does_not_change_the_loss(fmt, sample_examples, loss_type):
  _, examples = sample_examples
  policy, ref = _params(1), _params(2)
  loss_fn = objectives.dpo_loss(CONFIG, loss_type=loss_type, beta=0.1, chunk=64,
                                live_reference=True)
  value = jax.jit(lambda p, b, r: loss_fn(p, b, None, r).loss.sum)
  right = _batch(examples, fmt, n=4, bucket=512)
  longer = _batch(examples, fmt, n=4, bucket=640)  # more pad tokens on the right
  left = _left_pad(right, 576)
  base = float(value(policy, right, ref))
  assert abs(base) > 1e-3
  for other in (longer, left):
    np.testing.assert_allclose(float(value(policy, other, ref)), base, rtol=2e-5)


# ----------------------------------------------------------------------------------------
# Policy == reference; cached == live.
# ----------------------------------------------------------------------------------------


def _loss_rounding_bound(loss_type, beta, logps, lengths, ulps=2):
  """How far float32 rounding alone can move the policy == reference loss, in float64.

  With policy == reference every log-ratio is exactly 0 in exact arithmetic, so the
  loss is its closed form (log 2 for sigmoid, (1 / 2 beta)^2 for ipo). In float32 the
  policy pass (under grad) and the reference pass (stop_gradient) are compiled apart and
  may sum a sequence's token log-probs in another order: each summed log-prob can differ
  by a few ulps of its magnitude (the observed deviation is a fraction of one ulp; 2 are
  allowed). To first order, a pair's loss moves by |dloss/dmargin| times its margin's
  error: beta / 2 for sigmoid (softplus' slope at 0) and 1 / beta for ipo (length-
  normalised log-ratios).
  """
  b = len(logps) // 2
  ulp = ulps * np.spacing(np.abs(np.asarray(logps, np.float32))).astype(np.float64)
  policy_and_ref = 2 * ulp  # each of the two passes may be off by `ulp`
  if loss_type == "sigmoid":
    per_pair = beta / 2 * (policy_and_ref[:b] + policy_and_ref[b:])
  else:
    lengths = np.asarray(lengths, np.float64)
    per_pair = 1 / beta * (policy_and_ref[:b] / lengths[:b]
                           + policy_and_ref[b:] / lengths[b:])
  return float(per_pair.mean())


def test_policy_equal_to_reference_gives_log2_and_ipo_closed_form(fmt, sample_examples):
  _, examples = sample_examples
  params = _params()
  batch = _batch(examples, fmt)
  logps, lengths = jax.jit(lambda p, b: objectives.sequence_logps(p, CONFIG, b))(
      params, batch)
  beta = 0.1
  for loss_type, want in (("sigmoid", LOG2), ("ipo", (1 / (2 * beta)) ** 2)):
    loss_fn = objectives.dpo_loss(CONFIG, loss_type=loss_type, beta=beta,
                                  live_reference=True)
    out, grads = jax.jit(step_lib.value_and_grad(
        lambda p, f=loss_fn: f(p, batch, None, params)))(params)
    num, den, metrics = out.loss.sum, out.loss.count, out.metrics
    # The closed form is the float64 value of the same quantity; the tolerance is what
    # float32 rounding of the summed log-probs can add, plus rounding of the loss itself.
    tol = (_loss_rounding_bound(loss_type, beta, logps, lengths)
           + 8 * np.finfo(np.float32).eps * want)
    assert abs(float(num / den) - want) <= tol, (loss_type, float(num / den), want, tol)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(optax.tree.norm(grads)) > 0
    # The summed margin is beta x (four log-prob differences) per pair, each off by at
    # most the same ulps as above.
    ulp = 2 * np.spacing(np.abs(np.asarray(logps, np.float32))).astype(np.float64)
    margin_tol = beta * 2 * float(ulp.sum())
    assert abs(float(metrics["rewards/margins"].sum)) <= margin_tol
    # A reference that differs by one token's log-prob moves the loss far past `tol`:
    # the bound leaves the test able to fail.
    assert tol < 1e-2 * beta


def test_cached_reference_equals_live(fmt, sample_examples):
  _, examples = sample_examples
  policy, ref = _params(1), _params(2)
  mesh = sharding.make_mesh(dict(fsdp=2, tensor=2, data=2))
  chosen, rejected = reference.compute(ref, CONFIG, examples[:8], mesh=mesh,
                                       batch_size=4, pad_id=fmt.pad_id,
                                       bucket_lengths=(512,), chunk=64)
  batch = _batch(examples, fmt)
  cached_fn = objectives.dpo_loss(CONFIG, loss_type="sigmoid", rpo_alpha=0.5)
  live_fn = objectives.dpo_loss(CONFIG, loss_type="sigmoid", rpo_alpha=0.5,
                                live_reference=True)
  grad = lambda f, *a: jax.jit(step_lib.value_and_grad(f))(*a)
  c, c_g = grad(lambda p: cached_fn(p, _with_ref(batch, chosen, rejected), None), policy)
  l, l_g = grad(lambda p: live_fn(p, batch, None, ref), policy)
  np.testing.assert_allclose(float(c.loss.sum), float(l.loss.sum), rtol=1e-5)
  for k in c.metrics:
    np.testing.assert_allclose(float(c.metrics[k].sum), float(l.metrics[k].sum),
                               rtol=1e-4, atol=1e-5, err_msg=k)
  # The two reference computations run on different meshes (different reduction
  # orders), so the gradients agree to float32 rounding of the log-probs.
  _assert_close_trees(c_g, l_g, rtol=1e-3, atol=2e-5)


def test_reference_cache_reused_only_for_the_same_inputs(fmt, sample_examples, tmp_path):
  _, examples = sample_examples
  examples = examples[:6]
  params = _params(3)
  mesh = _one_device_mesh()
  args = dict(cache_dir=str(tmp_path), tokenizer="bundled", system_template="T {persona}",
              mesh=mesh, batch_size=4, pad_id=fmt.pad_id, bucket_lengths=(512,), chunk=64)
  first = reference.cached(params, CONFIG, examples, **args)
  assert not first.reused and os.path.exists(first.path)
  again = reference.cached(params, CONFIG, examples, **args)
  assert again.reused and again.path == first.path
  for a, b in zip(first.examples, again.examples):  # bit-identical through JSON
    assert a[reference.CHOSEN] == b[reference.CHOSEN]
    assert a[reference.REJECTED] == b[reference.REJECTED]
  # Other params, other data, another template: a new key, computed afresh.
  others = [
      reference.cached(_params(4), CONFIG, examples, **args),
      reference.cached(params, CONFIG, examples[:5], **args),
      reference.cached(params, CONFIG, examples, **args | {"system_template": "{persona}"}),
  ]
  assert all(not o.reused for o in others)
  assert len({first.path, *(o.path for o in others)}) == 4
  # The fingerprint is exact and layout-independent.
  sharded = jax.device_put(params, sharding.logical_shardings(
      llama.abstract_params(CONFIG), sharding.make_mesh(dict(fsdp=4, tensor=2))))
  assert reference.params_fingerprint(sharded) == reference.params_fingerprint(params)
  leaves, treedef = jax.tree.flatten(params)
  leaves[0] = leaves[0].at[(3,) * leaves[0].ndim].add(1e-6)  # one value, one ulp or so
  bumped = jax.tree.unflatten(treedef, leaves)
  assert reference.params_fingerprint(bumped) != reference.params_fingerprint(params)


# ----------------------------------------------------------------------------------------
# Accumulation and sharding invariance.
# ----------------------------------------------------------------------------------------


def _dpo_steps(mesh, accum, fmt, examples, steps=2):
  ref = _params(2)
  chosen, rejected = reference.compute(ref, CONFIG, examples[:8], mesh=mesh,
                                       batch_size=8, pad_id=fmt.pad_id,
                                       bucket_lengths=(512,), chunk=64)
  batch = _with_ref(_batch(examples, fmt), chosen, rejected)
  batch["valid"][-1] = False  # a padding row counts for nothing
  return dpo_train_steps(mesh, accum, batch, steps=steps, chunk=64)


def dpo_train_steps(mesh, accum, batch, *, steps=2, chunk=64):
  """`steps` SGD steps of sigmoid + 0.1 sft DPO from `_params(1)` on `batch` (plain or
  packed, with reference log-probs) on `mesh`: (final params, metrics per step)."""
  opt = optax.sgd(0.5)  # see test_training: Adam would amplify rounding differences
  loss_fn = objectives.dpo_loss(CONFIG, loss_type=("sigmoid", "sft"),
                                loss_weights=(1.0, 0.1), beta=0.2, chunk=chunk)
  with sharding.use_mesh(mesh):
    abstract = jax.eval_shape(lambda: step_lib.init_state(llama.abstract_params(CONFIG),
                                                          opt, 0))
    shardings = sharding.logical_shardings(abstract, mesh)
    state = jax.jit(lambda p: step_lib.init_state(p, opt, 0),
                    out_shardings=shardings)(_params(1))
    step = jax.jit(step_lib.make_train_step(loss_fn, opt, accum),
                   out_shardings=(shardings, None))
    out = []
    for _ in range(steps):
      state, m = step(state, sharding.global_batch(batch, mesh))
      out.append({k: float(v) for k, v in m.items()})
  return jax.device_get(state.params), out


def test_accumulation_and_sharding_do_not_change_dpo(fmt, sample_examples):
  _, examples = sample_examples
  p1, m1 = _dpo_steps(_one_device_mesh(), 1, fmt, examples)
  p4, m4 = _dpo_steps(_one_device_mesh(), 4, fmt, examples)
  p8, m8 = _dpo_steps(sharding.make_mesh(dict(data=2, fsdp=2, tensor=2)), 1, fmt,
                      examples)
  for params, metrics in ((p4, m4), (p8, m8)):
    for a, b in zip(m1, metrics):
      for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    _assert_close_trees(p1, params, rtol=1e-4, atol=1e-5)
  assert m1[1]["loss"] < m1[0]["loss"]
  assert m1[0]["denominator"] == 7  # 7 valid pairs of 8


# ----------------------------------------------------------------------------------------
# DPO learns a systematic preference.
# ----------------------------------------------------------------------------------------


def _distinguishable_pairs(fmt, n, seed):
  r = np.random.default_rng(seed)
  words = ["apple", "river", "stone", "cloud", "green", "light", "music", "table"]
  pairs = []
  for i in range(n):
    body = " ".join(r.choice(words, size=4))
    pairs.append(PreferencePair(
        pair_id=str(i), user_id="u", split="train",
        prompt=(Message("user", f"Say something about {r.choice(words)}."),),
        chosen=f"Sure! {body}.", rejected=f"No. {body}.", persona="", source="synthetic"))
  ex, _ = inputs.tokenize_pairs(fmt, pairs, with_persona=False, max_length=64)
  return ex


@pytest.mark.slow  # 20-90 s on 2 cores; CI runs it
def test_dpo_learns_a_systematic_preference(fmt):
  mesh = _one_device_mesh()
  train, held_out = _distinguishable_pairs(fmt, 64, 0), _distinguishable_pairs(fmt, 16, 1)
  params = _params(5)
  args = dict(mesh=mesh, batch_size=16, pad_id=fmt.pad_id, bucket_lengths=(64,), chunk=64)
  train = reference.attach(train, *reference.compute(params, CONFIG, train, **args))
  held_out = reference.attach(held_out, *reference.compute(params, CONFIG, held_out,
                                                           **args))
  loss_fn = objectives.dpo_loss(CONFIG, beta=0.1, chunk=64)
  opt = optax.adam(3e-3)
  step = jax.jit(step_lib.make_train_step(loss_fn, opt))
  eval_step = jax.jit(step_lib.make_eval_step(loss_fn))
  state = step_lib.init_state(params, opt, 0)

  def evaluate(p):
    b = inputs.pad_batch(held_out, batch_size=16, pad_id=fmt.pad_id, bucket_lengths=(64,))
    m = jax.device_get(eval_step(p, b, jax.random.PRNGKey(0)))
    return {k: float(v.sum) / float(v.count) for k, v in m.items()}

  before = evaluate(state.params)
  batches = inputs.make_batches(train, per_host_batch_size=16, pad_id=fmt.pad_id,
                                bucket_lengths=(64,), seed=0)
  with sharding.use_mesh(mesh):
    for i in range(40):
      state, _ = step(state, batches[i])
  after = evaluate(state.params)
  assert before["loss"] == pytest.approx(LOG2, abs=1e-5)
  assert after["rewards/accuracies"] >= 0.95
  assert after["rewards/margins"] > before["rewards/margins"] + 1.0
  assert after["loss"] < 0.3


# ----------------------------------------------------------------------------------------
# The entry point.
# ----------------------------------------------------------------------------------------


def _dpo_cmd(data_dir, workdir, steps, extra=()):
  return tt.experiment_cmd("train_dpo", f"configs/dpo.py:rewrites,steps={steps}",
                           data_dir, workdir, ["--config.optimizer.lr=1e-3", *extra],
                           bucket=512)


def _train_metrics(workdir):
  return [m for m in tt._metrics(workdir) if "train/loss" in m]


def _run(cmd, devices=2):
  p = subprocess.run(cmd, cwd=REPO, env=tt._env(devices), capture_output=True, text=True)
  assert p.returncode == 0, p.stderr[-4000:]
  return p.stderr


@pytest.mark.slow
def test_train_dpo_entry_point_cache_reuse_and_live_mode(sample_examples, tmp_path):
  data_dir, _ = sample_examples
  cache = str(tmp_path / "cache")
  first = str(tmp_path / "first")
  log = _run(_dpo_cmd(data_dir, first, 3, [f"--config.reference.cache_dir={cache}"]))
  assert "(computed)" in log
  report = json.load(open(os.path.join(first, "eval_report.json")))
  for tag in ("val_persona", "val_no_persona", "test_persona", "test_no_persona"):
    assert 0.0 <= report[f"{tag}/rewards/accuracies"] <= 1.0
  assert os.path.exists(os.path.join(first, "hf", "model.safetensors"))
  assert os.path.exists(os.path.join(first, "hf", "tokenizer.json"))
  assert len(os.listdir(cache)) == 5  # train + 2 eval splits x 2 persona settings

  second = str(tmp_path / "second")
  log = _run(_dpo_cmd(data_dir, second, 3, [f"--config.reference.cache_dir={cache}"]))
  assert "(reused)" in log
  live = str(tmp_path / "live")
  _run(_dpo_cmd(data_dir, live, 3, ["--config.reference.mode=live"]))
  # Packed batches, reference log-probs computed packed too: the same run up to
  # float32 rounding.
  packed = str(tmp_path / "packed")
  _run(_dpo_cmd(data_dir, packed, 3, ["--config.data.packing=True",
                                      f"--config.reference.cache_dir={packed}/cache"]))
  m1, m2, m3, m4 = (_train_metrics(w) for w in (first, second, live, packed))
  assert [m["step"] for m in m1] == [1, 2, 3]
  for a, b, c, d in zip(m1, m2, m3, m4):
    for k in ("train/loss", "train/rewards/margins", "train/logps/chosen",
              "train/grad_norm"):
      assert a[k] == b[k], k  # reused cache: the very same numbers
      np.testing.assert_allclose(a[k], c[k], rtol=1e-4, atol=1e-6, err_msg=k)
      np.testing.assert_allclose(a[k], d[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert m1[-1]["train/loss"] != m1[0]["train/loss"]


@pytest.mark.slow
def test_train_dpo_two_processes_agree_and_only_process_0_writes(sample_examples,
                                                                 tmp_path):
  data_dir, _ = sample_examples
  one = str(tmp_path / "one")
  _run(_dpo_cmd(data_dir, one, 2))
  two = str(tmp_path / "two")
  tt.run_on_two_processes(_dpo_cmd(data_dir, two, 2), timeout=300)
  m1, m2 = _train_metrics(one), _train_metrics(two)
  assert [m["step"] for m in m2] == [1, 2]  # one line per step: process 1 wrote none
  for a, b in zip(m1, m2):
    for k in ("train/loss", "train/rewards/accuracies", "train/rewards/margins",
              "train/grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  tt._assert_trees_equal(tt._final_state(one, 2), tt._final_state(two, 2), rtol=1e-5)
  r1 = json.load(open(os.path.join(one, "eval_report.json")))
  r2 = json.load(open(os.path.join(two, "eval_report.json")))
  assert r1.pop("inputs") == r2.pop("inputs")  # the same pairs read, cut and dropped
  for k in r1:
    np.testing.assert_allclose(r1[k], r2[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert len(os.listdir(os.path.join(two, "reference_logps"))) == 5  # no .tmp leftovers
