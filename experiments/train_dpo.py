r"""Persona-conditioned DPO on user-guided rewrite pairs; see configs/dpo.py.

  python -m experiments.train_dpo --config configs/dpo.py:rewrites \
      --config.model.init=/tmp/rlhi_demo/sft/hf --workdir /tmp/rlhi_demo/dpo

Writes checkpoints, metrics (TRL's names: rewards/accuracies, rewards/margins, ...),
eval_report.md/json (held-out users' pairs, with and without persona) and the policy
in HF format to <workdir>/hf.
"""

from rlhi import cli
from rlhi.train import dpo


if __name__ == "__main__":
  cli.run_with_config(dpo.run, "train_dpo", "Checkpoints, metrics and exports.")
