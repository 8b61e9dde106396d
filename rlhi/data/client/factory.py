"""The client factory: config defaults and checks, registered backends, make_client.

Never imports jax: a backend that needs it ('local') registers itself from outside this
package (rlhi/local_backend.py).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import ml_collections

from rlhi.data.client.base import CachedClient
from rlhi.data.client.base import InferenceClient
from rlhi.data.client.base import ResponseCache
from rlhi.data.client.openai import OpenAIClient
from rlhi.data.client.reference import ReferenceClient

BACKENDS = ("openai", "reference", "local")

# ----------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
  """Every client field with its default (see the package docstring)."""
  return ml_collections.ConfigDict({
      "backend": "openai",
      "base_url": "http://127.0.0.1:8000/v1",
      "model": "",
      "api_key_env": "",
      "concurrency": 32,
      "timeout_s": 120.0,
      "max_retries": 5,
      "backoff_base_s": 1.0,
      "backoff_max_s": 60.0,
      "reference_path": "",
      "extra_body": {},
      # 'json_schema' | 'json_object_schema' | 'json_object' | 'none'
      "structured_output": "json_object",
      # 'local': an HF checkpoint directory, .gguf file or 'smollm2', served by rlhi's
      # sampler.
      "checkpoint": "",
      "tokenizer": "",  # '' = the checkpoint's own
      "local_batch_size": 16,
  })


def _config_values(cfg: Any) -> dict[str, Any]:
  """Reads cfg (ConfigDict, mapping or object) over the defaults; rejects unknown names."""
  defaults = default_config().to_dict()
  if isinstance(cfg, ml_collections.ConfigDict):
    given = cfg.to_dict()
  elif isinstance(cfg, Mapping):
    given = dict(cfg)
  else:
    given = dict(vars(cfg))
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"client config: unknown field(s) {', '.join(unknown)}; known: "
                     f"{', '.join(sorted(defaults))}")
  if "backend" not in given:
    raise ValueError(f"client config: 'backend' is required; allowed: "
                     f"{', '.join(repr(b) for b in BACKENDS)}")
  values = dict(defaults)
  values.update({k: v for k, v in given.items() if v is not None})
  return values
# ----------------------------------------------------------------------------------------
# Factory.
# ----------------------------------------------------------------------------------------


# Backends defined outside this package, by name: `rlhi.local_backend` registers
# 'local' when imported. The data package never imports jax-side code, lazily or not.
_REGISTERED: dict[str, Callable[[dict[str, Any]], InferenceClient]] = {}


def register_backend(name: str,
                     factory: Callable[[dict[str, Any]], InferenceClient]) -> None:
  """Makes `make_client` build `name` with factory(config values)."""
  if name not in BACKENDS:
    raise ValueError(f"register_backend: {name!r} is not one of {BACKENDS}")
  _REGISTERED[name] = factory


def make_client(cfg: Any, *, cache_path: str | os.PathLike[str] | None = None
               ) -> InferenceClient:
  """Builds the client that `cfg.backend` names, behind a cache when cache_path is set."""
  values = _config_values(cfg)
  backend = values["backend"]
  if backend == "openai":
    client: InferenceClient = OpenAIClient(
        base_url=values["base_url"], model=values["model"],
        api_key_env=values["api_key_env"], concurrency=values["concurrency"],
        timeout_s=values["timeout_s"], max_retries=values["max_retries"],
        backoff_base_s=values["backoff_base_s"], backoff_max_s=values["backoff_max_s"],
        extra_body=values["extra_body"], structured_output=values["structured_output"])
  elif backend == "reference":
    if not isinstance(values["reference_path"], str):
      raise ValueError(f"client config: 'reference_path' must be a path string, got "
                       f"{values['reference_path']!r}")
    client = ReferenceClient(values["reference_path"] or None)
  elif backend in _REGISTERED:
    client = _REGISTERED[backend](values)
  elif backend in BACKENDS:
    raise ValueError(f"client config: backend={backend!r} runs rlhi's own model (jax), "
                     f"which this jax-free package does not import: import "
                     f"rlhi.local_backend first, which registers it "
                     f"(experiments/prepare_data.py and rlhi.eval do)")
  else:
    raise ValueError(f"client config: backend={backend!r} is not supported; allowed: "
                     f"{', '.join(repr(b) for b in BACKENDS)}")
  if cache_path:
    try:
      cache = ResponseCache(cache_path)
    except BaseException:
      client.close()
      raise
    client = CachedClient(client, cache)
  return client
