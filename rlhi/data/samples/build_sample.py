r"""Builds the bundled sample from the hand-written sources in `source/`.

    python -m rlhi.data.samples.build_sample

Writes, next to this file:
  wildchat_sample.jsonl         rows in the exact WildChat-1M schema (what ingest reads)
  reference_annotations.jsonl   hand-written answers for the `reference` inference
                                backend: one per follow-up (classification), per user
                                (persona card) and per actionable follow-up (rewrite)
  malformed_rows.jsonl          deliberately broken rows for the error-path tests

The conversations, labels, personas and rewrites are written by hand in
`source/users_*.json`; this script only adds what WildChat's logging would have added
(hashed IPs, timestamps, hashes, moderation fields) deterministically, so the outputs are
byte-identical on every run. Annotation keys (see `reference_key`) are what the data
stages send as `ChatRequest.key`.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import os
import random
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
START = dt.datetime(2023, 4, 10, tzinfo=dt.timezone.utc)

_OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "self-harm",
    "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
    "violence/graphic")
_DETOXIFY = ("identity_attack", "insult", "obscene", "severe_toxicity",
             "sexual_explicit", "threat", "toxicity")


def reference_key(task: str, *parts: Any) -> str:
  """The request key of a data-stage item: 'classify/<hash>/<index>', 'persona/<user>'."""
  return "/".join([task, *map(str, parts)])


def hashed_ip(user_id: str) -> str:
  return hashlib.sha256(f"rlhi-sample-ip:{user_id}".encode()).hexdigest()


def _iso(t: dt.datetime) -> str:
  return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _moderation(rng: random.Random, toxic: bool) -> tuple[dict, dict]:
  scores = {c: round(rng.uniform(1e-6, 2e-3), 7) for c in _OPENAI_CATEGORIES}
  flags = {c: False for c in _OPENAI_CATEGORIES}
  detox = {c: round(rng.uniform(1e-4, 2e-3), 7) for c in _DETOXIFY}
  if toxic:
    scores["harassment"], flags["harassment"] = 0.91, True
    detox["insult"], detox["toxicity"] = 0.87, 0.93
  return ({"categories": flags, "category_scores": scores, "flagged": toxic}, detox)


def make_row(user: dict[str, Any], user_index: int, conv: dict[str, Any],
             language: str | None = None, toxic: bool = False) -> dict[str, Any]:
  """One WildChat-1M row for a hand-written conversation of a hand-written user."""
  language = language or user["language"]
  ip = hashed_ip(user["id"])
  header = {"accept-language": user["accept_language"], "user-agent": user["user_agent"]}
  t = START + dt.timedelta(days=conv["day"], hours=conv["hour"],
                           minutes=(7 * user_index) % 60)
  rng = random.Random(f"{user['id']}/{conv['day']}/{conv['hour']}")
  messages, openai_mod, detox_mod = [], [], []
  for i, m in enumerate(conv["messages"]):
    t = t + dt.timedelta(seconds=40 + 11 * len(m["content"]) // 50 + (i % 3))
    is_user = m["role"] == "user"
    messages.append({
        "content": m["content"],
        "country": user["country"] if is_user else None,
        "hashed_ip": ip if is_user else None,
        "header": header if is_user else None,
        "language": language,
        "redacted": False,
        "role": m["role"],
        "state": user["state"] if is_user else None,
        "timestamp": _iso(t),
        "toxic": toxic and is_user,
        "turn_identifier": rng.randrange(100_000, 10_000_000),
    })
    mod = _moderation(rng, toxic and is_user)
    openai_mod.append(mod[0])
    detox_mod.append(mod[1])
  body = json.dumps([[m["role"], m["content"]] for m in conv["messages"]],
                    ensure_ascii=False)
  return {
      "conversation_hash": hashlib.md5(body.encode()).hexdigest(),
      "model": conv["model"],
      "timestamp": messages[0]["timestamp"],
      "conversation": messages,
      "turn": sum(m["role"] == "user" for m in conv["messages"]),
      "language": language,
      "openai_moderation": openai_mod,
      "detoxify_moderation": detox_mod,
      "toxic": toxic,
      "redacted": False,
      "state": user["state"],
      "country": user["country"],
      "hashed_ip": ip,
      "header": header,
  }


def load_users() -> list[dict[str, Any]]:
  users = []
  for path in sorted(glob.glob(os.path.join(HERE, "source", "users_*.json"))):
    with open(path, encoding="utf-8") as f:
      users.extend(json.load(f)["users"])
  return sorted(users, key=lambda u: u["id"])


def annotations(user: dict[str, Any], conv: dict[str, Any], row: dict[str, Any]
                ) -> list[dict[str, str]]:
  out = []
  for i, m in enumerate(conv["messages"]):
    a = m.get("annotation")
    if a is None:
      continue
    cls = {k: a[k] for k in ("label", "actionable", "feedback", "rationale")}
    out.append({"key": reference_key("classify", row["conversation_hash"], i),
                "response": json.dumps(cls, ensure_ascii=False)})
    if a.get("rewrite"):
      out.append({"key": reference_key("rewrite", row["conversation_hash"], i),
                  "response": a["rewrite"]})
  return out


# Rows that the filters must remove: hand-written, attached to sample users.
_FILTERED = [
    # (user id, language, toxic, duplicate-of-first-conversation, conversation)
    ("u10", "Russian", False, False, {
        "model": "gpt-3.5-turbo-0613", "day": 61, "hour": 9, "messages": [
            {"role": "user", "content": "Привет! Как сказать по-английски "
                                        "«груз задерживается на таможне»?"},
            {"role": "assistant", "content": "«The shipment is held up at customs» "
                                             "или «The cargo is delayed at customs»."}]}),
    ("u06", "German", False, False, {
        "model": "gpt-4-0314", "day": 62, "hour": 22, "messages": [
            {"role": "user", "content": "Kurze Frage: Was ist der Unterschied zwischen "
                                        "Transkriptom und Proteom?"},
            {"role": "assistant", "content": "Das Transkriptom umfasst alle RNA-"
                                             "Transkripte einer Zelle, das Proteom alle "
                                             "Proteine, die tatsächlich gebildet werden."}]}),
    ("u22", "English", True, False, {
        "model": "gpt-3.5-turbo-0301", "day": 63, "hour": 2, "messages": [
            {"role": "user", "content": "ur the dumbest bot ever, write me an insult "
                                        "about my coworker so i can post it"},
            {"role": "assistant", "content": "I can't help write insults about a real "
                                             "person, but I can help you word a "
                                             "complaint about a work problem."}]}),
    ("u01", "English", False, True, None),  # an exact copy of u01's first conversation
    ("u19", "English", False, False, {
        "model": "gpt-3.5-turbo-0613", "day": 64, "hour": 11, "messages": [
            {"role": "user", "content": "how do i freeze the top row in excel"},
            {"role": "assistant", "content": "   "}]}),
    ("u12", "English", False, False, {
        "model": "gpt-4-0613", "day": 65, "hour": 20, "messages": [
            {"role": "user", "content": "give me 3 tavern names for a port town"},
            {"role": "assistant", "content": "The Salted Anchor, The Drowned Lantern, "
                                             "The Gull & Gallows."},
            {"role": "user", "content": "more nautical pls"}]}),
]


def filtered_rows(users: dict[str, dict[str, Any]], index: dict[str, int]
                  ) -> list[dict[str, Any]]:
  rows = []
  for uid, language, toxic, duplicate, conv in _FILTERED:
    if uid not in users:
      raise KeyError(f"source/: user {uid} (used by a filtered row) is missing")
    user = users[uid]
    if duplicate:
      rows.append(make_row(user, index[uid], user["conversations"][0]))
    else:
      rows.append(make_row(user, index[uid], conv, language=language, toxic=toxic))
  return rows


def malformed_lines(good: list[dict[str, Any]]) -> list[bytes]:
  """Broken rows, each with the reason ingest must give it (see the tests)."""
  def row(**changes):
    r = json.loads(json.dumps(good[0]))
    r["conversation_hash"] = hashlib.md5(json.dumps(changes).encode()).hexdigest()
    r.update(changes)
    return r

  base = good[0]["conversation"]
  user_msg, asst_msg = base[0], base[1]
  no_role = {k: v for k, v in user_msg.items() if k != "role"}
  lines = [
      json.dumps(good[0]).encode(),  # valid: must be kept
      b'{"conversation_hash": "0badjs0n", "model": "gpt-4", "conversation": [',
      b'{"conversation_hash": "bad-utf8", "model": "gpt-4", "content": "\xff\xfe caf\xe9"}',
      json.dumps(row(conversation=[no_role, asst_msg])).encode(),
      json.dumps(row(conversation="hello there")).encode(),
      json.dumps(row(conversation=[{**user_msg, "content": 42}, asst_msg])).encode(),
      json.dumps(row(toxic="no")).encode(),
      json.dumps(row(conversation=[{**user_msg, "content": " \n\t "}, asst_msg])).encode(),
      json.dumps(row(conversation=[user_msg, user_msg, asst_msg])).encode(),
      json.dumps(row(conversation=[{**user_msg, "content": "x" * 2_000_000},
                                   asst_msg])).encode(),
      json.dumps({k: v for k, v in good[1].items()
                  if k != "conversation_hash"}).encode(),
      b'["not", "an", "object"]',
      json.dumps(row(conversation=[{**user_msg, "role": "bot"}, asst_msg])).encode(),
      json.dumps(row(timestamp="yesterday")).encode(),
      json.dumps(good[1]).encode(),  # valid: must be kept
  ]
  return lines


def main(out_dir: str = HERE) -> None:
  users = load_users()
  by_id = {u["id"]: u for u in users}
  index = {u["id"]: i for i, u in enumerate(users)}
  rows, refs = [], []
  for i, user in enumerate(users):
    for conv in user["conversations"]:
      row = make_row(user, i, conv)
      rows.append(row)
      refs.extend(annotations(user, conv, row))
    if user.get("persona"):
      refs.append({"key": reference_key("persona", hashed_ip(user["id"])),
                   "response": json.dumps(user["persona"], ensure_ascii=False)})
  good = rows[:2]
  rows.extend(filtered_rows(by_id, index))
  # WildChat is ordered by time, not by user.
  rows.sort(key=lambda r: (r["timestamp"], r["conversation_hash"]))

  def write(name: str, lines: list[bytes]) -> None:
    with open(os.path.join(out_dir, name), "wb") as f:
      f.write(b"".join(line + b"\n" for line in lines))

  write("wildchat_sample.jsonl",
        [json.dumps(r, ensure_ascii=False).encode() for r in rows])
  write("reference_annotations.jsonl",
        [json.dumps(r, ensure_ascii=False, sort_keys=True).encode()
         for r in sorted(refs, key=lambda r: r["key"])])
  write("malformed_rows.jsonl", malformed_lines(good))
  print(f"{len(rows)} rows, {len(refs)} reference annotations, {len(users)} users")


if __name__ == "__main__":
  main()
