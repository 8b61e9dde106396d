"""Hyper-parameter sweeps in the big_vision manner, and how a run becomes flags.

A config file may define `get_sweep(hyper)` next to `get_config`; `hyper` is this
module. It returns one dict per run, from a dotted config field (or 'config', the
variant string after the colon of `--config`, or the name of another flag of the
experiment) to its value:

  def get_sweep(hyper):
    return hyper.product([
        hyper.sweep("config.optimizer.lr", [1e-5, 3e-5, 1e-4]),
        hyper.sweep("config.data.with_persona", [True, False]),
    ])

`get_sweep(hyper, arg)` may also take the config arg (the text after the colon), to
centre a sweep on the chosen model size's defaults. `experiments/sweep.py` expands the
list into runs: `to_flags` renders one dict as command-line flags that ml_collections
parses back to the same values, and `run_names` names each run's work directory after
what it changes (`lr=1e-05,with_persona=False`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Run = dict[str, Any]

CONFIG_KEY = "config"  # the variant string of --config, e.g. 'llama3_8b,no_persona'
_FLAG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# Flags the sweep sets itself: a get_sweep may not.
RESERVED_FLAGS = ("workdir",)
MAX_NAME_LENGTH = 120


# ---- hyper: building the list of runs ---------------------------------------------


def sweep(name: str, values: Iterable[Any]) -> list[Run]:
  """One run per value of `name`."""
  _check_key(name)
  values = list(values)
  if not values:
    raise ValueError(f"sweep({name!r}, ...): no values")
  return [{name: value} for value in values]


def fixed(name: str, value: Any, length: int = 1) -> list[Run]:
  """`name` set to `value`, `length` times (so that it can be zipped)."""
  _check_key(name)
  if length < 1:
    raise ValueError(f"fixed({name!r}, ..., length={length}): length must be >= 1")
  return [{name: value} for _ in range(length)]


def product(sweeps: Sequence[Sequence[Run]]) -> list[Run]:
  """Every combination; the first sweep varies slowest. product([]) is one empty run."""
  runs: list[Run] = [{}]
  for one in sweeps:
    runs = [_merge(a, b, "product") for a in runs for b in one]
  return runs


def zipit(sweeps: Sequence[Sequence[Run]]) -> list[Run]:
  """Runs side by side: the i-th run merges the i-th of every sweep (equal lengths)."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f"zipit: sweeps of different lengths {lengths}; use fixed(name, "
                     f"value, length=n) to repeat a value")
  out = []
  for parts in zip(*sweeps):
    run: Run = {}
    for part in parts:
      run = _merge(run, part, "zipit")
    out.append(run)
  return out


def chainit(sweeps: Sequence[Sequence[Run]]) -> list[Run]:
  """One sweep after another."""
  return [dict(run) for one in sweeps for run in one]


def _check_key(name: str) -> None:
  if not isinstance(name, str) or not _FLAG_NAME.match(name):
    raise ValueError(f"sweep key {name!r}: expected 'config.<field>[.<field>...]', "
                     f"'config', or a flag name")
  if name in RESERVED_FLAGS:
    raise ValueError(f"sweep key {name!r} is set by the sweep itself (one directory "
                     f"per run)")
  if "." in name and not name.startswith(CONFIG_KEY + "."):
    raise ValueError(f"sweep key {name!r}: dotted names are config fields and start "
                     f"with 'config.'")


def _merge(a: Mapping[str, Any], b: Mapping[str, Any], where: str) -> Run:
  both = sorted(set(a) & set(b))
  if both:
    raise ValueError(f"{where}: {both} set twice in one run ({dict(a)} and {dict(b)})")
  return {**a, **b}


# ---- runs as command lines ---------------------------------------------------------


def render_value(value: Any) -> str:
  """The text a flag takes so that ml_collections parses it back to `value`.

  Bools are True/False, floats their shortest round-tripping repr (1e-05), tuples and
  lists a Python tuple literal ("(256, 512)", "(256,)"); strings are taken as they are.
  """
  value = _plain(value)
  if isinstance(value, bool):
    return "True" if value else "False"
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, str):
    return value
  if isinstance(value, (tuple, list)):
    items = [repr(_plain(v)) for v in value]
    for v in value:
      if not isinstance(_plain(v), (bool, int, float, str)):
        raise TypeError(f"sweep value {value!r}: tuple items must be bool, int, float "
                        f"or str")
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  raise TypeError(f"sweep value {value!r} ({type(value).__name__}): a flag takes bool, "
                  f"int, float, str or a tuple of them")


def _plain(value: Any) -> Any:
  """numpy scalars -> Python scalars (np.float64(1e-5) renders as 1e-05)."""
  item = getattr(value, "item", None)
  if item is not None and getattr(value, "shape", None) == ():
    return item()
  return value


def to_flags(run: Mapping[str, Any]) -> list[str]:
  """`--config.optimizer.lr=1e-05`, ... for every key but 'config' (see config_spec)."""
  flags = []
  for key, value in run.items():
    _check_key(key)
    if key != CONFIG_KEY:
      flags.append(f"--{key}={render_value(value)}")
  return flags


def config_spec(base: str, run: Mapping[str, Any]) -> str:
  """The --config value of a run: `base` ('configs/x.py:arg') unless the run sets
  'config': a variant string replaces the arg ('llama3_8b,no_persona'), a value naming a
  file ('configs/y.py:arg') replaces the whole spec."""
  if CONFIG_KEY not in run:
    return base
  value = str(run[CONFIG_KEY])
  if ".py" in value:
    return value
  path = base.split(":", 1)[0]
  return f"{path}:{value}" if value else path


# ---- run names ---------------------------------------------------------------------


def short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Each key's last dotted part, lengthened until all are distinct."""
  parts = {k: k.split(".") for k in keys}
  depth = dict.fromkeys(keys, 1)
  while True:
    names = {k: ".".join(parts[k][-depth[k]:]) for k in keys}
    seen: dict[str, list[str]] = {}
    for k, n in names.items():
      seen.setdefault(n, []).append(k)
    clashes = [ks for ks in seen.values() if len(ks) > 1]
    grew = False
    for ks in clashes:
      for k in ks:
        if depth[k] < len(parts[k]):
          depth[k] += 1
          grew = True
    if not grew:
      return names


def _name_value(value: Any) -> str:
  value = _plain(value)
  if isinstance(value, (tuple, list)):
    return "_".join(_name_value(v) for v in value) or "empty"
  text = render_value(value) if isinstance(value, (bool, int, float)) else str(value)
  # Commas separate keys in a name; path separators and the rest would make odd paths.
  text = text.replace(",", "+").replace("/", "_")
  return re.sub(r"[^A-Za-z0-9._+=-]", "_", text) or "empty"


def run_name(run: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
  """A short, filesystem-safe name: 'lr=1e-05,with_persona=False'."""
  keys = [k for k in (run if keys is None else keys) if k in run]
  short = short_keys(keys)
  name = ",".join(f"{short[k]}={_name_value(run[k])}" for k in keys) or "run"
  name = name.lstrip(".-") or "run"
  if len(name) > MAX_NAME_LENGTH:
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    name = f"{name[:MAX_NAME_LENGTH - 9]}_{digest}"
  return name


def varying_keys(runs: Sequence[Mapping[str, Any]]) -> list[str]:
  """Keys whose value differs between runs (or that some runs lack), in first-seen order;
  all keys when none differ."""
  keys: list[str] = []
  for run in runs:
    for key in run:
      if key not in keys:
        keys.append(key)
  missing = object()
  varying = [k for k in keys if len({repr(run.get(k, missing)) for run in runs}) > 1]
  return varying or keys


def run_names(runs: Sequence[Mapping[str, Any]]) -> list[str]:
  """Distinct names for `runs`, from the keys that vary between them."""
  keys = varying_keys(runs)
  names = [run_name(run, keys) for run in runs]
  counts: dict[str, int] = {}
  for n in names:
    counts[n] = counts.get(n, 0) + 1
  out, used = [], set()
  for i, n in enumerate(names):
    unique = n if counts[n] == 1 else f"{n}_{i}"
    while unique in used:
      unique += "_"
    used.add(unique)
    out.append(unique)
  return out
