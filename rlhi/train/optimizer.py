"""Optimizer and learning-rate schedule from config (optax).

    optimizer = dict(lr=1e-5, warmup_steps=100, decay='cosine', end_lr_factor=0.1,
                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0)

AdamW with linear warmup then cosine / linear / constant decay to end_lr_factor * lr at
`total_steps`, after global-norm clipping. Weight decay skips 1-D parameters (norm
scales, biases), as is usual for transformers.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

_DECAYS = ("cosine", "linear", "constant")


def learning_rate_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  lr, warmup = float(cfg["lr"]), int(cfg.get("warmup_steps", 0))
  decay = cfg.get("decay", "cosine")
  end = lr * float(cfg.get("end_lr_factor", 0.0))
  if decay not in _DECAYS:
    raise ValueError(f"optimizer.decay: expected one of {_DECAYS}, got {decay!r}")
  decay_steps = max(1, total_steps - warmup)
  if decay == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif decay == "linear":
    after = optax.linear_schedule(lr, end, decay_steps)
  else:
    after = optax.constant_schedule(lr)
  if warmup <= 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), after], boundaries=[warmup])


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(clip -> AdamW) with the schedule; returns the transformation and the schedule."""
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.get("clip_norm"):
    parts.append(optax.clip_by_global_norm(float(cfg["clip_norm"])))
  parts.append(optax.adamw(
      schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
      eps=float(cfg.get("eps", 1e-8)), weight_decay=float(cfg.get("weight_decay", 0.0)),
      mask=_decay_mask))
  return optax.chain(*parts), schedule
