"""The file names of a data-prep work directory, and where to find them.

    ingest    conversations.jsonl, users.jsonl, splits.json
    classify  follow_ups.jsonl
    persona   personas.jsonl
    rewrites  pairs_rewrites.<split>.jsonl and pairs_rewrites_hf/ (an HF DatasetDict)

plus each stage's `<stage>_rejects.jsonl` and `<stage>_report.json` / `.md`, and the LLM
stages' request cache llm_cache.sqlite. The stages (rlhi/data/pipeline.py) write them;
the trainers and evaluations read them with `input_path`, whose error names the command
that makes a missing file. Never imports jax.
"""

from __future__ import annotations

import os

from rlhi import fileio

CONVERSATIONS = "conversations.jsonl"
USERS = "users.jsonl"
SPLITS = "splits.json"
FOLLOW_UPS = "follow_ups.jsonl"
PERSONAS = "personas.jsonl"
PAIRS = "pairs_rewrites.{split}.jsonl"
PAIRS_HF = "pairs_rewrites_hf"
LLM_CACHE = "llm_cache.sqlite"
REJECTS = "{stage}_rejects.jsonl"


class MissingInputError(FileNotFoundError):
  """A file that an earlier stage makes is not there; the message says how to make it."""


def _making_stage(name: str) -> str | None:
  if name in (CONVERSATIONS, USERS, SPLITS):
    return "ingest"
  if name == FOLLOW_UPS:
    return "classify"
  if name == PERSONAS:
    return "persona"
  if name.startswith(PAIRS.split("{")[0]) or name == PAIRS_HF:
    return "rewrites"
  return None


def input_path(data_dir: str, name: str, *, field: str = "config.data.dir") -> str:
  """`data_dir/name`, or MissingInputError naming the command that makes it.

  `field` is the config field (or flag) that set data_dir, for the error message.
  """
  path = os.path.join(data_dir, name)
  if fileio.exists(path):
    return path
  stage = _making_stage(os.path.basename(name))
  how = (f"make it with `python -m experiments.prepare_data --config "
         f"configs/data_prep.py:sample --workdir {data_dir} --stage {stage}` (or "
         f"--stage all; use your own data-prep config for real data), or "
         if stage else "")
  raise MissingInputError(f"{path} not found: {how}point {field} at a data-prep "
                          f"directory that holds {name}")
