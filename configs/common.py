"""Helpers shared by the config files, in the big_vision manner.

A config file defines `get_config(arg=None)`. `arg` is the single string after the
colon in `--config configs/data_prep.py:sample,min_turns=2`; `parse_arg` turns it into a
ConfigDict of variants whose types come from the defaults the config file declares:

    arg = common.parse_arg(arg, sample=False, min_turns=1, model="tiny")

A bare name (`sample`) sets a bool to True; `name=value` is parsed to the type of the
default. Unknown names are errors that list the known ones, so a typo in a sweep does not
silently run the default.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from rlhi.data import schema
from rlhi.models import families

_TRUE = ("1", "true", "yes", "on", "")
_FALSE = ("0", "false", "no", "off")


def _parse_value(name: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    low = text.lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ValueError(f"config arg '{name}': expected a bool (true/false), got '{text}'")
  if default is None or isinstance(default, str):
    return text
  try:
    return type(default)(text)
  except ValueError as e:
    raise ValueError(f"config arg '{name}': expected {type(default).__name__}, "
                     f"got '{text}'") from e


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'a,b=2,c=x' into a ConfigDict typed by `defaults`."""
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    name, _, text = item.partition("=")
    name = name.strip()
    if name not in defaults:
      known = ", ".join(sorted(defaults)) or "(none)"
      raise ValueError(f"unknown config arg '{name}' in '{arg}'; known: {known}")
    if "=" not in item and not isinstance(defaults[name], bool):
      raise ValueError(f"config arg '{name}' needs a value: '{name}=...'")
    out[name] = _parse_value(name, text.strip(), defaults[name])
  return ml_collections.ConfigDict(out)


# Model sizes (tiny, small, llama3_8b, ...) with the (batch size, mesh, remat, lengths)
# that suit each, so that one config file serves a CPU smoke run and a pod run: declared
# once, by the model families that own them (rlhi/models/families/; no jax there). Pod
# sizes assume a v5e/v5p slice; override with dotted flags.
_SIZES = {
    name: dict(batch_size=s.train.batch_size, mesh=dict(s.train.mesh),
               remat=s.train.remat_policy, max_length=s.train.max_length,
               buckets=tuple(s.train.bucket_lengths), weights=s.weights)
    for name, s in families.named_sizes().items()
}


# Sizes meant for a CPU (the demo's, tests'): their configs default to CPU-sized
# generation and data budgets.
CPU_SIZES = ("tiny", "small", "smollm2")


def parse_model_arg(arg: str | None, **defaults: Any
                    ) -> tuple[ml_collections.ConfigDict, str]:
  """parse_arg plus one bool variant per model size ('tiny', 'llama3_8b', ...).

  Returns (parsed arg, the chosen size; 'tiny' when none is named).
  """
  parsed = parse_arg(arg, **{size: False for size in _SIZES}, **defaults)
  chosen = [size for size in _SIZES if parsed[size]]
  if len(chosen) > 1:
    raise ValueError(f"config arg '{arg}' names several model sizes: {chosen}")
  return parsed, chosen[0] if chosen else "tiny"


def train_config(model: str, *, steps: int, lr: float) -> ml_collections.ConfigDict:
  """The fields every training config shares (see rlhi/train/loop.py)."""
  if model not in _SIZES:
    raise ValueError(f"unknown model size {model!r}; known: {sorted(_SIZES)}")
  size = _SIZES[model]
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      name=model,  # a named size (rlhi/models/families/, llama.get_config)
      # '' random; or what rlhi.models.sources resolves: a registered name (smollm2),
      # a .gguf file, an HF checkpoint dir (also what rlhi runs export). A released
      # size (smollm2) starts from its own weights.
      init=size["weights"],
      remat_policy=size["remat"],
      scan_layers=True,
      # LlamaConfig fields to change: 'num_layers=2,hidden_size=64' (a smaller test
      # model, say); applied to the named size or to the HF checkpoint's config.
      overrides="",
  ))
  # '' = the tokenizer of model.init (saved beside an HF checkpoint, inside a GGUF).
  config.tokenizer = "bundled" if model in ("tiny", "small") else ""
  config.data = ml_collections.ConfigDict(dict(
      dir="/tmp/rlhi_demo/data",  # the data-prep workdir
      max_length=size["max_length"],
      max_response_length=size["max_length"] // 2,
      bucket_lengths=size["buckets"],
      with_persona=True,  # False: the no-persona ablation
      # Several examples per row; a pair's prompt once, shared by its two responses
      # (rlhi/inputs/batches.py `pack`, docs/inputs.md). Same losses up to float32
      # rounding; False: one example per row, padded to a bucket.
      packing=True,
      system_template=schema.PERSONA_TEMPLATE,
  ))
  config.batch_size = size["batch_size"]  # global, over all hosts
  config.accum_steps = 1
  config.total_steps = steps
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=max(1, steps // 20), decay="cosine", end_lr_factor=0.1,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  config.mesh = ml_collections.ConfigDict(size["mesh"])
  # Logical axis -> mesh axes of the training state, batches and activations, MaxText
  # style ((name, axes), ...; earlier win); () keeps rlhi.sharding.DEFAULT_RULES.
  config.sharding_rules = ()
  config.checkpoint = ml_collections.ConfigDict(dict(
      every=max(1, steps // 4), keep=2, keep_every=0, use_async=True))
  config.log_every = max(1, min(10, steps // 10))
  config.eval_every = max(1, steps // 2)
  return config


def lr_persona_sweep(hyper, lr: float) -> list:
  """Learning rate at 0.3x, 1x and 3x `lr` x persona on/off: the sweep of SFT and the
  reward model (`get_sweep` in their config files; rlhi/sweep.py)."""
  return hyper.product([
      hyper.sweep("config.optimizer.lr", [float(f"{lr * f:.2g}") for f in (0.3, 1, 3)]),
      hyper.sweep("config.data.with_persona", [True, False]),
  ])
