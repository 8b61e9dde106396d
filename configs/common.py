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

import itertools
from typing import Any, Iterable

import ml_collections

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


def format_arg(values: dict[str, Any]) -> str:
  """Inverse of parse_arg for launching: {'sample': True, 'n': 2} -> 'sample=True,n=2'."""
  return ",".join(f"{k}={v}" for k, v in values.items())


def product(*axes: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
  """Sweep helper: the cartesian product of lists of override dicts.

  product([{'lr': 1e-6}, {'lr': 3e-6}], [{'beta': 0.1}, {'beta': 0.3}]) gives four
  dicts, each the union of one choice per axis.
  """
  out = []
  for combo in itertools.product(*axes):
    merged: dict[str, Any] = {}
    for d in combo:
      merged.update(d)
    out.append(merged)
  return out


def sweep(name: str, values: Iterable[Any]) -> list[dict[str, Any]]:
  """One sweep axis: sweep('optimizer.lr', [1e-6, 3e-6]) -> [{'optimizer.lr': ...}, ...]."""
  return [{name: v} for v in values]
