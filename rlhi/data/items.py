"""UserEval items: the target turns of held-out (test) users, with their personas.

An item is one user message of a test user's *target* conversation (the later ones;
history conversations only ever fed the persona), with:

  context     the conversation up to and including that user message
  turn_type   'initial' (the first user message of the conversation) or 'follow_up'
  original    the WildChat assistant answer that followed it (a possible system)
  persona     Persona.to_text() of the user, inferred from history only

Every test user and turn is accounted for: kept, or skipped with a reason (no persona,
caps) that the report counts. A history conversation in an item, or a target conversation
among a persona's sources, is a data leak and raises.

The data layer builds them (jax-free) so that both evaluation (UserEval) and
training (user-based rewards' prompts, from training users) can read them.
This module never imports jax.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

from rlhi.data import files
from rlhi.data import schema

TURN_TYPES = ("initial", "follow_up")


@dataclasses.dataclass(frozen=True)
class EvalItem:
  item_id: str  # '<conversation_hash>/<message_index>'
  user_id: str
  conversation_hash: str
  message_index: int  # index of the user message in Conversation.messages
  turn_type: str  # 'initial' | 'follow_up'
  context: tuple[schema.Message, ...]  # messages[:message_index + 1]
  original: str | None  # the WildChat answer after it (None if the conversation ends)
  persona: str | None  # Persona.to_text(), or None

  def chat(self) -> list[dict[str, str]]:
    return [m.to_chat() for m in self.context]


@dataclasses.dataclass
class ItemSet:
  items: list[EvalItem]
  counts: dict[str, Any]  # users, turns available / kept / skipped by reason


def load_items(data_dir: str, *, max_items: int = 0, max_turns_per_user: int = 0,
               require_persona: bool = True, split: str = "test") -> ItemSet:
  """Reads the data-prep workdir and builds the UserEval items of `split`'s users.

  Args:
    data_dir: the data-preparation workdir (conversations.jsonl, users.jsonl,
      personas.jsonl).
    max_items: at most this many items in all (0: no cap). Taken round-robin over users
      (each user's turns oldest first), so a cap keeps as many users as it can.
    max_turns_per_user: at most this many items per user, oldest first (0: no cap).
    require_persona: skip users without a persona (counted); False keeps them with
      persona None.
    split: the users' split; UserEval uses 'test' (held-out users).
  """
  if split not in schema.SPLITS:
    raise ValueError(f"usereval: split {split!r} is not one of {schema.SPLITS}")
  paths = {name: files.input_path(data_dir, name) for name in
           (files.CONVERSATIONS, files.USERS, files.PERSONAS)}
  conversations = {c.conversation_hash: c for c in schema.read_jsonl(
      paths[files.CONVERSATIONS], schema.Conversation)}
  users = [u for u in schema.read_jsonl(paths[files.USERS], schema.User)
           if u.split == split]
  personas = {p.user_id: p for p in schema.read_jsonl(paths[files.PERSONAS],
                                                      schema.Persona)}

  skipped: collections.Counter[str] = collections.Counter()
  per_user: list[list[EvalItem]] = []
  users_without_persona = 0
  for user in sorted(users, key=lambda u: u.user_id):
    persona = personas.get(user.user_id)
    _check_no_leak(user, persona, paths[files.PERSONAS])
    turns = []
    for h in user.targets:
      conv = conversations.get(h)
      if conv is None:
        raise ValueError(f"{paths[files.USERS]}: user {user.user_id} lists target "
                         f"conversation {h} that is not in "
                         f"{paths[files.CONVERSATIONS]}; re-run the ingest stage")
      turns.extend(_turns(conv, persona))
    if persona is None:
      users_without_persona += 1
      if require_persona:
        skipped["user_without_persona"] += len(turns)
        continue
    if max_turns_per_user and len(turns) > max_turns_per_user:
      skipped["max_turns_per_user"] += len(turns) - max_turns_per_user
      turns = turns[:max_turns_per_user]
    per_user.append(turns)

  items = _round_robin(per_user)
  if max_items and len(items) > max_items:
    skipped["max_items"] += len(items) - max_items
    items = items[:max_items]
  by_id = {u.user_id: u for u in users}
  for item in items:  # Belt and braces: the check the design asks for, per item.
    user = by_id[item.user_id]
    h = item.conversation_hash
    if h in user.history or h not in user.targets:
      raise AssertionError(f"usereval item {item.item_id} is not from a target "
                           f"conversation of user {item.user_id}")
  available = sum(len(t) for t in per_user) + skipped["user_without_persona"] + skipped[
      "max_turns_per_user"]
  counts = {
      "split": split,
      "users": len(users),
      "users_without_persona": users_without_persona,
      "users_with_items": len({i.user_id for i in items}),
      "turns_available": available,
      "items": len(items),
      "items_by_turn_type": {t: sum(i.turn_type == t for i in items) for t in TURN_TYPES},
      "skipped": dict(sorted(skipped.items())),
  }
  return ItemSet(items, counts)


def _turns(conv: schema.Conversation, persona: schema.Persona | None) -> list[EvalItem]:
  out = []
  user_turns = conv.user_turn_indices()
  for i in user_turns:
    nxt = conv.messages[i + 1] if i + 1 < len(conv.messages) else None
    out.append(EvalItem(
        item_id=f"{conv.conversation_hash}/{i}", user_id=conv.user_id,
        conversation_hash=conv.conversation_hash, message_index=i,
        turn_type="initial" if i == user_turns[0] else "follow_up",
        context=tuple(conv.messages[:i + 1]),
        original=nxt.content if nxt is not None and nxt.role == "assistant" else None,
        persona=persona.to_text() if persona is not None else None))
  return out


def _round_robin(per_user: Sequence[Sequence[EvalItem]]) -> list[EvalItem]:
  out = []
  for k in range(max((len(t) for t in per_user), default=0)):
    out.extend(t[k] for t in per_user if k < len(t))
  return out


def _check_no_leak(user: schema.User, persona: schema.Persona | None,
                   personas_path: str) -> None:
  overlap = set(user.history) & set(user.targets)
  if overlap:
    raise ValueError(f"users.jsonl: user {user.user_id} has conversation(s) "
                     f"{sorted(overlap)} in both history and targets")
  if persona is not None:
    leaked = set(persona.source_conversations) & set(user.targets)
    if leaked:
      raise ValueError(f"{personas_path}: the persona of user {user.user_id} was "
                       f"inferred from target conversation(s) {sorted(leaked)}; personas "
                       f"may use history only (re-run the persona stage)")


def to_record(item: EvalItem) -> dict[str, Any]:
  return dataclasses.asdict(item)
