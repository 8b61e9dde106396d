"""Model config and initial parameters from the `config.model` section.

`config.model.init` is '' (random init of the named size) or a model as
`rlhi.models.sources` resolves it: a registered name (`smollm2`), a .gguf file, or an HF
checkpoint directory (a released model, Llama 3.x / Qwen2 / Mistral, or what an rlhi run
exported, `<workdir>/hf`), loaded tensor by tensor straight into the target shardings.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

import jax

from rlhi.models import llama
from rlhi.models import sources


def model_config(model_cfg) -> llama.LlamaConfig:
  overrides = dict(remat_policy=model_cfg.remat_policy, scan_layers=model_cfg.scan_layers,
                   **parse_overrides(model_cfg.get("overrides", "")))
  if model_cfg.init:
    return sources.load_config(model_cfg.init, **overrides)
  return llama.get_config(model_cfg.name, **overrides)


def parse_overrides(text: str) -> dict[str, Any]:
  """'num_layers=2,hidden_size=64' -> {'num_layers': 2, 'hidden_size': 64}."""
  fields = {f.name for f in dataclasses.fields(llama.LlamaConfig)}
  out = {}
  for item in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name.strip() not in fields:
      raise ValueError(f"config.model.overrides: {item!r}; expected name=value with a "
                       f"LlamaConfig field name ({', '.join(sorted(fields))})")
    try:
      out[name.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[name.strip()] = value.strip()  # a bare string, e.g. dtype=bfloat16
  return out


def init_llama_params(model_cfg, config: llama.LlamaConfig, shardings: Any, seed: int
                      ) -> Any:
  """Params on `shardings`: loaded from model_cfg.init, or random from `seed`."""
  if model_cfg.init:
    _, params = sources.load_checkpoint(model_cfg.init, config, shardings)
    return params
  init = jax.jit(lambda key: llama.init_params(config, key), out_shardings=shardings)
  return init(jax.random.PRNGKey(seed))


def tokenizer_name(cfg) -> str:
  """config.tokenizer, or the initial checkpoint's own tokenizer (saved beside an HF
  checkpoint, stored in a GGUF file)."""
  if cfg.tokenizer:
    return cfg.tokenizer
  if cfg.model.init:
    return cfg.model.init
  raise ValueError("config.tokenizer is empty and config.model.init names no "
                   "checkpoint to take the tokenizer from")
