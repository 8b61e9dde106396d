"""Evaluation: WildChat UserEval and reward-model accuracy, the run behind
experiments/evaluate.py (configs/eval.py).

Writes usereval.{md,json,png,html} (with the answers and judgements as JSONL) and, with
config.reward_eval.enabled, reward_eval_report.{md,json} to the work directory. Only
process 0 writes; re-running resumes (answers and judge calls are reused).
"""

from __future__ import annotations

import os

from absl import app

from rlhi import sharding
from rlhi.eval import browser
from rlhi.eval import report as report_lib
from rlhi.eval import reward_eval
from rlhi.eval import usereval


def run(cfg, workdir: str) -> None:
  """UserEval (config.usereval_enabled) and reward-model accuracy
  (config.reward_eval.enabled) of configs/eval.py, into `workdir`; prints one line per
  report (process 0). Call `sharding.initialize_distributed()` first."""
  if not cfg.usereval_enabled and not cfg.reward_eval.enabled:
    raise app.UsageError("nothing to do: config.usereval_enabled and "
                         "config.reward_eval.enabled are both false")

  # ---- UserEval ----------------------------------------------------------------------
  # One line per report: where it is and its headline number; the numbers are there.
  if cfg.usereval_enabled:
    report = usereval.run_usereval(cfg, workdir)
    if sharding.is_main_process():
      dim = "overall" if "overall" in report["win_rates"] else next(
          iter(report["win_rates"]))
      c = report["win_rates"][dim]["all"]
      rate = ("n/a" if c["win_rate"] is None else f"{100 * c['win_rate']:.1f}% "
              f"[{100 * c['ci_low']:.1f}%, {100 * c['ci_high']:.1f}%]")
      print(f"UserEval: B ({report['systems']['b']['label']}) over A "
            f"({report['systems']['a']['label']}), {dim}, {c['n_items']} items: {rate}. "
            f"Report: {os.path.join(workdir, report_lib.MD_FILE)}; every item: "
            f"{os.path.join(workdir, browser.HTML_FILE)}")

  # ---- Reward-model accuracy ---------------------------------------------------------
  if cfg.reward_eval.enabled:
    reward_eval.run_reward_eval(cfg, workdir)
    if sharding.is_main_process():
      print("Reward-model accuracy: "
            + os.path.join(workdir, f"{reward_eval.REPORT_NAME}_report.md"))
