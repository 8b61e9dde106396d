"""Persona inference: a persona card per user from their HISTORY conversations only.

The prompt holds the user's newest `max_conversations` history conversations, newest
first, each cut to `max_chars_per_conversation`; target conversations never enter it
(they are what the persona is later used to predict). The card is validated, scrubbed
of personal identifiers (e-mail addresses, phone numbers, URLs with personal paths, and
names the user gave in their own messages) and capped at `max_words` words. Users with
fewer than `min_history` history conversations get no persona and are counted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

from rlhi.data import prompting
from rlhi.data.client import InferenceClient
from rlhi.data.schema import Conversation, Persona, User


@dataclasses.dataclass(frozen=True)
class PersonaConfig:
  max_conversations: int = 20  # newest K history conversations
  max_chars_per_conversation: int = 3000
  max_words: int = 200
  min_history: int = 2
  max_tokens: int = 512

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "PersonaConfig":
    return cls(**dict(cfg))


def item_key(user_id: str) -> str:
  return f"persona/{user_id}"


# ----------------------------------------------------------------------------------------
# PII scrubbing.
# ----------------------------------------------------------------------------------------

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# International or local numbers with at least 7 digits, allowing spaces, dots, dashes
# and brackets; years and small counts do not match.
_PHONE = re.compile(r"(?<![\w])(?:\+?\d[\d\s().-]{5,}\d)(?![\w])")
# A URL whose path names a person or account: profiles, user pages, personal sites.
_PERSONAL_URL = re.compile(
    r"(?:https?://)?(?:www\.)?[\w.-]+\.[a-z]{2,}/(?:in|pub|u|user|users|profile|"
    r"people|~)[/\w.~%-]*|(?:https?://)?(?:www\.)?(?:github|gitlab|twitter|x|instagram|"
    r"facebook|linkedin|medium|tiktok)\.com/@?[\w.-]+[/\w.~%-]*", re.IGNORECASE)
_NAME_INTRO = re.compile(
    r"\b(?i:my name is|my name's|call me|i am called|i'm called|me llamo|mi nombre es)"
    r"\s+([A-ZÁÉÍÓÚÑ][a-záéíóúñ]+(?:\s+[A-ZÁÉÍÓÚÑ][a-záéíóúñ]+)?)")
_SIGN_OFF = re.compile(
    r"(?:^|\n)\s*(?:thanks|thank you|regards|best|best regards|kind regards|cheers|"
    r"sincerely|saludos|gracias)\s*[,!.]?\s*\n\s*[-–]?\s*([A-Z][a-z]+(?:\s+[A-Z][a-z]+)?)"
    r"\s*$", re.IGNORECASE)
_NOT_NAMES = {"Thanks", "Regards", "Best", "Cheers", "Sincerely", "Here", "The", "This",
              "That", "Hi", "Hello", "Just", "Me", "It", "Not", "Still", "Now"}


def names_given(messages: Iterable[str]) -> set[str]:
  """Names a user gave for themselves ('my name is Ana', a sign-off line)."""
  names = set()
  for text in messages:
    for m in _NAME_INTRO.finditer(text):
      names.add(m.group(1))
    m = _SIGN_OFF.search(text.strip())
    if m:
      names.add(m.group(1))
  out = set()
  for name in names:
    out |= {part for part in name.split() if part not in _NOT_NAMES and len(part) > 1}
  return out


def scrub(text: str, names: Iterable[str] = ()) -> str:
  """Replaces identifiers with placeholders: [email], [phone], [url], [name]."""
  text = _EMAIL.sub("[email]", text)
  text = _PERSONAL_URL.sub("[url]", text)
  text = _PHONE.sub(lambda m: "[phone]" if sum(c.isdigit() for c in m.group()) >= 7
                    else m.group(), text)
  for name in sorted(names, key=len, reverse=True):
    text = re.sub(rf"\b{re.escape(name)}\b", "[name]", text)
  return text


# ----------------------------------------------------------------------------------------
# The card.
# ----------------------------------------------------------------------------------------


def _words(card: dict[str, Any]) -> int:
  return sum(len(str(v).split()) if isinstance(v, str) else
             sum(len(x.split()) for x in v) for v in card.values())


def cap_words(card: dict[str, Any], max_words: int) -> dict[str, Any]:
  """Drops list items from the end of the longest list, then cuts the summary."""
  card = {k: (list(v) if isinstance(v, list) else v) for k, v in card.items()}
  lists = ("preferences", "recurring_topics", "dislikes")
  while _words(card) > max_words and any(card[k] for k in lists):
    longest = max(lists, key=lambda k: (len(card[k]), k))
    card[longest].pop()
  if _words(card) > max_words:
    over = _words(card) - max_words
    card["expertise"] = " ".join(card["expertise"].split()[:max(
        0, len(card["expertise"].split()) - over)])
  if _words(card) > max_words:
    over = _words(card) - max_words
    words = card["summary"].split()
    card["summary"] = " ".join(words[:max(1, len(words) - over)])
  return card


CARD_SCHEMA = prompting.object_schema({
    "summary": prompting.STRING, "preferences": prompting.STRINGS,
    "expertise": prompting.STRING, "recurring_topics": prompting.STRINGS,
    "dislikes": prompting.STRINGS})


def validate_card(obj: dict[str, Any]) -> dict[str, Any]:
  card = dict(summary=prompting.require(obj, "summary", str, non_empty=True).strip(),
              preferences=prompting.require(obj, "preferences", list),
              expertise=prompting.require(obj, "expertise", str).strip(),
              recurring_topics=prompting.require(obj, "recurring_topics", list),
              dislikes=prompting.require(obj, "dislikes", list))
  extra = sorted(set(obj) - set(card))
  if extra:
    raise ValueError(f"unknown field(s) {extra}; expected {sorted(card)}")
  return card


def history_of(user: User, conv_by_hash: Mapping[str, Conversation],
               cfg: PersonaConfig) -> list[Conversation]:
  """The newest K history conversations, newest first. Never a target."""
  hashes = list(user.history)[-cfg.max_conversations:][::-1]
  return [conv_by_hash[h] for h in hashes]


def prompt_for(history: Sequence[Conversation], cfg: PersonaConfig) -> str:
  convs = []
  for c in history:
    budget, messages = cfg.max_chars_per_conversation, []
    for m in c.messages:
      if budget <= 0:
        break
      content = m.content if len(m.content) <= budget else m.content[:budget] + " [...]"
      budget -= len(content)
      messages.append({"role": m.role, "content": content})
    convs.append({"date": c.timestamp[:10], "messages": messages})
  return prompting.render("persona", conversations=convs, max_words=cfg.max_words)


def infer_personas(client: InferenceClient, users: Sequence[User],
                   conversations: Sequence[Conversation], cfg: PersonaConfig
                   ) -> tuple[list[Persona], dict[str, str]]:
  """Returns (personas, {user id: reason}) for every user: made, or skipped/failed."""
  conv_by_hash = {c.conversation_hash: c for c in conversations}
  items, histories, skipped = [], {}, {}
  for user in users:
    if len(user.history) < cfg.min_history:
      skipped[user.user_id] = (f"too_little_history: {len(user.history)} history "
                               f"conversations < min_history {cfg.min_history}")
      continue
    history = history_of(user, conv_by_hash, cfg)
    histories[user.user_id] = history
    items.append(prompting.JsonItem(item_key(user.user_id), prompt_for(history, cfg)))
  done, failed = prompting.ask_json(client, items, validate_card, desc="persona",
                                    schema=CARD_SCHEMA, max_tokens=cfg.max_tokens)
  personas = []
  for user in users:
    key = item_key(user.user_id)
    if key in failed:
      skipped[user.user_id] = failed[key]
    if key not in done:
      continue
    history = histories[user.user_id]
    names = names_given(m.content for c in history for m in c.messages
                        if m.role == "user")
    card = {k: (scrub(v, names) if isinstance(v, str) else [scrub(x, names) for x in v])
            for k, v in done[key].items()}
    card = cap_words(card, cfg.max_words)
    personas.append(Persona(
        user_id=user.user_id, summary=card["summary"],
        preferences=tuple(card["preferences"]), expertise=card["expertise"],
        recurring_topics=tuple(card["recurring_topics"]),
        dislikes=tuple(card["dislikes"]),
        source_conversations=tuple(c.conversation_hash for c in history)))
  return personas, skipped
