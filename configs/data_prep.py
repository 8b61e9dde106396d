r"""Data preparation: WildChat rows -> conversations, users and user-level splits.

On the bundled sample (offline, seconds):

  python -m experiments.prepare_data --config configs/data_prep.py:sample \
      --workdir /tmp/rlhi/data --stage ingest

On WildChat-1M from the hub (or a local parquet/JSONL copy):

  python -m experiments.prepare_data --config configs/data_prep.py \
      --config.ingest.source=allenai/WildChat-1M --workdir gs://.../data --stage ingest

Variants (after the colon, comma-separated):
  sample        the bundled sample; keeps English and Spanish (one sample user writes
                Spanish) and uses split fractions suited to 26 users.
  min_turns=N   drop conversations with fewer than N user turns.
  user_agent    group users by hashed IP and user agent instead of hashed IP alone.
"""

import ml_collections

from configs import common
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
      min_history=2,
  ))

  if arg.sample:
    config.ingest.source = wildchat.SAMPLE_ROWS
    config.ingest.languages = ("English", "Spanish")
    config.ingest.split_fractions = dict(train=0.6, val=0.15, test=0.25)
  return config
