r"""Trains the persona-conditioned reward model; see configs/reward_model.py and
rlhi/train/reward.py.

  python -m experiments.train_reward --config configs/reward_model.py:tiny \
      --workdir /tmp/rlhi_demo/reward
"""

from rlhi import cli
from rlhi.train import reward


if __name__ == "__main__":
  cli.run_with_config(reward.run, "train_reward", "Checkpoints, metrics and reports.")
