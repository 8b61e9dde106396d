r"""Trains the persona-conditioned reward model; see configs/reward_model.py and
rlhi/train/reward.py.

  python -m experiments.train_reward --config configs/reward_model.py:tiny \
      --workdir /tmp/rlhi_demo/reward
"""

from absl import flags
from ml_collections import config_flags

from rlhi import cli
from rlhi.train import reward

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and reports.")
flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  cli.run(cli.locked_main(reward.run, "train_reward", _CONFIG, _WORKDIR))
