r"""Supervised fine-tuning on training users' conversations; see configs/sft.py and
rlhi/train/sft.py.

  python -m experiments.train_sft --config configs/sft.py:tiny --workdir /tmp/rlhi_demo/sft
"""

from absl import flags
from ml_collections import config_flags

from rlhi import cli
from rlhi.train import sft

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports.")
flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  cli.run(cli.locked_main(sft.run, "train_sft", _CONFIG, _WORKDIR))
