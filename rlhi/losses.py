"""Preference losses: Bradley-Terry for reward models and the DPO family.

Every loss returns per-example values; callers sum them and divide by the number of
examples over the global batch (see rlhi/train/step.py), which keeps gradient
accumulation and multi-host averaging exact.

The DPO family (`dpo_loss`) follows the formulas of TRL's DPOTrainer (v1.16) under
TRL's loss-type names, with the deviations listed in `dpo_loss`'s docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down",
                  "nca_pair", "sppo_hard", "bco_pair", "sft")


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


def _check_options(loss_type: str | Sequence[str],
                   loss_weights: Sequence[float] | None, beta: float,
                   label_smoothing: float, rpo_alpha: float
                   ) -> tuple[tuple[str, ...], tuple[float, ...]]:
  """Validates the static options; returns (loss types, their weights)."""
  types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
  if not types:
    raise ValueError(f"dpo_loss: loss_type is empty; choose from {DPO_LOSS_TYPES}")
  unknown = [t for t in types if t not in DPO_LOSS_TYPES]
  if unknown:
    raise ValueError(f"dpo_loss: unknown loss type(s) {unknown}; known: "
                     f"{', '.join(DPO_LOSS_TYPES)}")
  if loss_weights is None:
    weights = (1.0,) * len(types)
  else:
    weights = tuple(float(w) for w in loss_weights)
    if len(weights) != len(types):
      raise ValueError(f"dpo_loss: {len(weights)} loss_weights for {len(types)} loss "
                       f"types {types}; give one weight per type")
  if not beta > 0:
    raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
  # Also checked for sigmoid (cDPO), not only robust as in TRL: a smoothing of 0.5
  # or more means the labels carry no (or reversed) preference.
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 0.5), got "
                     f"{label_smoothing}")
  if not rpo_alpha >= 0:
    raise ValueError(f"dpo_loss: rpo_alpha must be >= 0, got {rpo_alpha}")
  return types, weights


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

  Returns:
    DPOOutput; rewards are beta * (policy - reference) of the summed log-probs,
    under stop_gradient, whatever the loss type (TRL's `rewards/*` metrics).

  Formulas, with d_c = chosen_logps - ref_chosen_logps, d_r likewise, z =
  beta * (d_c - d_r), ls = label_smoothing:
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
      `weights` (so rows of weight 0 do not count; TRL < 1.0's first step). That mean is per call, so with gradient
      accumulation it is per micro-batch.
    * sft and rpo_alpha (TRL < 1.0's option; TRL 1.16 has the `sft` type only):
      NLL of the chosen response normalised by its own length (the iterative RPO
      paper, Pang et al. 2024). TRL averages the NLL over all
      chosen tokens of the batch instead; per-pair normalisation keeps the losses
      per pair, so gradient accumulation stays exact. Equal when lengths are equal.
    * Not implemented: TRL's exo_pair, aot, aot_unpaired, discopop, sigmoid_norm,
      f-divergences, ld_alpha and WPO weighting (use_weighting).
  """
  types, type_weights = _check_options(loss_type, loss_weights, beta,
                                       label_smoothing, rpo_alpha)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chosen_logps, rejected_logps = f32(chosen_logps), f32(rejected_logps)
  d_c = chosen_logps - f32(ref_chosen_logps)
  d_r = rejected_logps - f32(ref_rejected_logps)
  len_c = jnp.maximum(f32(chosen_length), 1.0)
  len_r = jnp.maximum(f32(rejected_length), 1.0)
  ls = label_smoothing
  z = beta * (d_c - d_r)
  chosen_rewards, rejected_rewards = beta * d_c, beta * d_r
  # RPO's NLL, shared by the `sft` type and the rpo_alpha term.
  nll = -chosen_logps / len_c
  log_sig = jax.nn.log_sigmoid

  def bco_shift() -> Array:
    if bco_delta is not None:
      return jax.lax.stop_gradient(f32(bco_delta))
    w = jnp.ones_like(d_c) if weights is None else f32(weights)
    total = (w * (chosen_rewards + rejected_rewards)).sum()
    count = 2.0 * w.sum()
    # An all-padding batch has no rewards to average; 0 keeps its (masked) loss finite.
    mean = jnp.where(count > 0, total / jnp.maximum(count, 1e-12), 0.0)
    return jax.lax.stop_gradient(mean)

  def one(t: str) -> Array:
    if t == "sigmoid":
      loss = -log_sig(z)
      if ls:
        loss = (1.0 - ls) * loss - ls * log_sig(-z)
      return loss
    if t == "ipo":
      # 1 / (2 tau) is the target margin of Eq. 17 of Azar et al. (2023).
      return (d_c / len_c - d_r / len_r - 1.0 / (2.0 * beta)) ** 2
    if t == "hinge":
      return jax.nn.relu(1.0 - z)
    if t == "robust":
      return (-(1.0 - ls) * log_sig(z) + ls * log_sig(-z)) / (1.0 - 2.0 * ls)
    # 1 - sigmoid(x) is written sigmoid(-x): no cancellation when sigmoid(x) ~ 1.
    if t == "apo_zero":
      return jax.nn.sigmoid(-chosen_rewards) + jax.nn.sigmoid(rejected_rewards)
    if t == "apo_down":
      return jax.nn.sigmoid(chosen_rewards) + jax.nn.sigmoid(-z)
    if t == "nca_pair":
      return (-log_sig(chosen_rewards) - 0.5 * log_sig(-chosen_rewards)
              - 0.5 * log_sig(-rejected_rewards))
    if t == "sppo_hard":
      # Hard-probability SPPO: targets +-1/(2 beta) on the raw log-ratios.
      return (d_c - 0.5 / beta) ** 2 + (d_r + 0.5 / beta) ** 2
    if t == "bco_pair":
      delta = bco_shift()
      return -log_sig(chosen_rewards - delta) - log_sig(-(rejected_rewards - delta))
    if t == "sft":
      return nll
    raise AssertionError(t)  # _check_options rejected unknown names.

  losses = sum(w * one(t) for t, w in zip(types, type_weights, strict=True))
  if rpo_alpha:
    losses = losses + rpo_alpha * nll
  return DPOOutput(losses=losses,
                   chosen_rewards=jax.lax.stop_gradient(chosen_rewards),
                   rejected_rewards=jax.lax.stop_gradient(rejected_rewards))
