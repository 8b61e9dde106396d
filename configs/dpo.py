r"""Persona-conditioned DPO of the policy on user-guided rewrite pairs.

On the demo's data (after data preparation into /tmp/rlhi_demo/data), from the
instruct model, or from an SFT warm start of the tiny model:

  python -m experiments.train_dpo --config configs/dpo.py:rewrites,smollm2 \
      --workdir /tmp/rlhi_demo/dpo
  python -m experiments.train_dpo --config configs/dpo.py:rewrites,tiny \
      --config.model.init=/tmp/rlhi_demo/sft/hf --workdir /tmp/rlhi_demo/dpo

On a TPU slice, from the SFT policy (same command on every worker; tpu/README.md):

  python -m experiments.train_dpo --config configs/dpo.py:rewrites,llama3_8b \
      --config.model.init=gs://bucket/rlhi/sft/hf \
      --config.data.dir=gs://bucket/rlhi/data --workdir gs://bucket/rlhi/dpo

Variants:
  rewrites             (default) pairs from user-guided rewrites, persona in the prompt
  rewrites_no_persona  the same pairs without the persona (the ablation)
  user_rewards         online rounds: sample, score with the reward model, DPO on best
                       vs worst (experiments/user_rewards.py); rounds=N;
                       --config.user_rewards.reward=follow_up scores with the
                       policy's follow-up likelihood instead (the FLR baseline)
  live                 reference log-probs computed every step instead of cached
  a model size         tiny | small | smollm2 | llama3_1b | llama3_8b | llama3_70b | qwen2_7b
  steps=N

The policy starts from `model.init` (an HF dir: the SFT export, a released model; a
.gguf file or a registered name; '' for a random init of the named size; `smollm2`
defaults to SmolLM2-135M-Instruct's weights); the reference model is `reference.init`, by
default the same checkpoint. Reference log-probs are computed once, in a sharded pass,
and cached in `reference.cache_dir` (default <workdir>/reference_logps) under a hash of
(reference params, model config, tokenized data, tokenizer, template): a later run with
the same inputs reuses them (rlhi/train/reference.py). At the end the policy is exported
to <workdir>/hf (HF format, with the tokenizer).

Loss (rlhi/losses.py, TRL's names and semantics): loss.type is one name or several
joined by commas (sigmoid, ipo, hinge, robust, apo_zero, apo_down, nca_pair, sppo_hard,
bco_pair, sft) with loss.weights the same way; loss.rpo_alpha adds the length-normalised
NLL of the chosen response (RPO).
"""

from configs import common


def get_config(arg=None):
  arg, model = common.parse_model_arg(arg, rewrites=False, rewrites_no_persona=False,
                                      user_rewards=False, live=False, steps=0,
                                      rounds=0)
  if arg.rewrites + arg.rewrites_no_persona + arg.user_rewards > 1:
    raise ValueError("configs/dpo.py: choose one of rewrites, rewrites_no_persona, "
                     "user_rewards")
  config = common.train_config(
      model, steps=arg.steps or 150,
      # smollm2: a released instruct model tuned for a few dozen steps on CPU.
      lr={"tiny": 5e-5, "small": 1e-5, "smollm2": 5e-6}.get(model, 5e-7))
  config.data.with_persona = not arg.rewrites_no_persona
  # Train and eval pairs, relative to data.dir (or absolute); {split} is filled in.
  config.data.pairs = "pairs_rewrites.{split}.jsonl"
  config.data.eval_pairs = "pairs_rewrites.{split}.jsonl"
  config.reference = dict(
      init="",  # '' = model.init (and, for a random init, the same initial params)
      mode="live" if arg.live else "cached",  # cached | live
      cache_dir="",  # '' = <workdir>/reference_logps; share it between runs
  )
  config.loss = dict(
      type="sigmoid",
      weights="",  # '' = 1 per type; else comma-separated floats, one per type
      beta=0.1,
      label_smoothing=0.0,  # cDPO / robust
      rpo_alpha=0.0,
  )
  config.logprob_chunk = 256  # LM head over chunks of this many positions
  config.eval_splits = ("val", "test")  # held-out users; with and without persona
  config.optimizer.warmup_steps = max(1, config.total_steps // 10)
  config.optimizer.weight_decay = 0.0
  # User-Based Rewards (experiments/user_rewards.py): per round, sample
  # `num_samples` answers per training-user prompt from the current policy, score them
  # with the persona-conditioned reward model, keep best vs worst when the score gap
  # exceeds `margin_threshold`, and run `total_steps` DPO steps on those pairs.
  config.user_rewards = dict(
      rounds=arg.rounds or 2,
      # model: the reward model below; follow_up: the FLR baseline, the policy's own
      # log-likelihood of the positive vs the paired negative follow-ups after an
      # answer (rlhi/train/follow_up.py; reward_model unused).
      reward="model",
      follow_ups=dict(
          positive=("Thanks, that's exactly what I needed.",
                    "Perfect, that works for me."),
          negative=("That's not what I asked for.",
                    "This doesn't work for me, try again.")),
      reward_model="",  # a reward_io dir: <train_reward workdir>/reward_model
      # The reward model sees the persona; False: user-agnostic rewards (the paper's
      # baseline).
      with_persona=True,
      reference="initial",  # initial | previous: DPO reference of each round
      prompts_per_round=64 if model in common.CPU_SIZES else 2048,
      num_samples=4, temperature=0.6, top_p=0.9,  # the paper's sampling settings
      max_new_tokens=128 if model in common.CPU_SIZES else 1024,
      margin_threshold=0.1,
      generation_batch_size=32,
      # Another user_rewards workdir: each round takes its answers from that run's same
      # round where it sampled with the same policy, prompts and settings
      # (user_rewards.sampling_key), and samples anew otherwise (logged, and recorded
      # in sampling.json). Ablations that differ only in the reward (persona RM,
      # user-agnostic RM, follow_up) then score the same answers, sampled once.
      samples_from="",
  )
  if arg.user_rewards:
    config.total_steps = arg.steps or 40  # DPO steps per round
    config.optimizer.warmup_steps = max(1, config.total_steps // 10)
    config.checkpoint.every = max(1, config.total_steps // 4)
    config.eval_every = 0
  return config


def get_sweep(hyper):
  """beta x persona, the DPO sweep of the paper's ablations."""
  return hyper.product([
      hyper.sweep("config.loss.beta", [0.05, 0.1, 0.3]),
      hyper.sweep("config.data.with_persona", [True, False]),
  ])
