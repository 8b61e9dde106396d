r"""Persona-conditioned reward model (Bradley-Terry) on user-guided rewrite pairs.

On the demo's data (after `python -m experiments.prepare_data --config
configs/data_prep.py:sample --workdir /tmp/rlhi_demo/data --stage all`):

  python -m experiments.train_reward --config configs/reward_model.py:tiny \
      --workdir /tmp/rlhi_demo/reward

From a released model on a TPU slice (same command on every worker):

  python -m experiments.train_reward --config configs/reward_model.py:llama3_8b \
      --config.model.init=/path/to/Llama-3.1-8B-Instruct \
      --config.data.dir=gs://bucket/rlhi/data --workdir gs://bucket/rlhi/reward

Variants: a model size (tiny | small | smollm2 | llama3_1b | llama3_8b | llama3_70b | qwen2_7b);
no_persona (the ablation: the persona is left out of training); steps=N.
The eval report gives accuracy on held-out users' pairs with and without the persona.
"""

from configs import common


def get_config(arg=None):
  arg, model = common.parse_model_arg(arg, no_persona=False, steps=0)
  config = common.train_config(model, steps=arg.steps or 200, lr={
      "tiny": 1e-4, "small": 1e-4, "smollm2": 1e-5}.get(model, 2e-6))
  config.data.with_persona = not arg.no_persona
  config.loss = dict(
      margin=0.0,  # required gap r_chosen - r_rejected (Llama 2 RM)
      center_coef=0.0,  # TRL center_rewards_coefficient
  )
  config.eval_splits = ("val", "test")  # held-out users
  return config


def get_sweep(hyper, arg=None):
  """Learning rate (around the size's default) x persona: the persona ablation at each.

    python -m experiments.sweep --experiment experiments.train_reward \
        --config configs/reward_model.py:tiny --workdir /tmp/rlhi_sweep/reward
  """
  return common.lr_persona_sweep(hyper, get_config(arg).optimizer.lr)
