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
from rlhi import sharding
from rlhi import workdir_lock
from rlhi.train import dpo

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  sharding.initialize_distributed()
  with workdir_lock.hold(_WORKDIR.value, "train_dpo",
                          enabled=sharding.is_main_process()):
    dpo.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
