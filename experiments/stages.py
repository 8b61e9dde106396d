"""Running one stage of a multi-stage experiment (demo, simulate): as its own command,
or in this process with the same config."""

import importlib
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Callable

from absl import flags

from rlhi import cli
from rlhi import workdir_lock


def run(name: str, cmd: list[str]) -> float:
  """Runs one stage's command (its progress bar streams through); returns seconds.

  Prints the command as a person would paste it (shell-quoted, from `python`). Library
  INFO logs (absl, Orbax, JAX's backend probing, transformers' notices) are quiet
  unless the experiment runs with --verbosity (-v) 0 or more: RLHI_QUIET (rlhi/cli.py).
  """
  sys.stdout.write(f"\n== {name}: {shlex.join(['python', *cmd[1:]])}\n")
  sys.stdout.flush()
  env = dict(os.environ)
  if not flags.FLAGS["verbosity"].present:
    env.update(RLHI_QUIET="1", TRANSFORMERS_VERBOSITY="error")
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, env=env)
  return time.perf_counter() - t0


def _flag_value(v: Any) -> str:
  return repr(v) if isinstance(v, (tuple, list)) else str(v)


def run_in_process(name: str, module: str, config: str, overrides: dict[str, Any],
                   workdir: str, run_fn: Callable[[Any, str], Any]) -> float:
  """What `run` would start as `python -m module`, run in this process; returns seconds.

  `config` is a config file with its variant ('configs/eval.py:quick'), `overrides`
  its dotted fields ({'generation.batch_size': 16}), `run_fn(config, workdir)` the
  entry point's library function. Prints the equivalent command. Stages that load
  models of the same shapes one after another (UserEval of several checkpoints) share
  the interpreter's imports and jax's compiled functions instead of paying for both in
  each process. Single-process runs only: unlike `cli.locked_main`, it joins no other
  hosts.
  """
  argv = [f"--config={config}", f"--workdir={workdir}",
          *(f"--config.{k}={_flag_value(v)}" for k, v in overrides.items())]
  sys.stdout.write(f"\n== {name}: {shlex.join(['python', '-m', module, *argv])}\n")
  sys.stdout.flush()
  path, _, arg = config.partition(":")
  cfg = importlib.import_module(
      path.removesuffix(".py").replace("/", ".")).get_config(arg or None)
  # As the flags would: a field the config lacks is an error, not a new field
  # (ConfigDict.update_from_flattened_dict would add it).
  problem = cli.explain_override(cfg, argv, config)
  if problem:
    raise ValueError(problem)
  for key, value in overrides.items():
    *parents, field = key.split(".")
    node = cfg
    for part in parents:
      node = node[part]
    setattr(node, field, value)
  cfg.lock()  # as --config locks it: a field the run adds is an error here too
  t0 = time.perf_counter()
  with workdir_lock.hold(workdir, module.rsplit(".", 1)[-1]):
    run_fn(cfg, workdir)
  return time.perf_counter() - t0
