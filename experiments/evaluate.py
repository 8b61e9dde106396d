r"""Evaluation: WildChat UserEval and reward-model accuracy; see configs/eval.py.

  python -m experiments.evaluate --config configs/eval.py:ckpt=/tmp/rlhi_demo/dpo/hf \
      --workdir /tmp/rlhi_demo/eval --config.data.dir=/tmp/rlhi_demo/data

Writes usereval.{md,json,png,html} (with the answers and judgements as JSONL) and, with
config.reward_eval.enabled, reward_eval_report.{md,json} to --workdir; see
rlhi/eval/evaluate.py. Re-running the same command resumes.
"""

from rlhi import cli
from rlhi.eval import evaluate


if __name__ == "__main__":
  cli.run_with_config(evaluate.run, "evaluate", "Reports, answers and judgements.")
