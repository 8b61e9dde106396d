"""Batch losses of each objective, in the form the update step takes: each function here
builds a `loss_fn(params, batch, rng) -> LossOutput` of sums and counts (the protocol
of rlhi/train/step.py).

Batches are those of rlhi/inputs/batches.py, one example per row (`pad_batch`) or packed
(`pack`: several per row, a pair's prompt shared by its responses, per-slot arrays);
each loss takes both and gives the same sums. Examples with valid=False (padding of a
last partial batch, empty slots) count for nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhi import inputs
from rlhi import losses
from rlhi.models import llama
from rlhi.models import reward
from rlhi.train import step as step_lib

Metric = step_lib.Metric
LossOutput = step_lib.LossOutput


def sft_loss(config: llama.LlamaConfig, chunk: int = 256) -> step_lib.LossFn:
  """Token-level cross-entropy on completion tokens: loss (sum of NLL, token count)."""

  def loss_fn(params, batch, rng):
    del rng
    logp = llama.token_logprobs(params, config, batch["tokens"], batch["positions"],
                                batch["segment_ids"], batch["targets"], chunk)
    if inputs.is_packed(batch):  # empty slots have no tokens
      mask = batch["loss_mask"]
    else:
      mask = batch["loss_mask"] * batch["valid"][:, None]
    n = mask.sum()
    return LossOutput(loss=Metric(-(logp * mask).sum(), n),
                      metrics={"target_prob": Metric((jnp.exp(logp) * mask).sum(), n)})

  return loss_fn


def reward_loss(config: llama.LlamaConfig, margin: float = 0.0,
                center_coef: float = 0.0) -> step_lib.LossFn:
  """Bradley-Terry over a batch of pairs; chosen and rejected in one forward pass."""

  def loss_fn(params, batch, rng):
    del rng
    rc, rr = pair_scores(params, config, batch)
    w = batch["valid"].reshape(-1).astype(jnp.float32)
    n = w.sum()
    per_pair = losses.bradley_terry(rc, rr, margin, center_coef)
    metrics = {
        "accuracy": Metric(((rc > rr) * w).sum(), n),
        "margin": Metric(((rc - rr) * w).sum(), n),
        "reward_mean": Metric(((rc + rr) / 2 * w).sum(), n),
        "reward_sq": Metric(((rc ** 2 + rr ** 2) / 2 * w).sum(), n),
    }
    return LossOutput(loss=Metric((per_pair * w).sum(), n), metrics=metrics)

  return loss_fn


def with_reward_std(metrics):
  """reward_sq -> reward_std (from the sums, so exact over batches and hosts)."""
  out = dict(metrics)
  if "reward_sq" in out:
    out["reward_std"] = max(0.0, out.pop("reward_sq") - out["reward_mean"] ** 2) ** 0.5
  return out


def _slot_sums(values, batch) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Packed batch: per-token values [R, L] -> sums over each slot's chosen and
  rejected targets, ([R * S], [R * S]) in slot order (the order of batch['valid'])."""
  slots = batch["valid"].shape[1]
  onehot = (batch["segment_ids"][..., None]
            == jnp.arange(1, slots + 1)).astype(values.dtype)  # [R, L, S]
  out = []
  for response in (1, 2):
    w = batch["loss_mask"] * (batch["response_ids"] == response)
    out.append(jnp.einsum("rl,rls->rs", values * w, onehot).reshape(-1))
  return out[0], out[1]


def pair_scores(params, config: llama.LlamaConfig, batch
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Reward-model scores (chosen, rejected) of every pair of a pairs batch, [N] each,
  in the order of batch['valid'] flattened; one forward pass."""
  if inputs.is_packed(batch):
    ends = jnp.stack([batch["chosen_end"], batch["rejected_end"]], -1)
    s = reward.scores_at(params, config, batch["tokens"], batch["positions"],
                         batch["segment_ids"], batch["response_ids"],
                         ends.reshape(ends.shape[0], -1))
    s = s.reshape(ends.shape)
    return s[..., 0].reshape(-1), s[..., 1].reshape(-1)
  b = batch["chosen_tokens"].shape[0]
  cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
  s = reward.scores(params, config, cat("tokens"), cat("positions"), cat("segment_ids"))
  return s[:b], s[b:]


def sequence_logps(params, config: llama.LlamaConfig, batch, chunk: int = 256
                   ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Summed response log-probs and response lengths of a pairs batch: ([2N], [2N]).

  Chosen first, then rejected (i and N + i are one pair, N = the size of
  batch['valid'] flattened), in one forward pass. Only positions whose target is a
  response token count (loss_mask), so prompt tokens and padding never contribute;
  the LM head runs on the columns of `score_positions` only (the response targets,
  rlhi/inputs/batches.py), over chunks of `chunk` positions, so no [rows, L, vocab] float32
  logits are held (llama.token_logprobs). A packed batch gives, pair by pair, the
  values of the unpacked one up to float32 rounding.
  """
  # A batch made by hand without score_positions is scored at every column.
  at = lambda x, cols: x if cols is None else jnp.take_along_axis(x, cols, axis=1)
  if inputs.is_packed(batch):
    cols = batch.get("score_positions")
    logp = llama.token_logprobs(params, config, batch["tokens"], batch["positions"],
                                batch["segment_ids"], batch["targets"], chunk,
                                response_ids=batch["response_ids"],
                                score_positions=cols)
    scored = {k: at(batch[k], cols)
              for k in ("loss_mask", "segment_ids", "response_ids")}
    scored["valid"] = batch["valid"]
    logps = _slot_sums(logp, scored)
    lengths = _slot_sums(jnp.ones_like(logp), scored)
    return jnp.concatenate(logps), jnp.concatenate(lengths)
  cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
  cols = cat("score_positions") if "chosen_score_positions" in batch else None
  logp = llama.token_logprobs(params, config, cat("tokens"), cat("positions"),
                              cat("segment_ids"), cat("targets"), chunk,
                              score_positions=cols)
  mask = at(cat("loss_mask"), cols)
  return (logp * mask).sum(-1), mask.sum(-1)


def dpo_loss(config: llama.LlamaConfig, *, loss_type: str | tuple[str, ...] = "sigmoid",
             loss_weights: tuple[float, ...] | None = None, beta: float = 0.1,
             label_smoothing: float = 0.0, rpo_alpha: float = 0.0, chunk: int = 256,
             live_reference: bool = False, ref_config: llama.LlamaConfig | None = None
             ) -> step_lib.LossFn:
  """DPO over a batch of pairs (rlhi.losses.dpo_loss): loss (sum of pair losses, pairs).

  Reference log-probs come from the batch (`ref_chosen_logps`, `ref_rejected_logps`,
  precomputed once by rlhi/train/reference.py) or, with `live_reference`, from the
  reference params passed as the loss's fourth argument (Task.frozen), each step;
  `ref_config` is the reference model's config when it differs from the policy's.

  Metrics (TRL's names): rewards/{chosen,rejected,accuracies,margins} with rewards =
  beta * (policy - reference) log-ratio; logps/{chosen,rejected} (policy, summed over
  the response); kl_proxy = mean over both responses of (policy - reference) log-prob
  per response token. The last is measured on the data's responses, not on samples of
  the policy, so it is a drift indicator that can be negative, not a KL divergence.
  """
  options = dict(loss_type=loss_type, loss_weights=loss_weights, beta=beta,
                 label_smoothing=label_smoothing, rpo_alpha=rpo_alpha)
  # Fail on bad options (unknown loss type, label_smoothing out of range) now, at
  # config time, rather than inside the first traced step.
  losses.check_dpo_options(**options)

  def loss_fn(params, batch, rng, ref_params=None):
    del rng
    b = batch["valid"].size
    logps, lengths = sequence_logps(params, config, batch, chunk)
    if live_reference:
      if ref_params is None:
        raise ValueError("dpo_loss(live_reference=True) needs the reference params "
                         "as the loss's fourth argument (Task.frozen)")
      ref, _ = sequence_logps(ref_params, ref_config or config, batch, chunk)
      ref = jax.lax.stop_gradient(ref)
    else:
      ref = jnp.concatenate([batch["ref_chosen_logps"].reshape(-1),
                             batch["ref_rejected_logps"].reshape(-1)])
    w = batch["valid"].reshape(-1).astype(jnp.float32)
    out = losses.dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:],
                          chosen_length=lengths[:b], rejected_length=lengths[b:],
                          weights=w, **options)
    n = w.sum()
    cr, rr = out.chosen_rewards, out.rejected_rewards
    drift = ((logps - ref) / jnp.maximum(lengths, 1.0)).reshape(2, b).mean(0)
    metrics = {
        "rewards/chosen": Metric((cr * w).sum(), n),
        "rewards/rejected": Metric((rr * w).sum(), n),
        "rewards/accuracies": Metric(((cr > rr) * w).sum(), n),
        "rewards/margins": Metric(((cr - rr) * w).sum(), n),
        "logps/chosen": Metric((logps[:b] * w).sum(), n),
        "logps/rejected": Metric((logps[b:] * w).sum(), n),
        "kl_proxy": Metric((drift * w).sum(), n),
    }
    return LossOutput(loss=Metric((out.losses * w).sum(), n), metrics=metrics)

  return loss_fn
