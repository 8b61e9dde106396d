"""Batch losses of each objective, in the form the update step takes (sums, counts).

    loss_fn(params, batch, rng) -> (loss_sum, (denominator, {name: (sum, count)}))

Batches are those of rlhi/inputs.py; rows with valid=False (padding of a last partial
batch) count for nothing.
"""

from __future__ import annotations

import jax.numpy as jnp

from rlhi import losses
from rlhi.models import llama
from rlhi.models import reward
from rlhi.train import step as step_lib


def sft_loss(config: llama.LlamaConfig, chunk: int = 256) -> step_lib.LossFn:
  """Token-level cross-entropy on completion tokens: (sum of NLL, token count)."""

  def loss_fn(params, batch, rng):
    del rng
    logp = llama.token_logprobs(params, config, batch["tokens"], batch["positions"],
                                batch["segment_ids"], batch["targets"], chunk)
    mask = batch["loss_mask"] * batch["valid"][:, None]
    n = mask.sum()
    return -(logp * mask).sum(), (n, {"target_prob": ((jnp.exp(logp) * mask).sum(), n)})

  return loss_fn


def reward_loss(config: llama.LlamaConfig, margin: float = 0.0,
                center_coef: float = 0.0) -> step_lib.LossFn:
  """Bradley-Terry over a batch of pairs; chosen and rejected in one forward pass."""

  def loss_fn(params, batch, rng):
    del rng
    b = batch["chosen_tokens"].shape[0]
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
    s = reward.scores(params, config, cat("tokens"), cat("positions"),
                      cat("segment_ids"))
    rc, rr = s[:b], s[b:]
    w = batch["valid"].astype(jnp.float32)
    n = w.sum()
    per_pair = losses.bradley_terry(rc, rr, margin, center_coef)
    metrics = {
        "accuracy": (((rc > rr) * w).sum(), n),
        "margin": (((rc - rr) * w).sum(), n),
        "reward_mean": (((rc + rr) / 2 * w).sum(), n),
        "reward_sq": (((rc ** 2 + rr ** 2) / 2 * w).sum(), n),
    }
    return (per_pair * w).sum(), (n, metrics)

  return loss_fn


def with_reward_std(metrics):
  """reward_sq -> reward_std (from the sums, so exact over batches and hosts)."""
  out = dict(metrics)
  if "reward_sq" in out:
    out["reward_std"] = max(0.0, out.pop("reward_sq") - out["reward_mean"] ** 2) ** 0.5
  return out
