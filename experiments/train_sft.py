r"""Supervised fine-tuning on training users' conversations; see configs/sft.py and
rlhi/train/sft.py.

  python -m experiments.train_sft --config configs/sft.py:tiny --workdir /tmp/rlhi_demo/sft
"""

from rlhi import cli
from rlhi.train import sft


if __name__ == "__main__":
  cli.run_with_config(sft.run, "train_sft", "Checkpoints, metrics and exports.")
