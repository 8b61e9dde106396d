"""Reward model: a Llama-family backbone and a scalar head on the last real token.

    params = {"backbone": <Llama params without the LM head>,
              "score": {"kernel": [E], "bias": []}}

The input is persona (system slot) + context + response, tokenized by the chat
formatter. The score is read at the last position whose segment id is non-zero, so it is
the same under left and right padding. The head starts at zero (every pair scores 0:
the Bradley-Terry loss starts at log 2, and the backbone's features decide from step 1).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhi.models import llama

Array = jax.Array
Params = Any


def _strip_lm_head(backbone: Params) -> Params:
  return {k: v for k, v in backbone.items() if k != "lm_head"}


def _head(config: llama.LlamaConfig, boxed: bool) -> Params:
  kernel = jnp.zeros((config.hidden_size,), jnp.float32)
  bias = jnp.zeros((), jnp.float32)
  if boxed:
    kernel = nn.LogicallyPartitioned(kernel, ("embed",))
    bias = nn.LogicallyPartitioned(bias, ())
  return {"kernel": kernel, "bias": bias}


def init_params(config: llama.LlamaConfig, rng: Array,
                backbone: Params | None = None) -> Params:
  """A reward model from a policy/LM's params (backbone), or random."""
  if backbone is None:
    backbone = llama.init_params(config, rng)
  return {"backbone": _strip_lm_head(backbone), "score": _head(config, boxed=False)}


def abstract_params(config: llama.LlamaConfig) -> Params:
  """Shapes boxed with logical axis names, for `sharding.logical_shardings`."""
  backbone = _strip_lm_head(llama.abstract_params(config))
  return {"backbone": backbone,
          "score": jax.eval_shape(lambda: _head(config, boxed=True))}


def last_token_index(segment_ids: Array) -> Array:
  """[B, T] -> [B]: index of the last position with a non-zero segment id."""
  t = segment_ids.shape[-1]
  return jnp.max(jnp.where(segment_ids != 0, jnp.arange(t), -1), axis=-1)


def scores(params: Params, config: llama.LlamaConfig, tokens: Array,
           positions: Array | None, segment_ids: Array) -> Array:
  """Rewards [B] float32 of sequences tokens [B, T]."""
  hidden = llama.forward(params["backbone"], config, tokens, positions, segment_ids)
  last = last_token_index(segment_ids)
  h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, E]
  return h.astype(jnp.float32) @ params["score"]["kernel"] + params["score"]["bias"]


def scores_at(params: Params, config: llama.LlamaConfig, tokens: Array,
              positions: Array, segment_ids: Array, response_ids: Array | None,
              index: Array) -> Array:
  """Rewards [R, K] float32 read at columns index [R, K] of rows tokens [R, T]: packed
  sequences (rlhi/inputs/batches.py `pack`), each scored at its own last token."""
  hidden = llama.forward(params["backbone"], config, tokens, positions, segment_ids,
                         response_ids=response_ids)
  h = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [R, K, E]
  return h.astype(jnp.float32) @ params["score"]["kernel"] + params["score"]["bias"]
