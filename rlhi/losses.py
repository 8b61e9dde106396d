"""Preference losses: Bradley-Terry for reward models and the DPO family.

Every loss returns per-example values; callers sum them and divide by the number of
examples over the global batch (see rlhi/train/step.py), which keeps gradient
accumulation and multi-host averaging exact.

The DPO family (`dpo_loss`) follows the formulas of TRL's DPOTrainer (v1.16) under
TRL's loss-type names, with the deviations listed in `dpo_loss`'s docstring: one small
function per loss type, looked up by name in `DPO_LOSSES`. `check_dpo_options`
validates the options; call it where they are built, so that a bad config fails
before anything is traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def bradley_terry(chosen: Array, rejected: Array, margin: Array | float = 0.0,
                  center_coef: float = 0.0) -> Array:
  """Per-pair -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2.

  `margin` as in Llama-2's reward model (a required gap, per pair or global);
  `center_coef` is TRL's `center_rewards_coefficient` (Eisenstein et al., 2023): it
  keeps rewards centred on zero without changing which response wins.
  """
  loss = -jax.nn.log_sigmoid(chosen - rejected - margin)
  if center_coef:
    loss = loss + center_coef * (chosen + rejected) ** 2
  return loss


class DPOOutput(NamedTuple):
  """Per-pair DPO loss and implicit rewards, all [B] float32."""
  losses: Array  # Weighted sum over loss types, plus rpo_alpha * NLL.
  chosen_rewards: Array  # beta * (policy - reference) of chosen; no gradient.
  rejected_rewards: Array  # Same for rejected.


# ----------------------------------------------------------------------------------------
# Options.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DPOOptions:
  """Validated static options of `dpo_loss` (see its docstring); `check_dpo_options`
  builds them."""
  loss_types: tuple[str, ...]
  loss_weights: tuple[float, ...]  # one per loss type
  beta: float
  label_smoothing: float
  rpo_alpha: float


def check_dpo_options(loss_type: str | Sequence[str],
                      loss_weights: Sequence[float] | None = None, beta: float = 0.1,
                      label_smoothing: float = 0.0, rpo_alpha: float = 0.0, *,
                      fields: Mapping[str, str] | None = None) -> DPOOptions:
  """Validates `dpo_loss`'s static options; returns them with one weight per type.

  `fields` renames the options in error messages, {argument: config field} (e.g.
  {"beta": "config.loss.beta"}), so an error names the field its value came from.
  """
  name = lambda arg: (fields or {}).get(arg, arg)
  types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
  if not types:
    raise ValueError(f"dpo_loss: {name('loss_type')} is empty; choose one or more of "
                     f"{', '.join(DPO_LOSS_TYPES)}")
  unknown = [t for t in types if t not in DPO_LOSSES]
  if unknown:
    raise ValueError(f"dpo_loss: unknown loss type(s) {unknown} in "
                     f"{name('loss_type')}; known: {', '.join(DPO_LOSS_TYPES)}")
  if loss_weights is None:
    weights = (1.0,) * len(types)
  else:
    weights = tuple(float(w) for w in loss_weights)
    if len(weights) != len(types):
      raise ValueError(f"dpo_loss: {len(weights)} {name('loss_weights')} for "
                       f"{len(types)} loss types {types}; give one weight per type")
  if not beta > 0:
    raise ValueError(f"dpo_loss: {name('beta')} must be > 0, got {beta}")
  # Also checked for sigmoid (cDPO), not only robust as in TRL: a smoothing of 0.5
  # or more means the labels carry no (or reversed) preference.
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"dpo_loss: {name('label_smoothing')} must lie in [0, 0.5), got "
                     f"{label_smoothing}")
  if not rpo_alpha >= 0:
    raise ValueError(f"dpo_loss: {name('rpo_alpha')} must be >= 0, got {rpo_alpha}")
  return DPOOptions(types, weights, beta, label_smoothing, rpo_alpha)


# ----------------------------------------------------------------------------------------
# The loss types, one function each.
# ----------------------------------------------------------------------------------------


class DPOTerms(NamedTuple):
  """What the DPO-family losses are written in, per pair, [B] float32 each."""
  d_c: Array  # chosen log-ratio: policy - reference log-prob, summed over the response
  d_r: Array  # the same for rejected
  len_c: Array  # chosen response length, at least 1
  len_r: Array  # rejected response length, at least 1
  z: Array  # beta * (d_c - d_r), the DPO logit
  chosen_rewards: Array  # beta * d_c
  rejected_rewards: Array  # beta * d_r
  nll: Array  # -chosen_logps / len_c: RPO's length-normalised NLL of the chosen
  bco_delta: Array | None  # bco_pair's reward shift, no gradient; None unless used


DPOLossFn = Callable[[DPOTerms, DPOOptions], Array]
_log_sig = jax.nn.log_sigmoid


def sigmoid_loss(t: DPOTerms, o: DPOOptions) -> Array:
  """DPO (Rafailov et al., 2023); cDPO (Mitchell, 2023) with label_smoothing > 0."""
  loss = -_log_sig(t.z)
  if o.label_smoothing:
    loss = (1.0 - o.label_smoothing) * loss - o.label_smoothing * _log_sig(-t.z)
  return loss


def ipo_loss(t: DPOTerms, o: DPOOptions) -> Array:
  """IPO (Azar et al., 2023) on length-normalised log-ratios."""
  # 1 / (2 tau) is the target margin of Eq. 17 of Azar et al. (2023).
  return (t.d_c / t.len_c - t.d_r / t.len_r - 1.0 / (2.0 * o.beta)) ** 2


def hinge_loss(t: DPOTerms, o: DPOOptions) -> Array:
  """SLiC (Zhao et al., 2023)."""
  del o
  return jax.nn.relu(1.0 - t.z)


def robust_loss(t: DPOTerms, o: DPOOptions) -> Array:
  """Robust DPO (Chowdhury et al., 2024): unbiased under a label flip rate ls."""
  ls = o.label_smoothing
  return (-(1.0 - ls) * _log_sig(t.z) + ls * _log_sig(-t.z)) / (1.0 - 2.0 * ls)


# APO (D'Oosterlinck et al., 2024). 1 - sigmoid(x) is written sigmoid(-x): no
# cancellation when sigmoid(x) ~ 1.
def apo_zero_loss(t: DPOTerms, o: DPOOptions) -> Array:
  """APO-zero: chosen up, rejected down."""
  del o
  return jax.nn.sigmoid(-t.chosen_rewards) + jax.nn.sigmoid(t.rejected_rewards)


def apo_down_loss(t: DPOTerms, o: DPOOptions) -> Array:
  """APO-down: both down, rejected more."""
  del o
  return jax.nn.sigmoid(t.chosen_rewards) + jax.nn.sigmoid(-t.z)


def nca_pair_loss(t: DPOTerms, o: DPOOptions) -> Array:
  """NCA (Chen et al., 2024), pairwise."""
  del o
  return (-_log_sig(t.chosen_rewards) - 0.5 * _log_sig(-t.chosen_rewards)
          - 0.5 * _log_sig(-t.rejected_rewards))


def sppo_hard_loss(t: DPOTerms, o: DPOOptions) -> Array:
  """Hard-probability SPPO (Wu et al., 2024): targets +-1/(2 beta) on the raw
  log-ratios."""
  return (t.d_c - 0.5 / o.beta) ** 2 + (t.d_r + 0.5 / o.beta) ** 2


def bco_pair_loss(t: DPOTerms, o: DPOOptions) -> Array:
  """BCO (Jung et al., 2024), pairwise, rewards shifted by `bco_delta`."""
  del o
  return (-_log_sig(t.chosen_rewards - t.bco_delta)
          - _log_sig(-(t.rejected_rewards - t.bco_delta)))


def sft_loss(t: DPOTerms, o: DPOOptions) -> Array:
  """RPO's NLL of the chosen response alone (Pang et al., 2024)."""
  del o
  return t.nll


# TRL's names; the order is that of the documentation (and of DPO_LOSS_TYPES).
DPO_LOSSES: dict[str, DPOLossFn] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "nca_pair": nca_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "bco_pair": bco_pair_loss,
    "sft": sft_loss,
}
DPO_LOSS_TYPES = tuple(DPO_LOSSES)


# ----------------------------------------------------------------------------------------
# The combination.
# ----------------------------------------------------------------------------------------


def dpo_loss(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array,
             ref_rejected_logps: Array, *, chosen_length: Array,
             rejected_length: Array,
             loss_type: str | Sequence[str] = "sigmoid",
             loss_weights: Sequence[float] | None = None,
             beta: float = 0.1, label_smoothing: float = 0.0,
             rpo_alpha: float = 0.0,
             weights: Array | None = None,
             bco_delta: Array | float | None = None) -> DPOOutput:
  """Per-pair DPO-family losses with TRL's names and formulas.

  Args:
    chosen_logps: [B] policy log-probs of the chosen responses, summed over the
      response tokens only (float32).
    rejected_logps: [B] as `chosen_logps`, for the rejected responses.
    ref_chosen_logps: [B] as `chosen_logps`, under the reference model.
    ref_rejected_logps: [B] as `rejected_logps`, under the reference model.
    chosen_length: [B] response token counts (>= 1 for valid rows; divisions use
      max(length, 1), so padding rows of length 0 stay finite).
    rejected_length: [B] as `chosen_length`.
    loss_type: one name of DPO_LOSS_TYPES or several; several are combined as
      sum_i loss_weights[i] * loss_i, as TRL's multi-loss (e.g. MPO).
    loss_weights: one weight per loss type; default 1.0 each.
    beta: the KL coefficient (tau, the regulariser, for ipo).
    label_smoothing: in [0, 0.5): cDPO for sigmoid, flip rate for robust.
    rpo_alpha: adds rpo_alpha * (length-normalised NLL of the chosen response).
    weights: [B] float validity mask (0 for padding rows). Used only for bco_pair's
      default delta; `losses` are not multiplied by it (the caller masks).
    bco_delta: bco_pair's reward shift; default: see below.

  The options are validated by `check_dpo_options` (ValueError).

  Returns:
    DPOOutput; rewards are beta * (policy - reference) of the summed log-probs,
    under stop_gradient, whatever the loss type (TRL's `rewards/*` metrics).

  Formulas (the functions of DPO_LOSSES), with d_c = chosen_logps -
  ref_chosen_logps, d_r likewise, z = beta * (d_c - d_r), ls = label_smoothing:
    sigmoid:   -(1 - ls) log s(z) - ls log s(-z)        (DPO; cDPO with ls > 0)
    ipo:       (d_c / len_c - d_r / len_r - 1 / (2 beta))^2
    hinge:     relu(1 - z)
    robust:    (-(1 - ls) log s(z) + ls log s(-z)) / (1 - 2 ls)
    apo_zero:  1 - s(beta d_c) + s(beta d_r)
    apo_down:  s(beta d_c) + 1 - s(z)
    nca_pair:  -log s(beta d_c) - log s(-beta d_c) / 2 - log s(-beta d_r) / 2
    sppo_hard: (d_c - 1 / (2 beta))^2 + (d_r + 1 / (2 beta))^2
    bco_pair:  -log s(beta d_c - delta) - log s(-(beta d_r - delta))
    sft:       -chosen_logps / len_c

  Deviations from TRL 1.16's DPOTrainer:
    * sigmoid + label_smoothing: TRL 1.16 ignores label_smoothing for sigmoid; we
      keep the conservative DPO (cDPO, Mitchell 2023) form of earlier TRL
      releases. Identical at the default ls = 0.
    * ipo: as TRL, the log-ratios are divided by the response lengths (the IPO
      authors' normalisation); as TRL 1.16 (unlike TRL < 1.0), the rewards stay
      unnormalised.
    * bco_pair: TRL < 1.0 shifts rewards by a running mean (RunningMoments) of the
      batch-mean reward; TRL 1.16 uses no shift (delta = 0, pass bco_delta=0.0 for
      that). Without mutable state we use `bco_delta` if given, else the
      stop_gradient mean of this call's chosen and rejected rewards, weighted by
      `weights` (so rows of weight 0 do not count; TRL < 1.0's first step). That
      mean is per call, so with gradient accumulation it is per micro-batch.
    * sft and rpo_alpha (TRL < 1.0's option; TRL 1.16 has the `sft` type only):
      NLL of the chosen response normalised by its own length (the iterative RPO
      paper, Pang et al. 2024). TRL averages the NLL over all
      chosen tokens of the batch instead; per-pair normalisation keeps the losses
      per pair, so gradient accumulation stays exact. Equal when lengths are equal.
    * Not implemented: TRL's exo_pair, aot, aot_unpaired, discopop, sigmoid_norm,
      f-divergences, ld_alpha and WPO weighting (use_weighting).
  """
  o = check_dpo_options(loss_type, loss_weights, beta, label_smoothing, rpo_alpha)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chosen_logps, rejected_logps = f32(chosen_logps), f32(rejected_logps)
  d_c = chosen_logps - f32(ref_chosen_logps)
  d_r = rejected_logps - f32(ref_rejected_logps)
  # The order of these operations fixes the order in which their gradients are summed,
  # so it is kept as it was: another order changes float32 gradients in the last bit.
  len_c = jnp.maximum(f32(chosen_length), 1.0)
  len_r = jnp.maximum(f32(rejected_length), 1.0)
  z = beta * (d_c - d_r)
  chosen_rewards, rejected_rewards = beta * d_c, beta * d_r
  # RPO's NLL, shared by the `sft` type and the rpo_alpha term.
  nll = -chosen_logps / len_c
  shift = (_bco_delta(bco_delta, chosen_rewards, rejected_rewards, weights)
           if "bco_pair" in o.loss_types else None)
  terms = DPOTerms(d_c=d_c, d_r=d_r, len_c=len_c, len_r=len_r, z=z,
                   chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                   nll=nll, bco_delta=shift)
  losses = sum(w * DPO_LOSSES[t](terms, o)
               for t, w in zip(o.loss_types, o.loss_weights, strict=True))
  if o.rpo_alpha:
    losses = losses + o.rpo_alpha * terms.nll
  return DPOOutput(losses=losses,
                   chosen_rewards=jax.lax.stop_gradient(chosen_rewards),
                   rejected_rewards=jax.lax.stop_gradient(rejected_rewards))


def _bco_delta(given: Array | float | None, chosen_rewards: Array,
               rejected_rewards: Array, weights: Array | None) -> Array:
  """bco_pair's reward shift, no gradient: `given`, else the `weights`-weighted mean
  of all rewards."""
  if given is not None:
    return jax.lax.stop_gradient(jnp.asarray(given, jnp.float32))
  w = (jnp.ones_like(chosen_rewards) if weights is None
       else jnp.asarray(weights, jnp.float32))
  total = (w * (chosen_rewards + rejected_rewards)).sum()
  count = 2.0 * w.sum()
  # An all-padding batch has no rewards to average; 0 keeps its (masked) loss finite.
  mean = jnp.where(count > 0, total / jnp.maximum(count, 1e-12), 0.0)
  return jax.lax.stop_gradient(mean)
