"""Follow-up classification: label every user message that follows an assistant answer.

The taxonomy (labels, their descriptions, which may be actionable) comes from the config;
the default is RLHI.md's. The model answers JSON {label, actionable, feedback,
rationale}; an answer that does not parse, names an unknown label, or marks a label
actionable that cannot be, is re-asked once and otherwise rejected with its reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from rlhi.data import prompting
from rlhi.data.client import InferenceClient
from rlhi.data.schema import Conversation, FollowUp, User

DEFAULT_LABELS = {
    "new_request": "a new task, independent of the previous answer",
    "continuation": "builds on the previous answer (next step, go deeper); implicit "
                    "acceptance",
    "clarification": "adds missing context or restates what was meant; the answer "
                     "missed the intent",
    "correction": "points out an error or a concrete problem in the answer",
    "style_feedback": "asks to change form: length, tone, format, language, detail",
    "reattempt": "asks again or rephrases without saying what was wrong",
    "positive": "thanks, praise, 'it worked'",
    "other": "greetings, chatter, role-play or jailbreak set-up, unclear",
}
DEFAULT_ACTIONABLE = ("clarification", "correction", "style_feedback", "reattempt")


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
  labels: tuple[tuple[str, str], ...] = tuple(DEFAULT_LABELS.items())
  actionable_labels: tuple[str, ...] = DEFAULT_ACTIONABLE
  context_messages: int = 4  # messages before the follow-up shown to the classifier
  max_chars_per_message: int = 2000
  max_tokens: int = 256

  def __post_init__(self):
    unknown = set(self.actionable_labels) - {n for n, _ in self.labels}
    if unknown:
      raise ValueError(f"classify.actionable_labels: {sorted(unknown)} not in "
                       f"classify.labels")

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "ClassifyConfig":
    cfg = dict(cfg)
    if "labels" in cfg:
      cfg["labels"] = tuple(dict(cfg["labels"]).items())
    if "actionable_labels" in cfg:
      cfg["actionable_labels"] = tuple(cfg["actionable_labels"])
    return cls(**cfg)


def item_key(conversation_hash: str, message_index: int) -> str:
  return f"classify/{conversation_hash}/{message_index}"


def truncate(text: str, max_chars: int) -> str:
  if len(text) <= max_chars:
    return text
  return text[:max_chars] + f" [... {len(text) - max_chars} characters cut]"


def prompt_for(conv: Conversation, index: int, cfg: ClassifyConfig) -> str:
  context = [dataclasses.replace(m, content=truncate(m.content, cfg.max_chars_per_message))
             for m in conv.messages[max(0, index - cfg.context_messages):index]]
  return prompting.render(
      "classify", labels=dict(cfg.labels), actionable_labels=cfg.actionable_labels,
      context=context,
      follow_up=truncate(conv.messages[index].content, cfg.max_chars_per_message))


def validator(cfg: ClassifyConfig):
  labels = {n for n, _ in cfg.labels}

  def validate(obj: dict[str, Any]) -> dict[str, Any]:
    label = prompting.require(obj, "label", str)
    if label not in labels:
      raise ValueError(f"unknown label {label!r}; expected one of {sorted(labels)}")
    actionable = prompting.require(obj, "actionable", bool)
    feedback = prompting.require(obj, "feedback", str).strip()
    rationale = prompting.require(obj, "rationale", str).strip()
    if actionable and label not in cfg.actionable_labels:
      raise ValueError(f"label {label!r} cannot be actionable; actionable labels are "
                       f"{list(cfg.actionable_labels)}")
    if actionable and not feedback:
      raise ValueError("actionable is true but 'feedback' is empty")
    return dict(label=label, actionable=actionable, feedback=feedback,
                rationale=rationale)

  return validate


def answer_schema(cfg: ClassifyConfig) -> dict[str, Any]:
  """The JSON schema of a classification (what `validator` checks, less the rules
  across fields)."""
  return prompting.object_schema({
      "label": {"type": "string", "enum": [name for name, _ in cfg.labels]},
      "actionable": {"type": "boolean"},
      "feedback": prompting.STRING,
      "rationale": prompting.STRING})


def classify(client: InferenceClient, conversations: Sequence[Conversation],
             users: Sequence[User], cfg: ClassifyConfig
             ) -> tuple[list[FollowUp], dict[str, str]]:
  """Classifies every follow-up; returns (follow-ups, {item key: reject reason})."""
  user_of = {u.user_id: u for u in users}
  items, meta = [], {}
  for conv in conversations:
    user = user_of[conv.user_id]
    part = "target" if conv.conversation_hash in user.targets else "history"
    for i in conv.follow_up_indices():
      key = item_key(conv.conversation_hash, i)
      items.append(prompting.JsonItem(key, prompt_for(conv, i, cfg)))
      meta[key] = (conv, i, user.split, part)
  done, failed = prompting.ask_json(client, items, validator(cfg), desc="classify",
                                    schema=answer_schema(cfg), max_tokens=cfg.max_tokens)
  out = []
  for item in items:
    if item.key in done:
      conv, i, split, part = meta[item.key]
      out.append(FollowUp(conversation_hash=conv.conversation_hash, message_index=i,
                          user_id=conv.user_id, split=split, part=part,
                          **done[item.key]))
  return out, failed
