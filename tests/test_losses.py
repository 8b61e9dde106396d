"""DPO-family losses (rlhi.losses.dpo_loss) against an independent NumPy version.

The reference below is written from TRL's DPOTrainer formulas in float64 (with the
deviations documented in dpo_loss: cDPO for sigmoid, the batch-mean bco_pair delta,
per-pair length-normalised sft/RPO NLL); it shares no code with rlhi.losses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhi import losses

LOG2 = float(np.log(2.0))
ALL = losses.DPO_LOSS_TYPES


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_dpo(pc, pr, rc, rr, lc, lr, loss_type, loss_weights=None, beta=0.1,
            label_smoothing=0.0, rpo_alpha=0.0, weights=None, bco_delta=None):
  """float64 reference: (losses, chosen_rewards, rejected_rewards)."""
  pc, pr, rc, rr, lc, lr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr, lc, lr))
  types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
  loss_weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
  ls = label_smoothing
  cl, rl = pc - rc, pr - rr  # log-ratios
  logits = cl - rl
  lc, lr = np.maximum(lc, 1.0), np.maximum(lr, 1.0)
  total = np.zeros_like(pc)
  for t, w in zip(types, loss_weights):
    if t == "sigmoid":
      x = -_log_sigmoid(beta * logits) * (1 - ls) - _log_sigmoid(-beta * logits) * ls
    elif t == "hinge":
      x = np.maximum(0.0, 1 - beta * logits)
    elif t == "ipo":
      x = ((pc / lc - rc / lc) - (pr / lr - rr / lr) - 1 / (2 * beta)) ** 2
    elif t == "robust":
      x = ((-_log_sigmoid(beta * logits) * (1 - ls) + _log_sigmoid(-beta * logits) * ls)
           / (1 - 2 * ls))
    elif t == "apo_zero":
      x = (1 - _sigmoid(beta * cl)) + _sigmoid(beta * rl)
    elif t == "apo_down":
      x = _sigmoid(beta * cl) + (1 - _sigmoid(beta * (cl - rl)))
    elif t == "nca_pair":
      x = (-_log_sigmoid(beta * cl) - 0.5 * _log_sigmoid(-beta * cl)
           - 0.5 * _log_sigmoid(-beta * rl))
    elif t == "sppo_hard":
      x = (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2
    elif t == "bco_pair":
      if bco_delta is None:
        m = np.ones_like(pc) if weights is None else np.asarray(weights, np.float64)
        delta = (m * beta * cl).sum() + (m * beta * rl).sum()
        delta /= 2 * m.sum()
      else:
        delta = bco_delta
      x = -_log_sigmoid(beta * cl - delta) - _log_sigmoid(-(beta * rl - delta))
    elif t == "sft":
      x = -pc / lc
    else:
      raise ValueError(t)
    total = total + w * x
  total = total + rpo_alpha * (-pc / lc)
  return total, beta * cl, beta * rl


def _inputs(seed, b=16, ref_scale=3.0):
  """Realistic float32 inputs: summed log-probs in [-200, -5], lengths 1..64."""
  rng = np.random.default_rng(seed)
  pc = rng.uniform(-200, -5, b)
  pr = rng.uniform(-200, -5, b)
  rc = np.minimum(pc + rng.normal(0, ref_scale, b), -0.5)
  rr = np.minimum(pr + rng.normal(0, ref_scale, b), -0.5)
  lc = rng.integers(1, 65, b)
  lr = rng.integers(1, 65, b)
  return tuple(np.float32(a) for a in (pc, pr, rc, rr)) + (lc, lr)


def _run(args, **kw):
  pc, pr, rc, rr, lc, lr = args
  return losses.dpo_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(rc),
                         jnp.asarray(rr), chosen_length=jnp.asarray(lc),
                         rejected_length=jnp.asarray(lr), **kw)


def _compare(args, rtol=1e-5, atol=1e-6, **kw):
  out = _run(args, **kw)
  want, want_c, want_r = _np_dpo(*args, **kw)
  for got in out:
    assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(out.losses), want, rtol=rtol, atol=atol)
  np.testing.assert_allclose(np.asarray(out.chosen_rewards), want_c, rtol=rtol,
                             atol=atol)
  np.testing.assert_allclose(np.asarray(out.rejected_rewards), want_r, rtol=rtol,
                             atol=atol)


@pytest.mark.parametrize("loss_type", ALL)
@pytest.mark.parametrize("seed,ref_scale", [(0, 3.0), (1, 3.0), (2, 30.0), (3, 0.3)])
def test_matches_numpy(loss_type, seed, ref_scale):
  args = _inputs(seed, ref_scale=ref_scale)
  _compare(args, loss_type=loss_type)
  _compare(args, loss_type=loss_type, beta=0.5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
@pytest.mark.parametrize("ls", [0.1, 0.3, 0.49])
def test_label_smoothing(loss_type, ls):
  for seed in range(3):
    _compare(_inputs(seed), loss_type=loss_type, label_smoothing=ls)


def test_cdpo_differs_from_plain_sigmoid():
  args = _inputs(0)
  plain = _run(args, loss_type="sigmoid").losses
  smooth = _run(args, loss_type="sigmoid", label_smoothing=0.1).losses
  assert not np.allclose(plain, smooth)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero"])
def test_rpo_alpha(loss_type):
  for seed in range(3):
    _compare(_inputs(seed), loss_type=loss_type, rpo_alpha=0.7)


@pytest.mark.parametrize("types,weights", [
    (["sigmoid", "sft"], [1.0, 0.5]),
    (["sigmoid", "bco_pair", "sft"], None),
    (("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)),  # MPO-style
    (["ipo", "hinge", "nca_pair"], [0.3, 2.0, 1.0]),
])
def test_weighted_combination(types, weights):
  for seed in range(3):
    _compare(_inputs(seed), loss_type=types, loss_weights=weights, rpo_alpha=0.1)
  # And it is exactly the weighted sum of the single losses.
  args = _inputs(7)
  ws = weights or [1.0] * len(types)
  parts = sum(w * _run(args, loss_type=t).losses for t, w in zip(types, ws))
  np.testing.assert_allclose(_run(args, loss_type=types, loss_weights=weights).losses,
                             parts, rtol=1e-6)


def test_ipo_rewards_unnormalised():
  """ipo normalises the log-ratios by length in the loss only, as TRL 1.16."""
  args = _inputs(0)
  out = _run(args, loss_type="ipo", beta=0.2)
  pc, _, rc, _, _, _ = args
  np.testing.assert_allclose(out.chosen_rewards, 0.2 * (pc.astype(np.float64) - rc),
                             rtol=1e-5)


def test_sft_equals_trl_token_mean_at_equal_lengths():
  """With equal lengths, mean of per-pair NLL == TRL's NLL mean over all tokens."""
  pc, pr, rc, rr, _, lr = _inputs(3)
  lc = np.full_like(lr, 17)
  out = _run((pc, pr, rc, rr, lc, lr), loss_type="sft")
  trl = -pc.astype(np.float64).sum() / lc.sum()
  np.testing.assert_allclose(float(out.losses.mean()), trl, rtol=1e-6)


def test_zero_length_rows_stay_finite():
  pc, pr, rc, rr, lc, lr = _inputs(0)
  lc[:3] = 0
  lr[2:5] = 0
  for t in ALL:
    out = _run((pc, pr, rc, rr, lc, lr), loss_type=t, rpo_alpha=0.5)
    assert np.isfinite(np.asarray(out.losses)).all(), t


# ---- At policy == reference ----------------------------------------------------------


def _at_reference(b=8, seed=0):
  rng = np.random.default_rng(seed)
  pc = np.float32(rng.uniform(-200, -5, b))
  pr = np.float32(rng.uniform(-200, -5, b))
  lc, lr = rng.integers(1, 65, b), rng.integers(1, 65, b)
  return pc, pr, pc.copy(), pr.copy(), lc, lr


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_values_at_reference(beta):
  args = _at_reference()
  val = lambda t: np.asarray(_run(args, loss_type=t, beta=beta).losses)
  np.testing.assert_allclose(val("sigmoid"), np.float32(LOG2), rtol=1e-7)
  np.testing.assert_allclose(val("robust"), np.float32(LOG2), rtol=1e-7)
  np.testing.assert_allclose(val("ipo"), (1 / (2 * beta)) ** 2, rtol=1e-6)
  np.testing.assert_allclose(val("hinge"), 1.0, rtol=1e-7)
  np.testing.assert_allclose(val("sppo_hard"), 2 * (0.5 / beta) ** 2, rtol=1e-6)
  np.testing.assert_allclose(val("apo_zero"), 1.0, rtol=1e-7)
  np.testing.assert_allclose(val("apo_down"), 1.0, rtol=1e-7)
  np.testing.assert_allclose(val("nca_pair"), 2 * LOG2, rtol=1e-6)
  np.testing.assert_allclose(val("bco_pair"), 2 * LOG2, rtol=1e-6)
  out = _run(args, loss_type="sigmoid", beta=beta)
  np.testing.assert_array_equal(out.chosen_rewards, 0.0)
  np.testing.assert_array_equal(out.rejected_rewards, 0.0)


@pytest.mark.parametrize("loss_type", ALL)
def test_gradients_at_reference(loss_type):
  """Finite; raising a chosen log-prob lowers the loss (apo_down: flat at 0)."""
  pc, pr, rc, rr, lc, lr = (jnp.asarray(a) for a in _at_reference())

  def total(pc):
    return losses.dpo_loss(pc, pr, rc, rr, chosen_length=lc, rejected_length=lr,
                           loss_type=loss_type).losses.sum()

  g = np.asarray(jax.grad(total)(pc))
  assert np.isfinite(g).all()
  if loss_type == "apo_down":
    np.testing.assert_allclose(g, 0.0, atol=1e-7)
  else:
    assert (g < 0).all(), g


def test_sigmoid_gradient_matches_closed_form():
  """d/d chosen_logps of -log s(beta z) = -beta s(-beta z); -beta/2 at the reference."""
  args = _inputs(5)
  pc, pr, rc, rr, lc, lr = (jnp.asarray(a) for a in args)
  beta = 0.1
  g = jax.grad(lambda pc: losses.dpo_loss(
      pc, pr, rc, rr, chosen_length=lc, rejected_length=lr, beta=beta).losses.sum())(pc)
  z = beta * ((args[0] - args[2]).astype(np.float64) - (args[1] - args[3]))
  np.testing.assert_allclose(g, -beta * _sigmoid(-z), rtol=1e-5, atol=1e-7)
  # At the reference (a constant copy of the policy's log-probs): -beta / 2.
  g0 = jax.grad(lambda x: losses.dpo_loss(
      x, pr, pc, pr, chosen_length=lc, rejected_length=lr, beta=beta).losses.sum())(pc)
  np.testing.assert_allclose(g0, -beta / 2, rtol=1e-6)


def test_rewards_have_no_gradient():
  pc, pr, rc, rr, lc, lr = (jnp.asarray(a) for a in _inputs(0))
  g = jax.grad(lambda pc: losses.dpo_loss(
      pc, pr, rc, rr, chosen_length=lc, rejected_length=lr).chosen_rewards.sum())(pc)
  np.testing.assert_array_equal(g, 0.0)


# ---- bco_pair delta ------------------------------------------------------------------


def test_bco_zero_weight_row_does_not_change_delta():
  pc, pr, rc, rr, lc, lr = _inputs(0)
  w = np.ones_like(pc)
  w[-2:] = 0.0
  base = _run((pc, pr, rc, rr, lc, lr), loss_type="bco_pair", weights=jnp.asarray(w))
  # Wildly change the masked rows: the delta, hence the valid rows' losses, is fixed.
  pc2, rr2 = pc.copy(), rr.copy()
  pc2[-2:] = -5.0
  rr2[-2:] = -200.0
  moved = _run((pc2, pr, rc, rr2, lc, lr), loss_type="bco_pair",
               weights=jnp.asarray(w))
  np.testing.assert_allclose(moved.losses[:-2], base.losses[:-2], rtol=1e-6)
  # And unmasked, the change does move them.
  unmasked = _run((pc2, pr, rc, rr2, lc, lr), loss_type="bco_pair")
  assert not np.allclose(unmasked.losses[:-2], base.losses[:-2])
  _compare((pc, pr, rc, rr, lc, lr), loss_type="bco_pair", weights=w)


def test_bco_delta_explicit_and_default():
  args = _inputs(1)
  for delta in (0.0, -1.5, 2.0):
    _compare(args, loss_type="bco_pair", bco_delta=delta)
  # The default is the (stop-gradient) mean reward of the batch.
  out = _run(args, loss_type="bco_pair", beta=0.2)
  mean = float(jnp.concatenate([out.chosen_rewards, out.rejected_rewards]).mean())
  explicit = _run(args, loss_type="bco_pair", beta=0.2, bco_delta=mean)
  np.testing.assert_allclose(out.losses, explicit.losses, rtol=1e-6)
  # bco_delta=0 is TRL 1.16's bco_pair: -log s(r_c) - log s(-r_r).
  pc, pr, rc, rr, _, _ = (a.astype(np.float64) for a in args)
  got = _run(args, loss_type="bco_pair", beta=0.2, bco_delta=0.0).losses
  want = -_log_sigmoid(0.2 * (pc - rc)) - _log_sigmoid(-0.2 * (pr - rr))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bco_delta_no_gradient_and_all_masked_finite():
  pc, pr, rc, rr, lc, lr = (jnp.asarray(a) for a in _inputs(2))
  w = jnp.zeros_like(pc)
  out = losses.dpo_loss(pc, pr, rc, rr, chosen_length=lc, rejected_length=lr,
                        loss_type="bco_pair", weights=w)
  assert np.isfinite(np.asarray(out.losses)).all()
  # The delta is treated as a constant: the gradient equals the fixed-delta one.
  beta = 0.1
  f = lambda pc, d=None: losses.dpo_loss(
      pc, pr, rc, rr, chosen_length=lc, rejected_length=lr, loss_type="bco_pair",
      beta=beta, bco_delta=d).losses.sum()
  out = losses.dpo_loss(pc, pr, rc, rr, chosen_length=lc, rejected_length=lr,
                        loss_type="bco_pair", beta=beta)
  delta = jnp.concatenate([out.chosen_rewards, out.rejected_rewards]).mean()
  np.testing.assert_allclose(jax.grad(f)(pc), jax.grad(f)(pc, delta), rtol=1e-5)


# ---- jit, validation -----------------------------------------------------------------


def test_jit_matches_eager():
  args = tuple(jnp.asarray(a) for a in _inputs(4))
  kw = {"loss_type": ("sigmoid", "bco_pair", "sft"), "loss_weights": (1.0, 0.5, 0.2),
        "rpo_alpha": 0.3, "label_smoothing": 0.1}
  f = jax.jit(lambda pc, pr, rc, rr, lc, lr: losses.dpo_loss(
      pc, pr, rc, rr, chosen_length=lc, rejected_length=lr, **kw))
  eager = _run(args, **kw)
  for a, b in zip(f(*args), eager):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_unknown_loss_type_lists_known_names():
  with pytest.raises(ValueError, match="unknown loss type") as e:
    _run(_inputs(0), loss_type=["sigmoid", "exo_pair"])
  msg = str(e.value)
  assert "exo_pair" in msg
  for name in ALL:
    assert name in msg


@pytest.mark.parametrize("kw", [
    {"label_smoothing": 0.5},
    {"label_smoothing": -0.1},
    {"loss_type": "robust", "label_smoothing": 0.6},
    {"beta": 0.0},
    {"beta": -1.0},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]},
    {"loss_type": []},
    {"rpo_alpha": -0.1},
])
def test_bad_options_raise(kw):
  with pytest.raises(ValueError):
    _run(_inputs(0), **kw)


def test_options_are_checked_directly_and_errors_name_the_field():
  """check_dpo_options runs without tracing (rlhi/train/objectives.py and
  rlhi/train/dpo.py call it where the options are built)."""
  o = losses.check_dpo_options(("sigmoid", "sft"))
  assert o.loss_types == ("sigmoid", "sft") and o.loss_weights == (1.0, 1.0)
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.check_dpo_options("sigmoid", label_smoothing=0.5)
  fields = {"loss_type": "config.loss.type", "beta": "config.loss.beta"}
  with pytest.raises(ValueError, match=r"config\.loss\.beta must be > 0, got 0"):
    losses.check_dpo_options("sigmoid", beta=0.0, fields=fields)
  with pytest.raises(ValueError,
                     match=r"\['dpo'\] in config\.loss\.type; known: sigmoid, ipo,"):
    losses.check_dpo_options(("sigmoid", "dpo"), fields=fields)


def test_bradley_terry_unchanged():
  c, r = jnp.array([1.0, -2.0]), jnp.array([0.0, 0.5])
  np.testing.assert_allclose(losses.bradley_terry(c, r),
                             -_log_sigmoid(np.array([1.0, -2.5])), rtol=1e-6)
  np.testing.assert_allclose(losses.bradley_terry(c, r, 0.5, 0.1),
                             -_log_sigmoid(np.array([0.5, -3.0]))
                             + 0.1 * np.array([1.0, -1.5]) ** 2, rtol=1e-6)
