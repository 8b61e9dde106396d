"""The model-family registry: a family is one module plus a registration.

    from rlhi.models import families
    from rlhi.models.families import base

    class MyFamily(base.Family):
      name = "my_model_type"                  # HF config.json model_type
      architectures = ("MyForCausalLM",)
      def fields_from_hf(self, hf, source): ...   # what differs from HF Llama

    families.register(MyFamily())

after which `hf_io.config_from_hf`, `hf_io.load_checkpoint`, `sources.load_checkpoint`
and `config.model.init` read checkpoints of that architecture. Built in, one module
each: `llama3` (Llama 1-3.x), `qwen2`, `mistral`, and `gguf_llama` (a GGUF file's
'llama' architecture); they are imported on the first lookup.

As Levanter registers its `LmConfig` subclasses by name, each with its HF converter,
here a family object carries its config mapping, tensor-name table and named sizes;
the loaders in hf_io / gguf_io hold no per-architecture code.

No jax here (configs/common.py takes the named sizes from `named_sizes`).
"""

from __future__ import annotations

import importlib
from typing import Any

# pylint: disable-next=unused-import  (re-exported)
from rlhi.models.families.base import Family, GgufArchitecture, NamedSize, TrainDefaults
from rlhi.models.llama_config import LlamaConfig

_BUILTINS = ("llama3", "qwen2", "mistral", "gguf_llama")
_FAMILIES: dict[str, Family] = {}          # by HF model_type
_GGUF: dict[str, GgufArchitecture] = {}    # by GGUF general.architecture
_builtins_loaded = False


def _load_builtins() -> None:
  global _builtins_loaded
  if not _builtins_loaded:
    _builtins_loaded = True
    for module in _BUILTINS:
      importlib.import_module(f"{__name__}.{module}")


def register(family: Family) -> Family:
  """Adds `family`; its name, architectures and size names must be new."""
  if not family.name or not family.architectures:
    raise ValueError(f"{family!r}: a family needs a name (the HF model_type) and at "
                     f"least one HF architecture name")
  if family.name in _FAMILIES:
    raise ValueError(f"model family {family.name!r} is registered already "
                     f"({_FAMILIES[family.name]!r})")
  for other in _FAMILIES.values():
    taken = set(other.architectures) & set(family.architectures)
    if taken:
      raise ValueError(f"{family!r}: architecture {sorted(taken)} belongs to {other!r}")
    clash = set(other.sizes) & set(family.sizes)
    if clash:
      raise ValueError(f"{family!r}: size {sorted(clash)} is declared by {other!r}")
  _FAMILIES[family.name] = family
  return family


def register_gguf(arch: GgufArchitecture) -> GgufArchitecture:
  if arch.name in _GGUF:
    raise ValueError(f"GGUF architecture {arch.name!r} is registered already")
  _GGUF[arch.name] = arch
  return arch


def unregister(name: str) -> None:
  """Removes family `name` (tests; a newcomer's experiment)."""
  del _FAMILIES[name]


def registered() -> dict[str, Family]:
  """Every family, by HF model_type, in registration order."""
  _load_builtins()
  return dict(_FAMILIES)


def _describe() -> str:
  return ", ".join(f"{name} ({'/'.join(f.architectures)})"
                   for name, f in sorted(registered().items()))


def get(name: str) -> Family:
  if name not in registered():
    raise ValueError(f"no model family {name!r}; registered: {_describe()}")
  return _FAMILIES[name]


def for_hf(hf: dict[str, Any], source: str = "config.json") -> Family:
  """The family of an HF config dict: by model_type, else by "architectures"."""
  families = registered()
  model_type = hf.get("model_type")
  if model_type in families:
    return families[model_type]
  architectures = hf.get("architectures") or []
  for family in families.values():
    if set(architectures) & set(family.architectures):
      return family
  raise ValueError(f"{source}: model_type={model_type!r} (architectures="
                   f"{architectures}) is not supported; registered families: "
                   f"{_describe()}")


def for_config(config: LlamaConfig) -> Family:
  """The family whose config.json represents `config` exactly (what export writes)."""
  for family in registered().values():
    if family.represents(config):
      return family
  what = ("qkv_bias with sliding_window" if config.qkv_bias and config.sliding_window
          else f"qkv_bias={config.qkv_bias}, sliding_window={config.sliding_window}")
  raise ValueError(f"{what} has no HF equivalent among the registered families "
                   f"({_describe()})")


def for_gguf(arch: str, source: str) -> GgufArchitecture:
  _load_builtins()
  if arch not in _GGUF:
    raise ValueError(f"{source}: general.architecture={arch!r} is not supported; "
                     f"expected one of {sorted(_GGUF)}")
  return _GGUF[arch]


def named_sizes() -> dict[str, NamedSize]:
  """Every family's named sizes (tiny, small, llama3_8b, ...), in registration order."""
  return {name: size for family in registered().values()
          for name, size in family.sizes.items()}
