r"""Supervised fine-tuning: a warm start on training users' conversations, or the
paper's SFT baseline on the chosen rewrites.

On the demo's data (after data preparation into /tmp/rlhi_demo/data):

  python -m experiments.train_sft --config configs/sft.py:tiny --workdir /tmp/rlhi_demo/sft

The loss is on assistant tokens only. With the persona on (default), each training
user's persona is in the system slot, so the policy learns to read it (persona-guided
inference). Only train-split users are used: val/test users' conversations never reach
training. At the end the params are exported as an HF checkpoint to <workdir>/hf (what
configs/reward_model.py and configs/dpo.py take as `model.init`).

The paper's SFT baseline, from the instruct model on the chosen rewrites:

  python -m experiments.train_sft --config configs/sft.py:smollm2,rewrites \
      --workdir /tmp/rlhi_demo/sft

Variants: a model size (tiny | small | smollm2 | llama3_1b | llama3_8b | llama3_70b |
qwen2_7b); rewrites (train on the chosen answers of the rewrite pairs instead of the
conversations); no_persona; steps=N.
"""

from configs import common


def get_config(arg=None):
  arg, model = common.parse_model_arg(arg, no_persona=False, rewrites=False, steps=0)
  config = common.train_config(model, steps=arg.steps or 300, lr={
      "tiny": 1e-3, "small": 3e-4}.get(model, 1e-5))
  config.data.with_persona = not arg.no_persona
  config.data.train_split = "train"
  # conversations: every assistant turn of the users' conversations (a warm start);
  # rewrites: the chosen answers of their rewrite pairs (the paper's SFT baseline).
  config.data.source = "rewrites" if arg.rewrites else "conversations"
  config.logprob_chunk = 256  # LM head over chunks of this many positions
  return config


def get_sweep(hyper, arg=None):
  """Learning rate (around the size's default) x persona in the system slot.

    python -m experiments.sweep --experiment experiments.train_sft \
        --config configs/sft.py:tiny --workdir /tmp/rlhi_sweep/sft
  """
  return common.lr_persona_sweep(hyper, get_config(arg).optimizer.lr)
