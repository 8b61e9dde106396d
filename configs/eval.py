r"""Evaluation: WildChat UserEval (two systems, a judge) and reward-model accuracy.

UserEval of a DPO policy with persona-guided inference against the original WildChat
answers, judged by an LLM on any OpenAI-compatible server (docs/eval.md):

  python -m experiments.evaluate --config configs/eval.py:ckpt=/tmp/rlhi_demo/dpo/hf \
      --workdir /tmp/rlhi_demo/eval --config.data.dir=/tmp/rlhi_demo/data \
      --config.judge.client.base_url=http://127.0.0.1:8000/v1 \
      --config.judge.client.model=meta-llama/Llama-3.1-70B-Instruct

Offline, with the persona-conditioned reward model as the judge (it judges 'overall'
only), comparing the same checkpoint with and without persona-guided inference, plus
the reward model's accuracy on held-out pairs:

  python -m experiments.evaluate \
      --config configs/eval.py:judge=reward_model,a=checkpoint,ckpt=/tmp/rlhi_demo/dpo/hf,rm=/tmp/rlhi_demo/reward/reward_model \
      --workdir /tmp/rlhi_demo/eval_rm --config.data.dir=/tmp/rlhi_demo/data

Only the reward model's accuracy:

  python -m experiments.evaluate --config configs/eval.py:rm_only,rm=/tmp/rlhi_demo/reward/reward_model \
      --workdir /tmp/rlhi_demo/eval_rm --config.data.dir=/tmp/rlhi_demo/data

On simulated users (experiments/simulate.py, docs/sim.md), with their true rewards as
the judge:

  python -m experiments.evaluate \
      --config configs/eval.py:judge=ground_truth,ckpt=/tmp/rlhi_sim/dpo/hf \
      --workdir /tmp/rlhi_sim/eval --config.data.dir=/tmp/rlhi_sim/data \
      --config.judge.ground_truth.users=/tmp/rlhi_sim/data/sim_users.jsonl

Variants (after the colon, comma-separated):
  judge=llm|reward_model|ground_truth
                           the judge (default llm). ground_truth: the simulated users'
                           true rewards (rlhi/sim experiments only; it judges 'overall'
                           only); set --config.judge.ground_truth.users to the users
                           file experiments/simulate.py wrote
                           (<workdir>/data/sim_users.jsonl).
  a=KIND, b=KIND           system kinds: original | checkpoint | answers (default a =
                           original, b = checkpoint).
  ckpt=DIR                 the HF checkpoint of every `checkpoint` system.
  rm=DIR                   the reward model (reward_io directory: <train_reward
                           workdir>/reward_model): the reward_model judge's, and turns on
                           reward_eval.
  no_persona               the ablation: no checkpoint system gets the persona, and the
                           reward-model judge scores without it (every with_persona
                           below False). Otherwise a checkpoint system B gets the
                           persona (persona-guided inference); with a=checkpoint, A is
                           the same model without it.
  max_items=N              at most N items (default 0: all target turns of test users).
  rm_only                  skip UserEval; only the reward model's accuracy.
  quick                    a smoke run: 8 items, 64 new tokens, 200 bootstrap samples.

Every field below can be overridden with a dotted flag, e.g.
--config.systems.b.with_persona=false or
--config.judge.client.api_key_env=OPENAI_API_KEY.
"""

import ml_collections

from configs import common
from rlhi.data import client as client_lib
from rlhi.data import schema


def get_config(arg=None):
  arg = common.parse_arg(arg, judge="llm", a="original", b="checkpoint", ckpt="",
                         rm="", no_persona=False, max_items=0, rm_only=False,
                         quick=False)
  if arg.judge not in ("llm", "reward_model", "ground_truth"):
    raise ValueError(f"config arg 'judge': expected llm or reward_model (or "
                     f"ground_truth, for simulated users), got '{arg.judge}'")
  config = ml_collections.ConfigDict()
  config.seed = 0  # the bootstrap's seed
  config.data = ml_collections.ConfigDict(dict(
      dir="/tmp/rlhi_demo/data",  # the data-prep workdir
      split="test",  # held-out users
  ))
  config.usereval_enabled = not arg.rm_only

  # ---- Items -------------------------------------------------------------------------
  config.max_items = 8 if arg.quick and not arg.max_items else arg.max_items  # 0: all
  config.max_turns_per_user = 0  # 0: all target turns of a user
  config.require_persona = True  # users without a persona are skipped (counted)

  # ---- Systems -----------------------------------------------------------------------
  # kind: original (the WildChat answer) | checkpoint (HF dir, rlhi's sampler) |
  # answers (JSONL of {item_id, text}). with_persona: persona-guided inference
  # (checkpoint).
  def system(kind, with_persona):
    return ml_collections.ConfigDict(dict(
        kind=kind, path=arg.ckpt if kind == "checkpoint" else "",
        with_persona=with_persona and kind == "checkpoint" and not arg.no_persona,
        tokenizer="",  # '' = the checkpoint's own
        name="",  # label in the report; '' = from kind, path and with_persona
    ))
  config.systems = ml_collections.ConfigDict(dict(
      a=system(arg.a, with_persona=False), b=system(arg.b, with_persona=True)))
  # How the persona enters the system slot: the template training used
  # (configs/common.py data.system_template).
  config.system_template = schema.PERSONA_TEMPLATE
  config.generation = ml_collections.ConfigDict(dict(
      max_new_tokens=64 if arg.quick else 512,
      temperature=0.0,  # greedy: deterministic answers
      top_p=1.0,
      seed=0,
      batch_size=8,
      max_prompt_tokens=0,  # 0: the model's max_position_embeddings - max_new_tokens
  ))
  # Other UserEval runs (their workdirs, or usereval_generations.jsonl files) whose
  # answers are reused where a system's fingerprint (checkpoint, weights, persona,
  # generation settings) matches: a system compared several times is generated once.
  # Single-process runs only (multi-host runs regenerate).
  config.reuse_answers_from = ()
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  # ---- Judge -------------------------------------------------------------------------
  client = client_lib.default_config()
  client.base_url = "http://127.0.0.1:8000/v1"
  client.model = "meta-llama/Llama-3.1-70B-Instruct"
  client.api_key_env = ""  # e.g. "OPENAI_API_KEY" for a hosted API
  config.judge = ml_collections.ConfigDict(dict(
      kind=arg.judge,
      client=client,  # the LLM judge (rlhi/data/client/ documents every field)
      dimensions=("personalization", "instruction_following", "overall"),
      max_tokens=512,
      temperature=0.0,
      max_context_messages=12,  # older messages of a long conversation are omitted
      max_chars_per_message=4000,
      max_answer_chars=8000,  # the same cap for both systems' answers
      reward_model=ml_collections.ConfigDict(dict(
          path=arg.rm,  # reward_io directory: <train_reward workdir>/reward_model
          tokenizer="",  # '' = the one saved with it
          system_template="",  # '' = the one it was trained with
          with_persona=not arg.no_persona,
          batch_size=8,
          max_length=2048,
          max_response_length=1024,
          bucket_lengths=(512, 1024, 2048),
      )),
      # The simulated users' true rewards (rlhi/sim experiments only).
      ground_truth=ml_collections.ConfigDict(dict(
          # the simulated users file: experiments/simulate.py writes
          # <workdir>/data/sim_users.jsonl
          users="",
      )),
  ))
  config.n_boot = 200 if arg.quick else 1000
  # More failed answers (per system) or judgements than this fraction: the report is
  # written, then the run exits non-zero.
  config.max_failure_fraction = 0.05

  # ---- Reward-model accuracy on held-out pairs -----------------------------------------
  config.reward_eval = ml_collections.ConfigDict(dict(
      enabled=bool(arg.rm) or arg.rm_only,
      path=arg.rm,
      splits=("val", "test"),
      batch_size=8,
      max_length=2048,
      max_response_length=1024,
      bucket_lengths=(512, 1024, 2048),
      system_template="",  # '' = the one it was trained with
      tokenizer="",
  ))
  return config
