"""User-Guided Rewrites: actionable feedback -> (rewrite > original) preference pairs.

For each actionable follow-up in a user's TARGET conversations, the model rewrites the
assistant answer just before it so that it already satisfies the feedback (and fits the
persona), as if it were the first reply. Pair: prompt = conversation up to and including
the user request; chosen = the rewrite; rejected = the original answer (or a
regeneration by the base policy, `rejected='regenerate'`). Quality filter, each a reject
reason: empty, refusal, near_identical (difflib ratio >= threshold), mentions_feedback
(alludes to the follow-up or an earlier version, or quotes the follow-up).

`mode='scratch'` is the paper's "rewrites from scratch" baseline: the same turns are
rewritten with a generic "improve this answer" prompt that never sees the follow-up.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
from typing import Any, Mapping, Sequence

from rlhi.data import prompting
from rlhi.data.client import ChatRequest, InferenceClient
from rlhi.data.schema import Conversation, FollowUp, Persona, PreferencePair


@dataclasses.dataclass(frozen=True)
class RewriteConfig:
  mode: str = "feedback"  # 'feedback' | 'scratch' (baseline without the follow-up)
  with_persona: bool = True  # persona in the rewrite prompt and in the pairs
  rejected: str = "original"  # 'original' WildChat answer | 'regenerate' (base policy)
  max_identical_ratio: float = 0.95  # near_identical when difflib ratio >= this
  max_quoted_words: int = 8  # mentions_feedback when it quotes this many follow-up words
  context_messages: int = 6  # messages before the answer kept in the rewrite prompt
  max_tokens: int = 1024
  temperature: float = 0.0
  regenerate_temperature: float = 0.7

  def __post_init__(self):
    if self.mode not in ("feedback", "scratch"):
      raise ValueError(f"rewrites.mode: expected feedback or scratch, got {self.mode!r}")
    if self.rejected not in ("original", "regenerate"):
      raise ValueError(f"rewrites.rejected: expected original or regenerate, "
                       f"got {self.rejected!r}")

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "RewriteConfig":
    return cls(**dict(cfg))


def item_key(conversation_hash: str, follow_up_index: int, mode: str = "feedback"
             ) -> str:
  task = "rewrite" if mode == "feedback" else "rewrite_scratch"
  return f"{task}/{conversation_hash}/{follow_up_index}"


# ----------------------------------------------------------------------------------------
# Quality filter.
# ----------------------------------------------------------------------------------------

_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry,? but|i am sorry,? but|sorry,? but i|i (?:can(?:no|')t|am "
    r"unable to|won'?t) (?:help|assist|do|provide|comply)|as an ai(?: language model)?"
    r",? i)", re.IGNORECASE)
_MENTIONS = re.compile(
    r"\b(?:as you (?:asked|requested|mentioned|said|wanted|pointed out|suggested)|"
    r"per your (?:request|feedback|instructions?)|you(?:'re| are) (?:right|correct)|"
    r"i apologi[sz]e|(?:my )?apologies for (?:the|my|any)|^\s*sorry\b|sorry (?:about|"
    r"for) (?:the|my) (?:confusion|mistake|error|oversight)|my (?:mistake|bad)|"
    r"thanks? (?:you )?for (?:pointing|the "
    r"feedback|clarifying|the correction)|good catch|(?:here(?:'s| is) (?:a|an|the|your) "
    r"(?:revised|updated|corrected|shorter|longer|simpler|new|improved|rewritten|"
    r"fixed) (?:version|answer|response))|i(?:'ve| have) (?:updated|revised|corrected|"
    r"changed|fixed|rewritten|shortened)|(?:revised|updated|corrected) (?:version|"
    r"answer|response)|(?:previous|earlier|original) (?:answer|response|version|reply))",
    re.IGNORECASE)


def _norm(text: str) -> str:
  return " ".join(text.lower().split())


def quoted_words(rewrite: str, follow_up: str) -> int:
  """Length of the longest run of words of `follow_up` that `rewrite` repeats."""
  a, b = _norm(rewrite).split(), _norm(follow_up).split()
  m = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(
      0, len(a), 0, len(b))
  return m.size


def quality_reason(rewrite: str, original: str, follow_up: str, cfg: RewriteConfig
                   ) -> str | None:
  """The reject reason of a rewrite, or None if it passes."""
  if not rewrite.strip():
    return "empty"
  if _REFUSAL.search(rewrite):
    return "refusal"
  ratio = difflib.SequenceMatcher(None, _norm(rewrite), _norm(original),
                                  autojunk=False).ratio()
  if ratio >= cfg.max_identical_ratio:
    return f"near_identical (similarity {ratio:.3f} >= {cfg.max_identical_ratio})"
  m = _MENTIONS.search(rewrite)
  if m:
    return f"mentions_feedback ('{m.group(0)}')"
  if cfg.mode == "feedback":
    n = quoted_words(rewrite, follow_up)
    if n >= cfg.max_quoted_words:
      return f"mentions_feedback (quotes {n} words of the follow-up)"
  return None


# ----------------------------------------------------------------------------------------
# The stage.
# ----------------------------------------------------------------------------------------


def prompt_for(conv: Conversation, index: int, persona: str | None,
               cfg: RewriteConfig) -> str:
  """index: the follow-up; the answer rewritten is index - 1."""
  answer_at = index - 1
  context = conv.messages[max(0, answer_at - cfg.context_messages):answer_at]
  return prompting.render(
      "rewrite" if cfg.mode == "feedback" else "rewrite_scratch",
      persona=persona if cfg.with_persona else None, context=context,
      answer=conv.messages[answer_at].content, follow_up=conv.messages[index].content)


def clean(text: str) -> str:
  """Strips whitespace and a leading 'Rewritten answer:'-style label the model added."""
  text = text.strip()
  return re.sub(r"^(?:rewritten |new |improved )?(?:answer|response)\s*:\s*\n?", "",
                text, flags=re.IGNORECASE).strip()


def pair_id(conversation_hash: str, follow_up_index: int, source: str) -> str:
  return hashlib.sha256(f"{source}/{conversation_hash}/{follow_up_index}".encode()
                        ).hexdigest()[:24]


def make_pairs(client: InferenceClient, follow_ups: Sequence[FollowUp],
               conversations: Sequence[Conversation],
               personas: Mapping[str, Persona], cfg: RewriteConfig,
               policy_client: InferenceClient | None = None
               ) -> tuple[list[PreferencePair], dict[str, str]]:
  """Rewrites the answers before actionable target follow-ups; (pairs, {key: reason})."""
  conv_by_hash = {c.conversation_hash: c for c in conversations}
  chosen_items = [f for f in follow_ups if f.actionable and f.part == "target"]
  source = "rewrite" if cfg.mode == "feedback" else "rewrite_scratch"
  requests = []
  for f in chosen_items:
    persona = personas.get(f.user_id)
    text = persona.to_text() if persona else None
    requests.append(ChatRequest(
        key=item_key(f.conversation_hash, f.message_index, cfg.mode),
        messages=({"role": "user", "content": prompt_for(
            conv_by_hash[f.conversation_hash], f.message_index, text, cfg)},),
        temperature=cfg.temperature, max_tokens=cfg.max_tokens))
  results = client.chat(requests, desc="rewrites")

  regenerated: dict[str, Any] = {}
  if cfg.rejected == "regenerate":
    if policy_client is None:
      raise ValueError("rewrites.rejected='regenerate' needs the policy client "
                       "(config.policy_client)")
    # The base policy answers the same prompt, without the persona: the pair then
    # contrasts what the policy does now with what the user wanted.
    regen_requests = [ChatRequest(
        key=f"regenerate/{f.conversation_hash}/{f.message_index - 1}",
        messages=tuple(m.to_chat() for m in
                       conv_by_hash[f.conversation_hash].messages[:f.message_index - 1]),
        temperature=cfg.regenerate_temperature, max_tokens=cfg.max_tokens)
        for f in chosen_items]
    regen = policy_client.chat(regen_requests, desc="regenerate")
    regenerated = {r.key: r for r in regen}
    # An empty regeneration is set aside below; a re-run asks for it again.
    policy_client.forget([q for q, r in zip(regen_requests, regen)
                          if r.text is not None and not r.text.strip()])

  pairs, failed = [], {}
  for f, req, res in zip(chosen_items, requests, results):
    conv = conv_by_hash[f.conversation_hash]
    answer_at = f.message_index - 1
    if res.text is None:
      failed[req.key] = f"request failed: {res.error}"
      continue
    original = conv.messages[answer_at].content
    if cfg.rejected == "regenerate":
      r = regenerated[f"regenerate/{f.conversation_hash}/{answer_at}"]
      if r.text is None or not r.text.strip():
        failed[req.key] = f"regeneration failed: {r.error or 'empty answer'}"
        continue
      original = r.text.strip()
    rewrite = clean(res.text)
    reason = quality_reason(rewrite, original, conv.messages[f.message_index].content,
                            cfg)
    if reason:
      failed[req.key] = prompting.Failure(reason, [rewrite])
      # Not served from the cache again: a re-run asks for a new rewrite.
      client.forget([req])
      continue
    persona = personas.get(f.user_id)
    pairs.append(PreferencePair(
        pair_id=pair_id(f.conversation_hash, f.message_index, source),
        user_id=f.user_id, split=f.split, prompt=conv.messages[:answer_at],
        chosen=rewrite, rejected=original,
        persona=persona.to_text() if (persona and cfg.with_persona) else None,
        source=source, conversation_hash=f.conversation_hash,
        message_index=answer_at, label=f.label, feedback=f.feedback))
  return pairs, failed
