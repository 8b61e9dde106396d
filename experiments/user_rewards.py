r"""User-Based Rewards: online rounds of sample -> reward model -> DPO on best vs worst.

  python -m experiments.user_rewards --config configs/dpo.py:user_rewards,rounds=2 \
      --config.model.init=/tmp/rlhi_demo/dpo/hf \
      --config.user_rewards.reward_model=/tmp/rlhi_demo/reward/reward_model \
      --workdir /tmp/rlhi_demo/user_rewards

Re-running the same command resumes (finished rounds are skipped; a round's DPO
resumes from its checkpoints). See rlhi/train/user_rewards.py and configs/dpo.py.
"""

from absl import flags
from ml_collections import config_flags

from rlhi import cli
from rlhi.train import user_rewards

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Rounds, checkpoints and reports.")
flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  cli.run(cli.locked_main(user_rewards.run, "user_rewards", _CONFIG, _WORKDIR))
