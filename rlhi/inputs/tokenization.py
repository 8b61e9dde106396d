"""Layer 1 of rlhi.inputs: chats and preference pairs -> tokenized examples (pure,
numpy int32), with what truncation did (`Tokenized`, `InputStats`); the example
layouts every later layer reads."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np

from rlhi.data import schema

DEFAULT_BUCKETS = (128, 256, 512, 1024, 2048, 4096)

SFT_KEYS = ("tokens", "loss_mask")
SFT_META = ("example_id", "user_id")
PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
PAIR_META = ("pair_id", "user_id")
# Optional per-pair floats that ride along with pairs (DPO's cached reference log-probs,
# rlhi/train/reference.py); padding rows get 0.
PAIR_FLOATS = ("ref_chosen_logps", "ref_rejected_logps")
SEQUENCE_FIELDS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")

Example = dict[str, Any]
Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------
# Truncation records and statistics.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Truncation:
  """What fitting one example into `max_length` did to it."""
  response_tokens_cut: int = 0  # summed over responses (chosen + rejected for pairs)
  turns_dropped: int = 0  # whole context messages dropped, oldest first
  left_tokens_cut: int = 0  # tokens cut from the left of the oldest kept turn
  dropped: str = ""  # reason, when the example was dropped; '' when kept

  @property
  def truncated(self) -> bool:
    return bool(self.response_tokens_cut or self.turns_dropped or self.left_tokens_cut)


@dataclasses.dataclass(frozen=True)
class Tokenized:
  example: Example | None  # None when dropped (see truncation.dropped)
  truncation: Truncation


@dataclasses.dataclass
class InputStats:
  """Counts over a data set; every input is either kept or dropped with a reason."""
  examples: int = 0  # inputs seen
  kept: int = 0
  truncated: int = 0  # kept examples that lost any token
  response_truncated: int = 0  # kept examples whose response was capped
  context_truncated: int = 0  # kept examples that lost whole context turns
  turns_dropped: int = 0  # context turns dropped, summed
  left_truncated: int = 0  # kept examples whose oldest kept turn was cut on the left
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count

  def add(self, t: Truncation) -> None:
    self.examples += 1
    if t.dropped:
      self.dropped[t.dropped] = self.dropped.get(t.dropped, 0) + 1
      return
    self.kept += 1
    self.truncated += t.truncated
    self.response_truncated += t.response_tokens_cut > 0
    self.context_truncated += t.turns_dropped > 0
    self.turns_dropped += t.turns_dropped
    self.left_truncated += t.left_tokens_cut > 0

  @property
  def num_dropped(self) -> int:
    return sum(self.dropped.values())

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"num_dropped": self.num_dropped}


# ----------------------------------------------------------------------------------------
# Turn segmentation in token space.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)  # identity: turns are told apart by object
class _Turn:
  role: str
  ids: list[int]
  mask: list[int]  # 1 on target tokens (assistant content and its end-of-turn token)
  index: int  # message index, for rendering its header/footer on demand


def _render(fmt, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
            ) -> list[int]:
  # Same rendering as ChatFormatter.encode (template text, then tokens without a second
  # BOS); encode's prompt is checked against it below, so a divergence cannot go unseen.
  text = fmt.tok.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                     add_generation_prompt=add_generation_prompt)
  return fmt.tok(text, add_special_tokens=False)["input_ids"]


def _check_prefix(short: Sequence[int], long: Sequence[int], what: str) -> None:
  if list(long[:len(short)]) != list(short):
    raise ValueError(
        f"chat template: the tokens of {what} are not a prefix of the longer "
        f"rendering, so the conversation cannot be split into turns in token space "
        f"(turn-level truncation and loss masks need a template that renders each "
        f"message independently of the ones after it)")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def _preamble(fmt, msgs: Sequence[Mapping[str, str]], first: list[int]) -> list[int]:
  """Tokens before the first message's own block (BOS, a template's default system).

  A template cannot render zero messages, so the first message is rendered twice: the
  second copy is its block as a later turn, and what the single rendering has before
  that block is the preamble. Templates that refuse a repeated role fall back to BOS.
  """
  try:
    twice = _render(fmt, [msgs[0], msgs[0]], False)
    block = twice[len(first):]
    if (twice[:len(first)] == first and 0 < len(block) <= len(first)
        and first[len(first) - len(block):] == block):
      return first[:len(first) - len(block)]
  except Exception:  # pylint: disable=broad-except  (jinja raise_exception(...))
    pass
  bos = fmt.tok.bos_token_id
  return [bos] if bos is not None and first[:1] == [bos] else []


def _segment(fmt, msgs: Sequence[Mapping[str, str]], train_on_context: bool
             ) -> tuple[list[int], list[_Turn], list[int]]:
  """(preamble, one turn per message, assistant header) such that their concatenation
  is the template's rendering of `msgs` with the generation prompt."""
  renders = [_render(fmt, msgs[:k + 1], False) for k in range(len(msgs))]
  preamble = _preamble(fmt, msgs, renders[0])
  prev = preamble
  turns = []
  for k, (msg, cur) in enumerate(zip(msgs, renders)):
    _check_prefix(prev, cur, f"messages[:{k}]")
    ids = cur[len(prev):]
    mask = [0] * len(ids)
    if train_on_context and msg["role"] == "assistant":
      mask = _assistant_mask(fmt, msgs, k, prev, cur)
    turns.append(_Turn(msg["role"], ids, mask, k))
    prev = cur
  prompt = _render(fmt, msgs, True)
  _check_prefix(prev, prompt, f"messages[:{len(msgs)}] (without the assistant header)")
  return preamble, turns, prompt[len(prev):]


def _assistant_mask(fmt, msgs, k: int, before: list[int], through: list[int]
                    ) -> list[int]:
  """1 on an assistant turn's content and end-of-turn token; 0 on its header.

  The header is what the generation prompt adds after messages[:k]; anything after the
  end-of-turn token (Qwen's newline) is template glue the model never generates.
  """
  if k == 0:
    raise ValueError("conversation starts with an assistant message: its header cannot "
                     "be told apart from the preamble")
  header = _render(fmt, msgs[:k], True)
  _check_prefix(before, header, f"messages[:{k}] (before assistant header)")
  _check_prefix(header, through, f"messages[:{k}] + assistant header")
  body = through[len(header):]
  if fmt.eot_id not in body:
    raise ValueError(f"chat template: no end-of-turn token after assistant message {k}")
  n_target = body.index(fmt.eot_id) + 1
  return ([0] * (len(header) - len(before)) + [1] * n_target
          + [0] * (len(body) - n_target))


def _content_span(fmt, msgs, turn: _Turn, before: list[int]) -> tuple[int, int]:
  """[start, end) of the content inside a turn's tokens (header and footer excluded).

  Found by rendering the same turn with empty content: the common prefix is the header,
  the common suffix the footer. Merges across the boundary only shrink both, so the span
  errs towards cutting less of the template.
  """
  empty = _render(fmt, list(msgs[:turn.index]) + [{"role": turn.role, "content": ""}],
                  False)
  _check_prefix(before, empty, f"messages[:{turn.index}] (before an empty turn)")
  shell = empty[len(before):]
  start = _common_prefix(shell, turn.ids)
  footer = _common_prefix(shell[start:][::-1], turn.ids[start:][::-1])
  return start, len(turn.ids) - footer


def _tokenize_chat(fmt, messages: Sequence[Mapping[str, str]], completions: Sequence[str],
                   *, persona: str | None, train_on_context: bool, max_length: int,
                   max_response_length: int | None
                   ) -> tuple[list[int], list[int], list[list[int]], Truncation]:
  """Prompt ids, prompt loss mask and one response per completion, fitted to
  `max_length` (see docs/inputs.md for the rule); truncation.dropped says when the
  example cannot fit (its ids are then meaningless)."""
  if max_length <= 0 or (max_response_length is not None and max_response_length <= 0):
    raise ValueError(f"max_length ({max_length}) and max_response_length "
                     f"({max_response_length}) must be positive")
  msgs = fmt.messages(messages, persona)
  preamble, turns, gen_header = _segment(fmt, msgs, train_on_context)
  prompt = preamble + [i for t in turns for i in t.ids] + gen_header
  responses = []
  for completion in completions:
    enc = fmt.encode(messages, completion, persona=persona)
    if enc.prompt_ids != prompt:
      raise ValueError("ChatFormatter.encode's prompt differs from the turn-by-turn "
                       "rendering; inputs.py and tokenizer.py disagree on the template")
    responses.append(enc.completion_ids)

  response_cut = 0
  if max_response_length is not None:
    response_cut = sum(max(0, len(r) - max_response_length) for r in responses)
    responses = [r[:max_response_length] for r in responses]
  # Kept always: preamble, system (persona) turns, the last turn, the assistant header.
  last = len(turns) - 1
  context = [t for t in turns[:last] if t.role != "system"]
  fixed = (len(preamble) + sum(len(t.ids) for t in turns if t not in context)
           + len(gen_header) + max(len(r) for r in responses))
  context_len = sum(len(t.ids) for t in context)
  n_dropped = 0
  while fixed + context_len > max_length and context:
    context_len -= len(context.pop(0).ids)
    n_dropped += 1
  excess = fixed + context_len - max_length
  left_cut = 0
  if excess > 0:
    oldest = turns[last]
    before = _render(fmt, msgs[:last], False) if last else preamble
    start, end = _content_span(fmt, msgs, oldest, before)
    if oldest.role == "system" or excess >= end - start:
      return [], [], responses, Truncation(response_cut, n_dropped, 0,
                                           dropped="too_long")
    oldest.ids = oldest.ids[:start] + oldest.ids[start + excess:]
    oldest.mask = oldest.mask[:start] + oldest.mask[start + excess:]
    left_cut = excess
  kept = [t for t in turns if t.role == "system" or t in context or t is turns[last]]
  prompt = preamble + [i for t in kept for i in t.ids] + gen_header
  mask = [0] * len(preamble) + [m for t in kept for m in t.mask] + [0] * len(gen_header)
  return prompt, mask, responses, Truncation(response_cut, n_dropped, left_cut)


def _i32(ids: Sequence[int]) -> np.ndarray:
  return np.asarray(ids, dtype=np.int32)


# ----------------------------------------------------------------------------------------
# Tokenization of examples.
# ----------------------------------------------------------------------------------------


def tokenize_completion(fmt, messages: Sequence[Mapping[str, str]], completion: str, *,
                        max_length: int, max_response_length: int | None = None,
                        persona: str | None = None, example_id: str = "",
                        user_id: str = "") -> Tokenized:
  """SFT example from a prompt and one completion; only the completion is a target.

  Args:
    fmt: a `ChatFormatter`.
    messages: chat messages ({'role', 'content'}), ending with the user request.
    completion: the assistant answer to learn.
    max_length: the longest `tokens` allowed.
    max_response_length: the completion is capped at this many tokens (cut at the end).
    persona: goes in as the system message (fmt.system_template).
    example_id, user_id: metadata kept alongside.

  Returns:
    Tokenized with example {tokens: int32[n], loss_mask: int32[n], example_id, user_id}
    where loss_mask is 1 exactly on the completion tokens (incl. end-of-turn).
  """
  prompt, mask, (response,), trunc = _tokenize_chat(
      fmt, messages, [completion], persona=persona, train_on_context=False,
      max_length=max_length, max_response_length=max_response_length)
  if trunc.dropped:
    return Tokenized(None, trunc)
  return Tokenized({"tokens": _i32(prompt + response),
                    "loss_mask": _i32(mask + [1] * len(response)),
                    "example_id": example_id, "user_id": user_id}, trunc)


def tokenize_conversation(fmt, conversation: schema.Conversation, *, max_length: int,
                          max_response_length: int | None = None,
                          persona: str | None = None) -> Tokenized:
  """SFT example from a whole conversation; every assistant turn is a target.

  The last assistant message is "the response" for truncation (capped at
  `max_response_length`); messages after it have no target and are left out. Earlier
  assistant turns are context: targets while kept, dropped oldest first when too long.

  Returns:
    Tokenized with example {tokens: int32[n], loss_mask: int32[n], example_id (the
    conversation hash), user_id}; loss_mask is 1 on each assistant turn's content and
    end-of-turn token, 0 on headers, system/persona and user turns.
  """
  messages = [m.to_chat() for m in conversation.messages]
  while messages and messages[-1]["role"] != "assistant":
    messages.pop()
  if len(messages) < 2:
    return Tokenized(None, Truncation(dropped="no_assistant_turn"))
  prompt, mask, (response,), trunc = _tokenize_chat(
      fmt, messages[:-1], [messages[-1]["content"]], persona=persona,
      train_on_context=True, max_length=max_length,
      max_response_length=max_response_length)
  if trunc.dropped:
    return Tokenized(None, trunc)
  return Tokenized({"tokens": _i32(prompt + response),
                    "loss_mask": _i32(mask + [1] * len(response)),
                    "example_id": conversation.conversation_hash,
                    "user_id": conversation.user_id}, trunc)


def tokenize_pair(fmt, pair: schema.PreferencePair, *, with_persona: bool,
                  max_length: int, max_response_length: int | None = None) -> Tokenized:
  """Preference example for the reward model and DPO.

  `prompt_ids + chosen_ids` (and `+ rejected_ids`) is the template's rendering of the
  conversation; both must fit in `max_length` since they are padded to one length.

  Returns:
    Tokenized with example {prompt_ids: int32[p], chosen_ids: int32[c],
    rejected_ids: int32[r], pair_id, user_id}.
  """
  persona = pair.persona if with_persona else None
  prompt, _, (chosen, rejected), trunc = _tokenize_chat(
      fmt, [m.to_chat() for m in pair.prompt], [pair.chosen, pair.rejected],
      persona=persona, train_on_context=False, max_length=max_length,
      max_response_length=max_response_length)
  if trunc.dropped:
    return Tokenized(None, trunc)
  return Tokenized({"prompt_ids": _i32(prompt), "chosen_ids": _i32(chosen),
                    "rejected_ids": _i32(rejected), "pair_id": pair.pair_id,
                    "user_id": pair.user_id}, trunc)


def _tokenize_all(items: Iterable[Any], fn: Callable[[Any], Tokenized], what: str
                  ) -> tuple[list[Example], InputStats]:
  examples, stats = [], InputStats()
  for item in items:
    t = fn(item)
    stats.add(t.truncation)
    if t.example is not None:
      examples.append(t.example)
  if stats.num_dropped or stats.truncated:
    logging.info("inputs: %s: %s", what, json.dumps(stats.to_dict()))
  return examples, stats


def tokenize_pairs(fmt, pairs: Iterable[schema.PreferencePair], *, with_persona: bool,
                   max_length: int, max_response_length: int | None = None
                   ) -> tuple[list[Example], InputStats]:
  """`tokenize_pair` over a data set; dropped pairs are counted, never silent."""
  return _tokenize_all(
      pairs, lambda p: tokenize_pair(fmt, p, with_persona=with_persona,
                                     max_length=max_length,
                                     max_response_length=max_response_length), "pairs")


def tokenize_conversations(fmt, conversations: Iterable[schema.Conversation], *,
                           max_length: int, max_response_length: int | None = None,
                           personas: Mapping[str, str] | None = None
                           ) -> tuple[list[Example], InputStats]:
  """`tokenize_conversation` over a data set; `personas` maps user_id -> persona text."""
  personas = personas or {}
  return _tokenize_all(
      conversations,
      lambda c: tokenize_conversation(fmt, c, max_length=max_length,
                                      max_response_length=max_response_length,
                                      persona=personas.get(c.user_id)),
      "conversations")


# ----------------------------------------------------------------------------------------
# Example layouts.
# ----------------------------------------------------------------------------------------


def example_kind(example: Mapping[str, Any]) -> str:
  if all(k in example for k in PAIR_KEYS):
    return "pairs"
  if all(k in example for k in SFT_KEYS):
    return "sft"
  raise ValueError(f"example has keys {sorted(example)}; expected {list(SFT_KEYS)} "
                   f"(SFT) or {list(PAIR_KEYS)} (pairs)")


def example_layout(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  return (PAIR_KEYS, PAIR_META) if kind == "pairs" else (SFT_KEYS, SFT_META)


def normalise_example(example: Mapping[str, Any]) -> Example:
  """One form for every source: int32 arrays and Python strings (TFDS gives bytes)."""
  ids, meta = example_layout(example_kind(example))
  out = {k: np.asarray(example[k], dtype=np.int32) for k in ids}
  for k in PAIR_FLOATS:
    if k in example:
      out[k] = np.float32(example[k])
  for k in meta:
    v = example.get(k, "")
    out[k] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
  return out
