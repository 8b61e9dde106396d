"""Running one stage of a multi-stage experiment (demo, simulate) as its own command."""

import os
import shlex
import subprocess
import sys
import time

from absl import flags


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
