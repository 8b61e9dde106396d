r"""Supervised fine-tuning (warm start of the policy) on training users' conversations.

On the demo's data (after data preparation into /tmp/rlhi_demo/data):

  python -m experiments.train_sft --config configs/sft.py:tiny --workdir /tmp/rlhi_demo/sft

The loss is on assistant tokens only. With the persona on (default), each training
user's persona is in the system slot, so the policy learns to read it (persona-guided
inference). Only train-split users are used: val/test users' conversations never reach
training. At the end the params are exported as an HF checkpoint to <workdir>/hf (what
configs/reward_model.py and configs/dpo.py take as `model.init`).

Variants: a model size (tiny | small | llama3_1b | llama3_8b | llama3_70b | qwen2_7b);
no_persona; steps=N.
"""

from configs import common


def get_config(arg=None):
  arg, model = common.parse_model_arg(arg, no_persona=False, steps=0)
  config = common.train_config(model, steps=arg.steps or 300,
                               lr=1e-3 if model == "tiny" else
                               3e-4 if model == "small" else 1e-5)
  config.data.with_persona = not arg.no_persona
  config.data.train_split = "train"
  config.logprob_chunk = 256  # LM head over chunks of this many positions
  return config


def get_sweep(hyper, arg=None):
  """Learning rate (around the size's default) x persona in the system slot.

    python -m experiments.sweep --experiment experiments.train_sft \
        --config configs/sft.py:tiny --workdir /tmp/rlhi_sweep/sft
  """
  return common.lr_persona_sweep(hyper, get_config(arg).optimizer.lr)
