"""What every absl entry point shares: flag parsing whose config errors say what to fix.

    from rlhi import cli
    ...
    if __name__ == "__main__":
      cli.run(main)

A trainer or evaluator, `run(config, workdir)` of the library, is a whole entry point:

    if __name__ == "__main__":
      cli.run_with_config(dpo.run, "train_dpo", "Checkpoints, metrics and exports.")

ml_collections reports a misspelled dotted override (`--config.steps=10`) as three
chained tracebacks ending in `AttributeError: "'steps'"`. `cli.run` parses the flags
itself and turns such a failure into one line that names the flag, the config file and
the closest valid fields:

    FATAL Flags parsing error: --config.steps=10: configs/sft.py:tiny has no field
    'steps'; did you mean --config.total_steps?
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from rlhi import workdir_lock
from rlhi.data import files
from rlhi.data import pipeline

_OVERRIDE = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(?:=(.*))?$")


def override_paths(argv: Sequence[str]) -> list[tuple[str, str]]:
  """The dotted `--config.a.b[=v]` overrides in argv as (flag as typed, 'a.b')."""
  out = []
  for arg in argv:
    m = _OVERRIDE.match(arg)
    if m:
      out.append((arg, m.group(1)))
  return out


def _suggest(name: str, choices: Sequence[str]) -> list[str]:
  close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
  # 'steps' -> 'total_steps': a name inside a longer one counts too.
  inside = [c for c in choices if name in c or c in name]
  return list(dict.fromkeys(close + inside))[:3]


def explain_override(config: Any, argv: Sequence[str], config_name: str = "the config"
                     ) -> str | None:
  """One line for the first override in argv that names no field of `config`, or None.

  E.g. "--config.loss.betta=0.2: configs/dpo.py has no field 'loss.betta'; did you
  mean --config.loss.beta? Fields of config.loss: beta, label_smoothing, type".
  """
  if not isinstance(config, ml_collections.ConfigDict):
    return None
  for typed, path in override_paths(argv):
    node, done = config, []
    for part in path.split("."):
      if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
        node, done = node[part], done + [part]
        continue
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        where = ".".join(["config", *done])
        return (f"{typed}: {where} in {config_name} is a value "
                f"({type(node).__name__}), not a section with field '{part}'")
      keys = sorted(node.keys())
      prefix = ".".join(["config", *done])
      hint = " or ".join(f"--{prefix}.{s}" for s in _suggest(part, keys))
      return (f"{typed}: {config_name} has no field '{'.'.join(done + [part])}'"
              + (f"; did you mean {hint}?" if hint else ".")
              + f" Fields of {prefix}: {', '.join(keys)}")
  return None


def _config_name(argv: Sequence[str]) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return "the config"


def load_config(spec: str) -> Any:
  """`get_config(arg)` of 'path/to/file.py[:arg]' (as ml_collections loads it), or None.

  Only used to explain an error: the config flag holds no value once its overrides
  failed to apply.
  """
  path, _, arg = spec.partition(".py:")
  path = path if path.endswith(".py") else path + ".py"
  try:
    module_spec = importlib.util.spec_from_file_location("_rlhi_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except  (the original error is reported)
    return None


def _fail(message: str) -> None:
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                   "Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config override errors explained (see module doc)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    name = _config_name(argv)
    _fail(explain_override(load_config(name), argv, name)
          or f"{type(e).__name__}: {e}")
  raise AssertionError("unreachable")


# Errors whose message says what to fix.
_USER_ERRORS = (workdir_lock.WorkdirBusyError, files.MissingInputError,
                pipeline.StageFailedError)


def locked_main(run_fn: Callable[[Any, str], Any], name: str, config: Any, workdir: Any
                ) -> Callable[[list[str]], None]:
  """main(argv) of an entry point that trains or evaluates with jax.

  Joins the other hosts of a pod (sharding.initialize_distributed), holds --workdir's
  lock on process 0 (rlhi/workdir_lock.py; `name` names the holder in a second run's
  error) and runs `run_fn(config, workdir)`; `config` and `workdir` are the flag
  holders.
  """

  def main(argv: list[str]) -> None:
    del argv
    # Here, not at the top: prepare_data uses this module and never imports jax.
    from rlhi import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed()
    with workdir_lock.hold(workdir.value, name, enabled=sharding.is_main_process()):
      run_fn(config.value, workdir.value)

  return main


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with `parse_flags`; errors that say what to fix print alone.

  A busy work directory, a missing input and a stage over its failure budget end the
  run with exit status 1 and their message, without a traceback (it would bury the
  message); every other exception keeps its traceback. RLHI_QUIET=1 in the environment
  hides library INFO logs (absl, Orbax, JAX); the demo sets it for its stages.
  """

  def main_with_clear_errors(argv):
    if os.environ.get("RLHI_QUIET") == "1":  # the demo's stages: warnings and up only
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except _USER_ERRORS as e:
      sys.stderr.write(f"ERROR: {e}\n")
      sys.exit(1)

  app.run(main_with_clear_errors, flags_parser=parse_flags)


def run_with_config(run_fn: Callable[[Any, str], Any], name: str, workdir_help: str
                    ) -> None:
  """The main of an entry point that is `run_fn(config, workdir)`: defines the flags
  --config (a config file with its variant and dotted overrides) and --workdir, then
  `run(locked_main(...))`. Call it under `if __name__ == "__main__":`."""
  config = config_flags.DEFINE_config_file("config", None, "Config file.",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])
  run(locked_main(run_fn, name, config, workdir))
