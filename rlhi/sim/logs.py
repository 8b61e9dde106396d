"""Interaction logs of simulated users, in the WildChat schema the pipeline ingests.

    prompts = logs.load_prompts()                       # the bundled sample's requests
    result = logs.simulate(users, prompts, client, logs.LogConfig())
    logs.write(out_dir, result)   # sim_rows.jsonl, sim_annotations.jsonl, sim_logs_report

For each user, `conversations_per_user` requests drawn from `prompts` (distinct per
user; users share requests, so that they disagree about the same answers). In each
conversation the base policy (any InferenceClient: `local` with the policy checkpoint,
or a server) answers the request; the user reacts (users.SimUser.react): a complaint
that says what was wrong when the answer misses their preferences, else thanks or a
continuation; the policy answers that follow-up too. The rows carry the user's hashed_ip
(their SimUser.user_id), a timestamp per message (a user's conversations a day apart,
oldest first), turn identifiers, language "English", toxic/redacted False: ingest takes
every row as it is (tests/test_sim_logs.py checks zero rejects).

Annotations for the `reference` backend (sim_annotations.jsonl): each follow-up's true
label ("classify/<hash>/2", as rlhi/data/classify.py keys it) and each user's persona
card ("persona/<user_id>": the oracle persona, used only when the experiment asks for
it; `persona=inferred` runs the pipeline's persona stage through a model instead).
Rewrites are not annotated: a model makes them from the feedback (the rewrites stage).

A request the policy failed to answer drops that conversation, counted by reason in the
report; nothing else is dropped. Never imports jax.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

from rlhi import fileio
from rlhi import reports
from rlhi.data import classify
from rlhi.data import persona as persona_lib
from rlhi.data import wildchat
from rlhi.data.client import ChatRequest
from rlhi.data.client import InferenceClient
from rlhi.sim import users as users_lib

ROWS = "sim_rows.jsonl"
ANNOTATIONS = "sim_annotations.jsonl"
TRUTH = "sim_truth.jsonl"  # per conversation: the reaction's true meaning
MODEL_NAME = "rlhi-sim-policy"


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A user request, with the answer its source gave (candidates.py varies it)."""
  prompt_id: str  # the source conversation's hash
  text: str
  source_answer: str


@dataclasses.dataclass(frozen=True)
class LogConfig:
  conversations_per_user: int = 5
  answer_tokens: int = 256  # the policy's first answer
  follow_up_tokens: int = 128  # its answer to the follow-up
  temperature: float = 0.7
  top_p: float = 0.9
  start: str = "2024-03-01T09:00:00Z"
  seed: int = 0

  @classmethod
  def from_config(cls, cfg) -> "LogConfig":
    return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})


@dataclasses.dataclass
class SimLogs:
  rows: list[dict[str, Any]]
  annotations: list[dict[str, str]]
  truth: list[dict[str, Any]]
  counts: dict[str, Any]


def load_prompts(source: str = wildchat.SAMPLE_ROWS, languages: Sequence[str] = (
    "English",), max_chars: int = 2000) -> list[Prompt]:
  """The first request and answer of each conversation of a WildChat-format JSONL file
  (default: the bundled sample), in the given languages, at most `max_chars` long,
  deduplicated by text."""
  out, seen = [], set()
  for _, _, row, reject in wildchat.iter_rows(source):
    if reject is not None or row is None:
      continue
    conv = row.get("conversation") or []
    if (len(conv) < 2 or row.get("language") not in languages or
        conv[0].get("role") != "user" or conv[1].get("role") != "assistant"):
      continue
    text, answer = str(conv[0].get("content", "")).strip(), str(
        conv[1].get("content", "")).strip()
    if not text or not answer or len(text) > max_chars or text in seen:
      continue
    seen.add(text)
    out.append(Prompt(prompt_id=str(row["conversation_hash"]), text=text,
                      source_answer=answer))
  if not out:
    raise ValueError(f"sim prompts: no usable request in {source} (languages "
                     f"{list(languages)})")
  return out


def conversation_hash(user_id: str, k: int) -> str:
  return hashlib.sha256(f"sim\x1f{user_id}\x1f{k}".encode()).hexdigest()[:32]


def answer_key(conv_hash: str, index: int) -> str:
  return f"sim_answer/{conv_hash}/{index}"


def _message(role: str, content: str, user: users_lib.SimUser, t: dt.datetime,
             turn_id: int) -> dict[str, Any]:
  return {"content": content, "role": role, "timestamp": wildchat._iso(t),  # pylint: disable=protected-access
          "hashed_ip": user.user_id if role == "user" else None, "language": "English",
          "country": None, "state": None, "header": None, "redacted": False,
          "toxic": False, "turn_identifier": turn_id}


def assign_prompts(users: Sequence[users_lib.SimUser], prompts: Sequence[Prompt],
                   cfg: LogConfig) -> dict[str, list[Prompt]]:
  """{user_id: the user's requests, oldest first}: distinct per user, drawn from the
  user's own seed."""
  if cfg.conversations_per_user > len(prompts):
    raise ValueError(f"sim logs: conversations_per_user={cfg.conversations_per_user} "
                     f"> {len(prompts)} prompts available")
  out = {}
  for u in users:
    rng = np.random.default_rng([cfg.seed, u.index, 1])
    idx = rng.choice(len(prompts), size=cfg.conversations_per_user, replace=False)
    out[u.user_id] = [prompts[i] for i in idx]
  return out


def simulate(users: Sequence[users_lib.SimUser], prompts: Sequence[Prompt],
             client: InferenceClient, cfg: LogConfig) -> SimLogs:
  """The conversations of `users` with the policy behind `client` (see the module doc)."""
  start = dt.datetime.fromisoformat(cfg.start.replace("Z", "+00:00"))
  assigned = assign_prompts(users, prompts, cfg)
  convs = [(u, k, p, conversation_hash(u.user_id, k)) for u in users
           for k, p in enumerate(assigned[u.user_id])]

  first = client.chat([ChatRequest(
      key=answer_key(h, 1), messages=({"role": "user", "content": p.text},),
      temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.answer_tokens,
      seed=cfg.seed) for _, _, p, h in convs], desc="sim: policy answers")
  dropped: dict[str, int] = {}

  def drop(reason: str) -> None:
    dropped[reason] = dropped.get(reason, 0) + 1

  reacted = []
  for (u, k, p, h), res in zip(convs, first):
    if res.text is None or not res.text.strip():
      drop("policy_failed" if res.text is None else "policy_empty_answer")
      continue
    rng = np.random.default_rng([cfg.seed, u.index, 2, k])
    reacted.append((u, k, p, h, res.text.strip(), u.react(res.text.strip(), rng)))

  second = client.chat([ChatRequest(
      key=answer_key(h, 3), messages=(
          {"role": "user", "content": p.text}, {"role": "assistant", "content": a},
          {"role": "user", "content": r.text}),
      temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.follow_up_tokens,
      seed=cfg.seed) for u, k, p, h, a, r in reacted], desc="sim: follow-up answers")

  rows, annotations, truth = [], [], []
  for (u, k, p, h, answer, reaction), res in zip(reacted, second):
    if res.text is None or not res.text.strip():
      drop("policy_failed" if res.text is None else "policy_empty_answer")
      continue
    t = start + dt.timedelta(days=k, minutes=u.index)
    turn = int.from_bytes(bytes.fromhex(h[:8]), "big")
    conversation = [
        _message("user", p.text, u, t, turn),
        _message("assistant", answer, u, t + dt.timedelta(seconds=30), turn + 1),
        _message("user", reaction.text, u, t + dt.timedelta(minutes=2), turn + 2),
        _message("assistant", res.text.strip(), u, t + dt.timedelta(minutes=3),
                 turn + 3)]
    rows.append({"conversation_hash": h, "model": MODEL_NAME, "timestamp":
                 wildchat._iso(t), "conversation": conversation, "turn": 2,  # pylint: disable=protected-access
                 "language": "English", "toxic": False, "redacted": False,
                 "hashed_ip": u.user_id, "country": None, "state": None,
                 "header": None, "openai_moderation": [], "detoxify_moderation": []})
    annotations.append({"key": classify.item_key(h, 2), "response": json.dumps({
        "label": reaction.label, "actionable": reaction.actionable,
        "feedback": reaction.feedback,
        "rationale": (f"simulated user: the answer misses their '{reaction.feature}' "
                      f"preference" if reaction.feature else
                      "simulated user: the answer fits their preferences")})})
    truth.append({"conversation_hash": h, "user_id": u.user_id, "prompt_id": p.prompt_id,
                  "reaction": dataclasses.asdict(reaction),
                  "reward_first_answer": u.reward(answer),
                  "reward_follow_up_answer": u.reward(res.text.strip())})
  for u in users:
    annotations.append({"key": persona_lib.item_key(u.user_id),
                        "response": json.dumps(u.card)})
  labels = collections.Counter(t["reaction"]["label"] for t in truth)
  counts = {"users": len(users), "prompts": len(prompts),
            "conversations_asked": len(convs), "conversations": len(rows),
            "dropped": dict(sorted(dropped.items())),
            "follow_up_labels": dict(sorted(labels.items())),
            "complaints_by_feature": dict(sorted(collections.Counter(
                t["reaction"]["feature"] for t in truth
                if t["reaction"]["feature"]).items())),
            "mean_true_reward_first_answer": float(np.mean(
                [t["reward_first_answer"] for t in truth])) if truth else None,
            "policy": client.name}
  return SimLogs(rows, annotations, truth, counts)


def write(out_dir: str, logs: SimLogs) -> None:
  """The rows, the annotations, the truth and sim_logs_report.{json,md} in out_dir."""
  fileio.makedirs(out_dir)
  for name, records in ((ROWS, logs.rows), (ANNOTATIONS, logs.annotations),
                        (TRUTH, logs.truth)):
    with fileio.open(os.path.join(out_dir, name), "w") as f:
      for r in records:
        f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")
  c = logs.counts
  md = ["# Simulated interaction logs", "",
        f"{c['users']} users, {c['conversations']} conversations of "
        f"{c['conversations_asked']} asked (dropped: {c['dropped'] or 'none'}); "
        f"requests drawn from {c['prompts']} prompts; policy: {c['policy']}.", "",
        "| follow-up label | conversations |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in c["follow_up_labels"].items()), "",
        "| complaint about | conversations |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in c["complaints_by_feature"].items()), ""]
  reports.write_report(out_dir, "sim_logs", c, "\n".join(md))

