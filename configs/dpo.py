r"""Persona-conditioned DPO of the policy on user-guided rewrite pairs.

On the demo's data (after data preparation and SFT into /tmp/rlhi_demo):

  python -m experiments.train_dpo --config configs/dpo.py:rewrites \
      --config.model.init=/tmp/rlhi_demo/sft/hf --workdir /tmp/rlhi_demo/dpo

On a TPU slice, from the SFT policy (same command on every worker; tpu/README.md):

  python -m experiments.train_dpo --config configs/dpo.py:rewrites,llama3_8b \
      --config.model.init=gs://bucket/rlhi/sft/hf \
      --config.data.dir=gs://bucket/rlhi/data --workdir gs://bucket/rlhi/dpo

Variants:
  rewrites             (default) pairs from user-guided rewrites, persona in the prompt
  rewrites_no_persona  the same pairs without the persona (the ablation)
  live                 reference log-probs computed every step instead of cached
  a model size         tiny | small | llama3_1b | llama3_8b | llama3_70b | qwen2_7b
  steps=N

The policy starts from `model.init` (an HF dir: the SFT export, a released model, or
'' for a random init of the named size); the reference model is `reference.init`, by
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
                                      live=False, steps=0)
  if arg.rewrites and arg.rewrites_no_persona:
    raise ValueError("configs/dpo.py: choose one of rewrites, rewrites_no_persona")
  config = common.train_config(
      model, steps=arg.steps or 150,
      lr=5e-5 if model == "tiny" else 1e-5 if model == "small" else 5e-7)
  config.data.with_persona = not arg.rewrites_no_persona
  config.data.pairs = "pairs_rewrites.{split}.jsonl"  # under data.dir
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
  return config


def get_sweep(hyper):
  """beta x persona, the DPO sweep of the paper's ablations."""
  return hyper.product([
      hyper.sweep("config.loss.beta", [0.05, 0.1, 0.3]),
      hyper.sweep("config.data.with_persona", [True, False]),
  ])
