r"""Persona-conditioned DPO on user-guided rewrite pairs; see configs/dpo.py.

  python -m experiments.train_dpo --config configs/dpo.py:rewrites \
      --config.model.init=/tmp/rlhi_demo/sft/hf --workdir /tmp/rlhi_demo/dpo

Writes checkpoints, metrics (TRL's names: rewards/accuracies, rewards/margins, ...),
eval_report.md/json (held-out users' pairs, with and without persona) and the policy
in HF format to <workdir>/hf.
"""

from absl import flags
from ml_collections import config_flags

from rlhi import cli
from rlhi.train import dpo

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports.")
flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  cli.run(cli.locked_main(dpo.run, "train_dpo", _CONFIG, _WORKDIR))
