"""One way to build a model from a config section: config.model, or its equivalent.

A model section names what to build:

    name           a named size (`llama.get_config`), used when `init` is ''
    init           '' (random init of `name`) or a model as `rlhi.models.sources`
                   resolves it: a registered name (`smollm2`), a .gguf file or an HF
                   checkpoint directory (any registered family), loaded tensor by tensor
                   straight into the target shardings
    overrides      LlamaConfig fields to change: 'num_layers=2,hidden_size=64'
    remat_policy   None/absent: as the size or checkpoint says
    scan_layers    None/absent: as the size or checkpoint says

Training (the trainers in rlhi/train), generation (`rlhi.generate`) and reward-model
loading (`reward_io.load`, for its backbone) all go through `model_config` and
`init_params` here. A section is an ml_collections ConfigDict, a dict or a `ModelSpec`.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

import jax

from rlhi.models import llama
from rlhi.models import sources


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A config.model section as a record (for callers without a ConfigDict)."""

  name: str = ""
  init: str = ""
  overrides: str = ""
  remat_policy: str | None = None
  scan_layers: bool | None = None

  def get(self, key: str, default: Any = None) -> Any:
    value = getattr(self, key, default)
    return default if value is None else value


def model_config(model_cfg, **overrides: Any) -> llama.LlamaConfig:
  """The LlamaConfig of a model section (`overrides`: more LlamaConfig fields, applied
  last)."""
  fields = {k: model_cfg.get(k) for k in ("remat_policy", "scan_layers")
            if model_cfg.get(k) is not None}
  fields = dict(**fields, **parse_overrides(model_cfg.get("overrides", "") or ""))
  fields.update(overrides)
  if model_cfg.get("init"):
    return sources.load_config(model_cfg.get("init"), **fields)
  return llama.get_config(model_cfg.get("name"), **fields)


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


def init_params(model_cfg, config: llama.LlamaConfig, shardings: Any, seed: int = 0
                ) -> Any:
  """Params of `config` on `shardings`: loaded from the section's `init`, or random
  from `seed`."""
  if model_cfg.get("init"):
    _, params = sources.load_checkpoint(model_cfg.get("init"), config, shardings)
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
