"""Model config and initial parameters from the `config.model` section.

`config.model.init` is '' (random init of the named size) or an HF checkpoint directory:
a released model (Llama 3.x, Qwen2, Mistral) or what an rlhi run exported (`<workdir>/hf`),
loaded tensor by tensor straight into the target shardings.
"""

from __future__ import annotations

from typing import Any

import jax

from rlhi.models import hf_io
from rlhi.models import llama


def model_config(model_cfg) -> llama.LlamaConfig:
  overrides = dict(remat_policy=model_cfg.remat_policy, scan_layers=model_cfg.scan_layers)
  if model_cfg.init:
    return hf_io.load_config(model_cfg.init, **overrides)
  return llama.get_config(model_cfg.name, **overrides)


def init_llama_params(model_cfg, config: llama.LlamaConfig, shardings: Any, seed: int
                      ) -> Any:
  """Params on `shardings`: loaded from model_cfg.init, or random from `seed`."""
  if model_cfg.init:
    _, params = hf_io.load_checkpoint(model_cfg.init, config, shardings)
    return params
  init = jax.jit(lambda key: llama.init_params(config, key), out_shardings=shardings)
  return init(jax.random.PRNGKey(seed))


def tokenizer_name(cfg) -> str:
  """config.tokenizer, or the tokenizer saved with the initial checkpoint."""
  if cfg.tokenizer:
    return cfg.tokenizer
  if cfg.model.init:
    return cfg.model.init
  raise ValueError("config.tokenizer is empty and config.model.init names no "
                   "checkpoint to take the tokenizer from")
