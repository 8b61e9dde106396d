r"""Data preparation: WildChat rows -> conversations, users and user-level splits, then
follow-up labels, personas and user-guided rewrite pairs through an LLM.

On the bundled sample (offline, seconds):

  python -m experiments.prepare_data --config configs/data_prep.py:sample \
      --workdir /tmp/rlhi/data --stage all

On WildChat-1M from the hub (or a local parquet/JSONL copy):

  python -m experiments.prepare_data --config configs/data_prep.py \
      --config.ingest.source=allenai/WildChat-1M --workdir /data/rlhi --stage all \
      --config.client.base_url=http://127.0.0.1:8000/v1 \
      --config.client.model=meta-llama/Llama-3.1-70B-Instruct

Variants (after the colon, comma-separated):
  sample        the bundled sample; keeps English and Spanish (one sample user writes
                Spanish), uses split fractions suited to 26 users, and the `reference`
                client: hand-written labels, personas and rewrites, no model.
  min_turns=N   drop conversations with fewer than N user turns.
  user_agent    group users by hashed IP and user agent instead of hashed IP alone.
"""

import ml_collections

from configs import common
from rlhi.data import classify
from rlhi.data import client as client_lib
from rlhi.data import wildchat


def get_config(arg=None):
  arg = common.parse_arg(arg, sample=False, min_turns=1, user_agent=False)
  config = ml_collections.ConfigDict()

  config.ingest = ml_collections.ConfigDict(dict(
      source="allenai/WildChat-1M",  # hub id, or a local .parquet/.jsonl file or dir
      hf_split="train",
      streaming=False,
      languages=("English",),  # empty tuple: all languages
      drop_toxic=True,
      drop_redacted=False,
      min_turns=arg.min_turns,
      max_turns=20,
      max_message_chars=32_000,
      user_key=("hashed_ip", "user_agent") if arg.user_agent else ("hashed_ip",),
      split_fractions=dict(train=0.8, val=0.1, test=0.1),
      split_salt="rlhi-v1",
      target_rule="last_k",  # last_k | fraction | after
      num_targets=2,
      target_fraction=0.4,
      targets_after="",  # ISO time, for target_rule=after
  ))

  # The LLM that classifies, writes personas and rewrites: any OpenAI-compatible server
  # (rlhi/data/client/__init__.py documents every field). The key is read from the
  # environment variable named here, never from a file.
  config.client = client_lib.default_config()
  config.client.base_url = "http://127.0.0.1:8000/v1"
  config.client.model = "meta-llama/Llama-3.1-70B-Instruct"
  config.client.api_key_env = ""  # e.g. "OPENAI_API_KEY" for a hosted API

  # An LLM stage whose requests failed or never gave a valid answer for more than this
  # fraction of its items writes what it has, then exits non-zero (prepare_data --stage
  # all stops there). Re-running after fixing the server asks only the failed items.
  config.max_failure_fraction = 0.05

  config.classify = ml_collections.ConfigDict(dict(
      labels=dict(classify.DEFAULT_LABELS),  # name -> description, shown to the LLM
      actionable_labels=classify.DEFAULT_ACTIONABLE,
      context_messages=4,
      max_chars_per_message=2000,
      max_tokens=256,
  ))
  config.persona = ml_collections.ConfigDict(dict(
      max_conversations=20,  # newest K history conversations
      max_chars_per_conversation=3000,
      max_words=200,
      min_history=2,  # fewer history conversations: no persona (counted)
      max_tokens=512,
  ))
  config.rewrites = ml_collections.ConfigDict(dict(
      mode="feedback",  # 'scratch': the rewrites-from-scratch baseline
      with_persona=True,
      rejected="original",  # 'regenerate': the base policy answers (policy_client)
      max_identical_ratio=0.95,
      max_quoted_words=8,
      context_messages=6,
      max_tokens=1024,
      temperature=0.0,
      regenerate_temperature=0.7,
  ))
  # The base policy, for rewrites.rejected='regenerate' (e.g. vLLM serving it).
  config.policy_client = client_lib.default_config()
  config.policy_client.model = "meta-llama/Llama-3.1-8B-Instruct"

  if arg.sample:
    config.ingest.source = wildchat.SAMPLE_ROWS
    config.ingest.languages = ("English", "Spanish")
    config.ingest.split_fractions = dict(train=0.6, val=0.15, test=0.25)
    # Offline: answers hand-written for the sample (labels, personas, rewrites).
    config.client = client_lib.default_config()
    config.client.backend = "reference"
  return config
