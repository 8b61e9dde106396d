r"""Evaluation: WildChat UserEval and reward-model accuracy; see configs/eval.py.

  python -m experiments.evaluate --config configs/eval.py:ckpt=/tmp/rlhi_demo/dpo/hf \
      --workdir /tmp/rlhi_demo/eval --config.data.dir=/tmp/rlhi_demo/data

Writes usereval.{md,json,png} (with the answers and judgements as JSONL) and, with
config.reward_eval.enabled, reward_eval_report.{md,json} to --workdir. Only process 0
writes; re-running the same command resumes (answers and judge calls are reused).
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from rlhi import cli
from rlhi import fileio
from rlhi import sharding
from rlhi import workdir_lock
from rlhi.eval import report as report_lib
from rlhi.eval import reward_eval
from rlhi.eval import usereval

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Reports, answers and judgements.")
flags.mark_flags_as_required(["config", "workdir"])


def run(cfg, workdir: str) -> None:
  """The whole run of this entry point (process 0 holds the workdir lock)."""
  if not cfg.usereval_enabled and not cfg.reward_eval.enabled:
    raise app.UsageError("nothing to do: config.usereval_enabled and "
                         "config.reward_eval.enabled are both false")

  # ---- UserEval ----------------------------------------------------------------------
  if cfg.usereval_enabled:
    usereval.run_usereval(cfg, workdir)
    if sharding.is_main_process():
      print(f"\nWrote {os.path.join(workdir, report_lib.MD_FILE)}:\n")
      with fileio.open(os.path.join(workdir, report_lib.MD_FILE)) as f:
        print(f.read())

  # ---- Reward-model accuracy ---------------------------------------------------------
  if cfg.reward_eval.enabled:
    reward_eval.run_reward_eval(cfg, workdir)
    if sharding.is_main_process():
      path = os.path.join(workdir, f"{reward_eval.REPORT_NAME}_report.md")
      print(f"\nWrote {path}:\n")
      with fileio.open(path) as f:
        print(f.read())


def main(argv):
  del argv
  sharding.initialize_distributed()
  with workdir_lock.hold(_WORKDIR.value, "evaluate",
                          enabled=sharding.is_main_process()):
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
