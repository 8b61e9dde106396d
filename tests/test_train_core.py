"""The shared training core: accumulation, the non-finite guard, optimizer, checkpoints."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhi import inputs
from rlhi.train import checkpoint as ckpt_lib
from rlhi.train import loop
from rlhi.train import optimizer as opt_lib
from rlhi.train import step as step_lib


def _loss(params, batch, rng):
  """Token-weighted squared error with a per-row token count: sums, not means."""
  del rng
  pred = batch["x"] @ params["w"] + params["b"]  # [B, T]
  err = (pred - batch["y"]) ** 2 * batch["mask"]
  n = batch["mask"].sum()
  abs_err = (jnp.abs(pred - batch["y"]) * batch["mask"]).sum()
  return step_lib.LossOutput(loss=step_lib.Metric(err.sum(), n),
                             metrics={"abs_err": step_lib.Metric(abs_err, n)})


def _data(seed=0, b=8, t=5, d=3):
  r = np.random.default_rng(seed)
  mask = (r.random((b, t)) < 0.7).astype(np.float32)
  mask[:, 0] = 1
  return {"x": r.normal(size=(b, t, d)).astype(np.float32),
          "y": r.normal(size=(b, t)).astype(np.float32), "mask": mask}


def _params():
  return {"w": jnp.array([0.5, -0.2, 0.1]), "b": jnp.array(0.3)}


def test_accumulation_4x2_equals_1x8_and_a_numpy_gradient():
  batch = _data()
  opt = optax.sgd(0.1)
  s1 = step_lib.init_state(_params(), opt, 0)
  one = jax.jit(step_lib.make_train_step(_loss, opt, 1))
  four = jax.jit(step_lib.make_train_step(_loss, opt, 4))
  a, ma = one(s1, batch)
  b, mb = four(s1, batch)
  np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-6)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
  # independent: token-weighted MSE gradient by hand in numpy
  w, b0 = np.array([0.5, -0.2, 0.1]), 0.3
  x, y, m = batch["x"], batch["y"], batch["mask"]
  err = x @ w + b0 - y
  n = m.sum()
  gw = 2 * np.einsum("btd,bt->d", x, err * m) / n
  np.testing.assert_allclose(a.params["w"], w - 0.1 * gw, rtol=1e-5)
  np.testing.assert_allclose(ma["loss"], (err ** 2 * m).sum() / n, rtol=1e-5)
  np.testing.assert_allclose(ma["abs_err"], (np.abs(err) * m).sum() / n, rtol=1e-5)


def test_non_finite_step_changes_nothing():
  batch = _data()
  batch["y"][0, 0] = np.nan
  opt = optax.adam(0.1)
  s = step_lib.init_state(_params(), opt, 0)
  new, m = jax.jit(step_lib.make_train_step(_loss, opt))(s, batch)
  assert int(m["finite"]) == 0
  for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(s)):
    np.testing.assert_array_equal(x, y)


def test_schedule_warmup_and_cosine():
  sched = opt_lib.learning_rate_schedule(
      dict(lr=1.0, warmup_steps=10, decay="cosine", end_lr_factor=0.1), 110)
  assert float(sched(0)) == 0.0 and abs(float(sched(5)) - 0.5) < 1e-6
  assert abs(float(sched(10)) - 1.0) < 1e-6
  assert abs(float(sched(60)) - (0.1 + 0.9 * 0.5)) < 1e-5  # halfway down the cosine
  assert abs(float(sched(110)) - 0.1) < 1e-6
  with pytest.raises(ValueError, match="optimizer.decay"):
    opt_lib.learning_rate_schedule(dict(lr=1.0, decay="step"), 10)


def test_weight_decay_skips_vectors():
  opt, _ = opt_lib.make_optimizer(dict(lr=0.0 + 1.0, weight_decay=0.5, warmup_steps=0,
                                       decay="constant"), 10)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zeros, opt.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.5 * np.ones((2, 2)))
  np.testing.assert_allclose(updates["b"], np.zeros(2))


def _state(seed):
  opt = optax.adam(0.1)
  return step_lib.init_state({"w": jnp.arange(6.0).reshape(2, 3) + seed}, opt, seed)


def test_checkpoint_round_trip_keep_policy_and_corrupt_fallback(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_every=4)
  for step in range(1, 9):
    ck.save(step, _state(step), {"epoch": 0, "position": step})
  ck.wait()
  assert ck.all_steps() == [4, 7, 8]  # latest 2 plus every 4th
  abstract = jax.eval_shape(lambda: _state(0))
  step, state, data = ck.restore(abstract)
  assert step == 8 and data == {"epoch": 0, "position": 8}
  np.testing.assert_array_equal(state.params["w"], _state(8).params["w"])
  np.testing.assert_array_equal(state.rng, _state(8).rng)
  ck.close()

  # Corrupt every file of the newest checkpoint: restore falls back to step 7.
  for root, _, files in os.walk(tmp_path / "8"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_every=4)
  step, state, data = ck.restore(abstract)
  assert step == 7 and data["position"] == 7
  np.testing.assert_array_equal(state.params["w"], _state(7).params["w"])
  ck.close()


def test_restore_onto_a_sharded_target(tmp_path):
  mesh = jax.make_mesh((8,), ("fsdp",))
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  st = step_lib.init_state({"w": jnp.arange(16.0).reshape(8, 2)}, optax.sgd(1.0), 0)
  ck.save(1, st)
  ck.wait()
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree.map(lambda x: shard if x.ndim == 2 else rep, st)
  _, restored, _ = ck.restore(ckpt_lib.abstract_like(st, shardings))
  assert restored.params["w"].sharding == shard
  np.testing.assert_array_equal(restored.params["w"], st.params["w"])
  ck.close()


def _toy_loss(params, batch, rng):
  del rng
  x = batch["tokens"].astype(jnp.float32) / 100.0
  n = batch["loss_mask"].sum()
  return step_lib.LossOutput(
      loss=step_lib.Metric(((x * params["w"][0] - 1.0) ** 2 * batch["loss_mask"]).sum(),
                           n), metrics={})


def toy_task(loss_fn=_toy_loss):
  """A loop.Task that trains in a fraction of a second: w[0] fits (tokens/100) * w = 1
  on 16 examples that differ, so the input position matters on resume."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  examples = [{"tokens": np.arange(1, 9, dtype=np.int32) + i,
               "loss_mask": np.ones(8, np.int32)} for i in range(16)]
  abstract = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((2,), jnp.float32),
                                           ("embed",))}
  return loop.Task(name="toy", loss_fn=loss_fn, abstract_params=abstract,
                   init_params=lambda s: jax.device_put({"w": jnp.full((2,), 0.5)}, s),
                   train_examples=examples, pad_id=0)


def toy_config(total_steps=10, log_every=100, **checkpoint):
  """The loop config for `toy_task`: batch 4, Adam lr 0.05, a checkpoint every 2 steps
  (keep 5, synchronous) unless `checkpoint` overrides it."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      seed=0, total_steps=total_steps, batch_size=4, accum_steps=1, log_every=log_every,
      eval_every=0, mesh=dict(fsdp=-1), data=dict(bucket_lengths=(8,)),
      optimizer=dict(lr=0.05, warmup_steps=0, decay="constant", clip_norm=0.0),
      checkpoint={**dict(every=2, keep=5, keep_every=0, use_async=False), **checkpoint}))


def test_loop_stops_on_a_non_finite_step_and_saves_nothing_after_it(tmp_path):
  """The whole loop in process on a toy task whose loss turns NaN at step 3."""

  def loss_fn(params, batch, rng):
    # Adam moves w by ~lr per step: the 4th step's loss is NaN.
    poison = jnp.where(jnp.abs(params["w"][0] - 0.5) > 0.12, jnp.nan, 0.0)
    out = _toy_loss(params, batch, rng)
    return out._replace(loss=out.loss._replace(sum=out.loss.sum + poison))

  with pytest.raises(loop.NonFiniteError, match="non-finite loss"):
    loop.train(toy_config(), str(tmp_path), toy_task(loss_fn))
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps == [2]  # saved before the bad step (4); nothing from or after it


def test_held_out_rows_list_the_sets_with_examples():
  metrics = {"val_persona/count": 3.0, "val_persona/accuracy": 2 / 3,
             "val_persona/loss": 0.51234, "val_no_persona/count": 0.0,
             "test_no_persona/count": 4.0, "test_no_persona/accuracy": 0.25,
             "test_no_persona/loss": 1.0}
  rows = loop.held_out_rows(metrics, ("val", "test"),
                            [("accuracy", ".3f"), ("loss", ".4f")])
  assert rows == ["| val | persona | 3 | 0.667 | 0.5123 |",
                  "| test | no persona | 4 | 0.250 | 1.0000 |"]
  # With the input counts every set that was read has a row (an empty one too), and
  # the accuracy gets its Wilson interval.
  stats = loop.input_stats_by_tag({
      ("val", True): inputs.InputStats(examples=4, kept=3, truncated=1,
                                       dropped={"too_long": 1}),
      ("val", False): inputs.InputStats(examples=2, kept=0, dropped={"too_long": 2})})
  rows = loop.held_out_rows(metrics, ("val",), [("accuracy", ".3f"), ("loss", ".4f")],
                            input_stats=stats, accuracy="accuracy")
  lo, hi = _wilson_by_bisection(2, 3)
  assert rows == [f"| val | persona | 3 | 0.667 | [{lo:.2f}, {hi:.2f}] | 0.5123 | 1 | "
                  f"too_long 1 |",
                  "| val | no persona | 0 | n/a | n/a | n/a | 0 | too_long 2 |"]
  assert len(loop.held_out_header(["accuracy", "loss"], accuracy="accuracy")[0].split(
      "|")) == len(rows[0].split("|"))


def _wilson_by_bisection(k, n, z=1.96):
  """The Wilson interval's ends as the roots of |p - k/n| = z sqrt(p (1 - p) / n),
  found by bisection (not the closed form that loop.wilson_interval uses)."""
  f = lambda p: abs(p - k / n) - z * (p * (1 - p) / n) ** 0.5

  def root(a, b):
    for _ in range(200):
      m = (a + b) / 2
      a, b = (m, b) if (f(a) > 0) == (f(m) > 0) else (a, m)
    return (a + b) / 2

  return root(0.0, k / n), root(k / n, 1.0)


def test_wilson_interval_matches_its_definition():
  for k, n in [(0, 8), (8, 8), (2, 3), (27, 36), (5, 11)]:
    lo, hi = loop.wilson_interval(k, n)
    want = _wilson_by_bisection(k, n)
    assert (lo, hi) == pytest.approx(want, abs=1e-9), (k, n)
