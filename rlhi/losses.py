"""Preference losses: Bradley-Terry for reward models (the DPO family comes with DPO).

Every loss returns per-example values; callers sum them and divide by the number of
examples over the global batch (see rlhi/train/step.py), which keeps gradient
accumulation and multi-host averaging exact.
"""

from __future__ import annotations

import jax

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
