r"""User-Based Rewards: online rounds of sample -> reward model -> DPO on best vs worst.

  python -m experiments.user_rewards --config configs/dpo.py:user_rewards,rounds=2 \
      --config.model.init=/tmp/rlhi_demo/dpo/hf \
      --config.user_rewards.reward_model=/tmp/rlhi_demo/reward/reward_model \
      --workdir /tmp/rlhi_demo/user_rewards

Re-running the same command resumes (finished rounds are skipped; a round's DPO
resumes from its checkpoints). See rlhi/train/user_rewards.py and configs/dpo.py.
"""

from rlhi import cli
from rlhi.train import user_rewards


if __name__ == "__main__":
  cli.run_with_config(user_rewards.run, "user_rewards",
                      "Rounds, checkpoints and reports.")
