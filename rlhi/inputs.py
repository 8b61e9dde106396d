r"""Tokenized examples -> fixed-shape, resumable batches (grain).

Three layers, each usable on its own:

1. Tokenization (pure, numpy int32). `tokenize_conversation` / `tokenize_completion`
   give SFT examples {tokens, loss_mask}; `tokenize_pair` gives preference examples
   {prompt_ids, chosen_ids, rejected_ids} for the reward model and DPO. Each returns a
   `Tokenized` (the example, or None when it cannot fit, plus what truncation did);
   `tokenize_conversations` / `tokenize_pairs` run them over a data set and count
   everything in `InputStats`.
2. Sources of tokenized examples with random access: an HF `datasets.Dataset`
   (`hf_source`, the default) or a TFDS data set in array_record format
   (`write_array_record_dataset` + `tfds_source`, read without TensorFlow) so that pod
   hosts read a prepared data set from a bucket.
3. `make_batches`: source -> this host's slice -> shuffle (seed, epoch) -> repeat ->
   batch -> right-pad to a bucket length, as a grain `MapDataset`; `make_iterator`
   wraps it in an iterator whose `get_state()` is a JSON-ready dict for checkpoints.

Typical use::

  fmt = tokenizer.ChatFormatter(tokenizer.load_tokenizer("bundled"))
  pairs = schema.read_jsonl(f"{workdir}/pairs_rewrites.train.jsonl",
                            schema.PreferencePair)
  examples, stats = inputs.tokenize_pairs(fmt, pairs, with_persona=True,
                                          max_length=1024, max_response_length=512)
  it = inputs.make_iterator(
      inputs.hf_source(examples), per_host_batch_size=8, pad_id=fmt.pad_id,
      seed=0, process_index=jax.process_index(), process_count=jax.process_count())
  batch = next(it)                   # numpy; sharding.py makes global arrays
  checkpoint["input"] = it.get_state()

See docs/inputs.md for the batch layout and the truncation rule. This module never
imports jax: conversion to global device arrays lives in rlhi/sharding.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import grain
import numpy as np

from rlhi.data import pipeline
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
# Sources: HF datasets (default) and TFDS array_record.
# ----------------------------------------------------------------------------------------


def _kind(example: Mapping[str, Any]) -> str:
  if all(k in example for k in PAIR_KEYS):
    return "pairs"
  if all(k in example for k in SFT_KEYS):
    return "sft"
  raise ValueError(f"example has keys {sorted(example)}; expected {list(SFT_KEYS)} "
                   f"(SFT) or {list(PAIR_KEYS)} (pairs)")


def _layout(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  return (PAIR_KEYS, PAIR_META) if kind == "pairs" else (SFT_KEYS, SFT_META)


def _normalise(example: Mapping[str, Any]) -> Example:
  """One form for every source: int32 arrays and Python strings (TFDS gives bytes)."""
  ids, meta = _layout(_kind(example))
  out = {k: np.asarray(example[k], dtype=np.int32) for k in ids}
  for k in PAIR_FLOATS:
    if k in example:
      out[k] = np.float32(example[k])
  for k in meta:
    v = example.get(k, "")
    out[k] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
  return out


def hf_source(examples: Sequence[Example]):
  """Tokenized examples -> `datasets.Dataset` with random access (numpy format).

  `examples` is a list from `tokenize_*`, or a `datasets.Dataset` of them (e.g. saved
  with `save_to_disk` and reloaded with `datasets.load_from_disk`).
  """
  import datasets  # pylint: disable=g-import-not-at-top  (heavy; TFDS users skip it)
  if isinstance(examples, datasets.Dataset):
    _kind({k: None for k in examples.column_names})  # checks the columns
    return examples.with_format("numpy")
  if not examples:
    raise ValueError("hf_source: no examples (were they all dropped? see InputStats)")
  ids, meta = _layout(_kind(examples[0]))
  features = datasets.Features(
      {k: datasets.List(datasets.Value("int32")) for k in ids}
      | {k: datasets.Value("string") for k in meta})
  columns = {k: [np.asarray(e[k], np.int32) for e in examples] for k in ids}
  columns |= {k: [str(e.get(k, "")) for e in examples] for k in meta}
  return datasets.Dataset.from_dict(columns, features=features).with_format("numpy")


def pairs_source(path: str, fmt, *, with_persona: bool, max_length: int,
                 max_response_length: int | None = None):
  """`pairs_rewrites.<split>.jsonl` -> (HF source of tokenized pairs, InputStats)."""
  pairs = schema.read_jsonl(path, schema.PreferencePair)
  examples, stats = tokenize_pairs(fmt, pairs, with_persona=with_persona,
                                   max_length=max_length,
                                   max_response_length=max_response_length)
  return hf_source(examples), stats


def pair_sets(fmt, data_dir: str, wanted: Sequence[tuple[str, str, bool]], *,
              max_length: int, max_response_length: int | None = None
              ) -> tuple[dict[tuple[str, bool], Any], dict[tuple[str, bool], InputStats]]:
  """Tokenized pair sets from a data-prep directory, with their counts.

  `wanted` lists (pattern, split, with_persona), the pattern a file name such as
  'pairs_rewrites.{split}.jsonl'; returns ({(split, with_persona): examples},
  {(split, with_persona): InputStats}). A missing file is an error naming the command
  that makes it (rlhi.data.pipeline.input_path).
  """
  sets, stats = {}, {}
  for pattern, split, with_persona in wanted:
    path = pipeline.input_path(data_dir, pattern.format(split=split))
    sets[split, with_persona], stats[split, with_persona] = pairs_source(
        path, fmt, with_persona=with_persona, max_length=max_length,
        max_response_length=max_response_length)
  return sets, stats


def conversations_source(path: str, fmt, *, max_length: int,
                         max_response_length: int | None = None,
                         personas: Mapping[str, str] | None = None):
  """`conversations.jsonl` -> (HF source of tokenized SFT examples, InputStats)."""
  conversations = schema.read_jsonl(path, schema.Conversation)
  examples, stats = tokenize_conversations(fmt, conversations, max_length=max_length,
                                           max_response_length=max_response_length,
                                           personas=personas)
  return hf_source(examples), stats


def _tfds_features(kind: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ids, meta = _layout(kind)
  return tfds.features.FeaturesDict(
      {k: tfds.features.Tensor(shape=(None,), dtype=np.int32) for k in ids}
      | {k: tfds.features.Text() for k in meta})


def write_array_record_dataset(splits: Mapping[str, Sequence[Example]], data_dir: str,
                               *, name: str = "rlhi_pairs", version: str = "1.0.0",
                               num_shards: int = 1, overwrite: bool = False) -> str:
  """Writes tokenized examples as a TFDS data set in array_record format.

  Layout: `{data_dir}/{name}/{version}/{name}-{split}.array_record-0000i-of-0000n` plus
  dataset_info.json and features.json, readable with `tfds_source` (no TensorFlow).
  Written with array_record and `tfds.folder_dataset.write_metadata` rather than a
  DatasetBuilder: the builder path needs modules a TensorFlow-free install lacks.

  Args:
    splits: split name -> examples (all SFT or all pairs).
    data_dir: a local directory; copy it to a bucket for a pod (docs/inputs.md).
    name: TFDS data set name (snake_case).
    version: 'x.y.z'.
    num_shards: files per split; more shards let many hosts read in parallel.
    overwrite: replace an existing data set of the same name and version.

  Returns:
    The data set directory.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"TFDS data set name {name!r}: expected snake_case [a-z][a-z0-9_]*")
  kinds = {_kind(e) for examples in splits.values() for e in examples}
  if len(kinds) != 1:
    raise ValueError(f"write_array_record_dataset: expected examples of one kind "
                     f"(SFT or pairs) in all splits, got {sorted(kinds) or 'none'}")
  features = _tfds_features(kinds.pop())
  out = os.path.join(data_dir, name, version)
  if os.path.exists(os.path.join(out, "dataset_info.json")) and not overwrite:
    raise FileExistsError(f"{out} already holds a data set; pass overwrite=True")
  os.makedirs(out, exist_ok=True)
  split_infos = []
  for split, examples in splits.items():
    n_shards = max(1, min(num_shards, len(examples)))
    lengths, num_bytes = [], 0
    for s in range(n_shards):
      lo, hi = s * len(examples) // n_shards, (s + 1) * len(examples) // n_shards
      path = os.path.join(out, f"{name}-{split}.array_record-{s:05d}-of-{n_shards:05d}")
      # group_size:1 makes each record its own chunk: cheapest random access.
      writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      for e in examples[lo:hi]:
        writer.write(features.serialize_example(_normalise(e)))
      writer.close()
      lengths.append(hi - lo)
      num_bytes += os.path.getsize(path)
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                           num_bytes=num_bytes))
  tfds.folder_dataset.write_metadata(
      data_dir=out, features=features, split_infos=split_infos, version=version,
      check_data=False, description="rlhi tokenized examples (rlhi/inputs.py)")
  return out


def tfds_source(name: str, split: str, data_dir: str, version: str = "1.0.0"):
  """Random-access source over a data set written by `write_array_record_dataset`.

  `data_dir` may be a bucket path (gs://...) on a pod: each host reads only the records
  of its slice.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.data_source(f"{name}:{version}", split=split, data_dir=data_dir,
                          download=False)


# ----------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------


def bucket_length(n: int, bucket_lengths: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """The smallest bucket that holds `n` tokens."""
  for b in bucket_lengths:
    if n <= b:
      return b
  raise ValueError(f"an example of {n} tokens is longer than the largest bucket "
                   f"{bucket_lengths[-1]}; tokenize with max_length <= "
                   f"{bucket_lengths[-1]} or add a bucket")


def _pad_rows(seqs: Sequence[np.ndarray], masks: Sequence[np.ndarray], batch_size: int,
              length: int, pad_id: int) -> Batch:
  """Right-padded [batch_size, length] arrays; rows past len(seqs) are all padding.

  `masks` mark target tokens in the sequence; the batch's loss_mask marks positions
  whose *target* (the next token) is one of them.
  """
  tokens = np.full((batch_size, length), pad_id, np.int32)
  loss_mask = np.zeros((batch_size, length), np.float32)
  positions = np.zeros((batch_size, length), np.int32)
  segment_ids = np.zeros((batch_size, length), np.int32)
  for i, (seq, mask) in enumerate(zip(seqs, masks)):
    n = len(seq)
    tokens[i, :n] = seq
    loss_mask[i, :n - 1] = mask[1:]
    positions[i, :n] = np.arange(n)
    segment_ids[i, :n] = 1
  targets = np.full_like(tokens, pad_id)
  targets[:, :-1] = tokens[:, 1:]
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
          "positions": positions, "segment_ids": segment_ids}


def score_width(count: int, length: int) -> int:
  """Columns of `score_positions` for rows of `length` with at most `count` response
  targets: the smallest multiple of length / 4 that holds them (at most 4 widths per
  length, so few compiled shapes)."""
  quarter = max(length // 4, 1)
  return min(length, _round_up(count, quarter))


def score_columns(loss_mask: np.ndarray, width: int) -> np.ndarray:
  """int32 [R, width]: the columns of each row where loss_mask is 1, in order, then
  the last column (whose loss_mask is always 0: its target is past the row). The LM
  head runs on these columns only (objectives.sequence_logps), not on prompts or
  padding."""
  rows, length = loss_mask.shape
  out = np.full((rows, width), length - 1, np.int32)
  for r in range(rows):
    cols = np.flatnonzero(loss_mask[r])
    if len(cols) > width:
      raise ValueError(f"score_columns: {len(cols)} response targets in a row, "
                       f"width {width}")
    out[r, :len(cols)] = cols
  return out


def pad_batch(examples: Sequence[Mapping[str, Any]], *, batch_size: int, pad_id: int,
              bucket_lengths: Sequence[int] = DEFAULT_BUCKETS,
              with_metadata: bool = False, length_of: Sequence[Mapping[str, Any]] = (),
              score_positions: bool = False) -> Batch:
  """Examples (all SFT or all pairs) -> one fixed-shape batch; see docs/inputs.md.

  SFT: tokens, targets, loss_mask, positions, segment_ids: [B, L]; valid: bool[B].
  Pairs: chosen_* and rejected_* (the same five, both [B, L], one L for both so they
  stack into one forward pass), prompt_length: int32[B], valid: bool[B], float32[B]
  `ref_chosen_logps` / `ref_rejected_logps` when the examples carry them, and with
  `score_positions` (for DPO log-probs) `*_score_positions` int32 [B, K]: the columns
  whose target is a response token (`score_columns`).
  L is the smallest bucket holding the longest sequence of `length_of` (default: of
  `examples`): a host pads its rows to the bucket of the whole global batch, so that
  every host builds the same shape. Rows past len(examples) (a last partial batch) are
  padding with valid=False.
  """
  examples = [_normalise(e) for e in examples]
  length_of = [_normalise(e) for e in length_of] or examples
  if not 0 <= len(examples) <= batch_size or not length_of:
    raise ValueError(f"pad_batch: {len(examples)} examples for batch size {batch_size}")
  kind = _kind(length_of[0])
  valid = np.arange(batch_size) < len(examples)
  if kind == "sft":
    length = bucket_length(max(len(e["tokens"]) for e in length_of), bucket_lengths)
    batch = _pad_rows([e["tokens"] for e in examples],
                      [e["loss_mask"] for e in examples], batch_size, length, pad_id)
  else:
    length = bucket_length(
        max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
            for e in length_of), bucket_lengths)
    width = score_width(max(max(len(e["chosen_ids"]), len(e["rejected_ids"]))
                            for e in length_of), length)
    batch = {"prompt_length": np.zeros(batch_size, np.int32)}
    batch["prompt_length"][:len(examples)] = [len(e["prompt_ids"]) for e in examples]
    for side in ("chosen", "rejected"):
      seqs = [np.concatenate([e["prompt_ids"], e[f"{side}_ids"]]) for e in examples]
      masks = [np.concatenate([np.zeros(len(e["prompt_ids"]), np.int32),
                               np.ones(len(e[f"{side}_ids"]), np.int32)])
               for e in examples]
      rows = _pad_rows(seqs, masks, batch_size, length, pad_id)
      if score_positions:
        rows["score_positions"] = score_columns(rows["loss_mask"], width)
      batch |= {f"{side}_{k}": v for k, v in rows.items()}
    for k in PAIR_FLOATS:
      if k in length_of[0]:
        batch[k] = np.zeros(batch_size, np.float32)
        batch[k][:len(examples)] = [e[k] for e in examples]
  batch["valid"] = valid
  if with_metadata:
    for k in _layout(kind)[1]:
      batch[k] = np.array([e[k] for e in examples] + [""] * (batch_size - len(examples)))
  return batch


def stack_pairs(batch: Mapping[str, np.ndarray]) -> Batch:
  """Pairs batch -> one [2B, L] batch, chosen rows first, for a single forward pass.

  Returns tokens, targets, loss_mask, positions, segment_ids: [2B, L];
  prompt_length: int32[2B]; valid: bool[2B]. Row i and row B + i are one pair.
  """
  out = {k: np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
         for k in SEQUENCE_FIELDS}
  for k in ("prompt_length", "valid"):
    out[k] = np.concatenate([batch[k], batch[k]])
  return out


# ----------------------------------------------------------------------------------------
# Packing: several examples per row; a pair's prompt once, shared by both responses.
# ----------------------------------------------------------------------------------------


def packed_length(example: Mapping[str, Any]) -> int:
  """Tokens an example takes in a packed row.

  SFT: its tokens. A pair: the prompt once and each response after a copy of the
  prompt's last token (len(prompt) + len(chosen) + len(rejected) + 1), see `pack`.
  """
  if "tokens" in example:
    return len(example["tokens"])
  return (len(example["prompt_ids"]) + len(example["chosen_ids"])
          + len(example["rejected_ids"]) + 1)


def plan_rows(lengths: Sequence[int], length: int) -> list[list[int]]:
  """First-fit decreasing: which examples (indices into `lengths`) share each row of
  `length` tokens. Deterministic; ties keep the input order."""
  rows: list[list[int]] = []
  room: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    n = lengths[i]
    if n > length:
      raise ValueError(f"a packed example of {n} tokens does not fit a row of {length}")
    for r, free in enumerate(room):
      if n <= free:
        rows[r].append(i)
        room[r] -= n
        break
    else:
      rows.append([i])
      room.append(length - n)
  return [sorted(r) for r in rows]


def pack(examples: Sequence[Mapping[str, Any]], rows: Sequence[Sequence[int]], *,
         num_rows: int, length: int, slots: int, pad_id: int, first_index: int = 0,
         width: int | None = None) -> Batch:
  """Examples laid out in `num_rows` rows of `length` tokens, `rows[r]` in row r.

  Every array is [R, ...] so that sharding and accumulation split rows, and all an
  example's numbers travel with its row. Example j of row r has segment id j + 1
  (`slots` per row at most) and positions from 0; its values are in slot j of the
  per-slot arrays [R, slots]; `pair_index` / `example_index` is its index in the
  global batch (`first_index` + its index in `examples`), -1 on an empty slot.

  SFT: tokens, targets, loss_mask, positions, segment_ids [R, L] as in `pad_batch`,
  `valid` [R, slots]; the loss sums over loss_mask, so it is the unpacked loss.

  Pairs (Wang & Hegde 2024, arXiv 2410.20305): one segment holds
  [prompt[:-1], prompt[-1], chosen, prompt[-1], rejected] with response_ids
  0 ... 0, 1 ... 1, 2 ... 2; both responses continue the prompt's positions, and the
  attention mask (llama.attention_mask) lets each see the prompt and itself only. The
  prompt's last token is repeated so that each response has the query that predicts
  its first token: the copy sees exactly what the prompt's last token sees in an
  unpacked row. loss_mask marks positions whose target is a token of the same
  response; with a `width`, `score_positions` [R, width] lists those columns
  (`score_columns`; for DPO log-probs). Per slot: valid,
  prompt_length, chosen_end / rejected_end (column of each response's last token,
  where the reward model reads its score) and the reference log-probs when the
  examples carry them.
  """
  kind = _kind(examples[0]) if examples else "pairs"
  tokens = np.full((num_rows, length), pad_id, np.int32)
  loss_mask = np.zeros((num_rows, length), np.float32)
  positions = np.zeros((num_rows, length), np.int32)
  segment_ids = np.zeros((num_rows, length), np.int32)
  response_ids = np.zeros((num_rows, length), np.int32)
  per_slot = {"valid": np.zeros((num_rows, slots), bool),
              "example_index": np.full((num_rows, slots), -1, np.int32)}
  if kind == "pairs":
    per_slot |= {k: np.zeros((num_rows, slots), np.int32)
                 for k in ("prompt_length", "chosen_end", "rejected_end")}
    per_slot |= {k: np.zeros((num_rows, slots), np.float32)
                 for k in PAIR_FLOATS if examples and k in examples[0]}
  if len(rows) > num_rows:
    raise ValueError(f"pack: {len(rows)} rows planned for {num_rows}")
  for r, members in enumerate(rows):
    if len(members) > slots:
      raise ValueError(f"pack: {len(members)} examples in a row of {slots} slots")
    o = 0
    for j, i in enumerate(members):
      e = examples[i]
      per_slot["valid"][r, j] = True
      per_slot["example_index"][r, j] = first_index + i
      if kind == "sft":
        n = len(e["tokens"])
        tokens[r, o:o + n] = e["tokens"]
        loss_mask[r, o:o + n - 1] = e["loss_mask"][1:]
        positions[r, o:o + n] = np.arange(n)
        segment_ids[r, o:o + n] = j + 1
        o += n
        continue
      p, c, x = e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]
      n = len(p)
      if n == 0:
        raise ValueError("pack: a pair with an empty prompt cannot share it")
      pieces = [(p[:-1], 0, 0), (np.concatenate([p[-1:], c]), 1, n - 1),
                (np.concatenate([p[-1:], x]), 2, n - 1)]
      for ids, resp, pos0 in pieces:
        k = len(ids)
        tokens[r, o:o + k] = ids
        positions[r, o:o + k] = pos0 + np.arange(k)
        segment_ids[r, o:o + k] = j + 1
        response_ids[r, o:o + k] = resp
        if resp:
          loss_mask[r, o:o + k - 1] = 1.0
          per_slot["chosen_end" if resp == 1 else "rejected_end"][r, j] = o + k - 1
        o += k
      per_slot["prompt_length"][r, j] = n
      for k in PAIR_FLOATS:
        if k in per_slot:
          per_slot[k][r, j] = e[k]
  targets = np.full_like(tokens, pad_id)
  targets[:, :-1] = tokens[:, 1:]
  batch = {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
           "positions": positions, "segment_ids": segment_ids} | per_slot
  if kind == "pairs":
    batch["response_ids"] = response_ids
    if width is not None:
      batch["score_positions"] = score_columns(loss_mask, width)
  return batch


def is_packed(batch: Mapping[str, Any]) -> bool:
  """Whether a batch was made by `pack` (per-slot arrays) rather than `pad_batch`."""
  return "example_index" in batch


def _round_up(n: int, multiple: int) -> int:
  return -(-max(n, 1) // multiple) * multiple


def pack_batch(examples: Sequence[Mapping[str, Any]], *, pad_id: int,
               bucket_lengths: Sequence[int] = DEFAULT_BUCKETS, row_multiple: int = 1,
               hosts: Sequence[Sequence[Mapping[str, Any]]] = (), host: int = 0,
               score_positions: bool = False) -> Batch:
  """`pack` with a shape every host agrees on: this host's `examples` (hosts[host],
  when the global batch's `hosts` are given), in rows of the smallest bucket that
  holds the longest packed example of the global batch (a pair may need up to twice
  the largest bucket: that length is allowed), as many rows as the fullest host
  needs rounded up to `row_multiple`, and a power of two of slots; with
  `score_positions` (pairs, for DPO log-probs), a `score_positions` width that holds
  the fullest row of any host."""
  examples = [_normalise(e) for e in examples]
  hosts = [[_normalise(e) for e in h] for h in hosts] or [examples]
  everything = [e for h in hosts for e in h]
  if not everything:
    raise ValueError("pack_batch: no examples")
  buckets = tuple(bucket_lengths) + (2 * bucket_lengths[-1],)
  length = bucket_length(max(packed_length(e) for e in everything), buckets)
  plans = [plan_rows([packed_length(e) for e in h], length) for h in hosts]
  num_rows = _round_up(max(len(p) for p in plans), row_multiple)
  most = max((len(r) for p in plans for r in p), default=1)
  slots = 1 << (most - 1).bit_length()
  first = sum(len(h) for h in hosts[:host])
  width = None
  if score_positions and _kind(everything[0]) == "pairs":
    # Response targets of the fullest row of any host: hosts agree on the width.
    count = max(sum(len(h[i]["chosen_ids"]) + len(h[i]["rejected_ids"]) for i in r)
                for h, p in zip(hosts, plans) for r in p)
    width = score_width(count, length)
  return pack(examples, plans[host], num_rows=num_rows, length=length, slots=slots,
              pad_id=pad_id, first_index=first, width=width)


@dataclasses.dataclass(frozen=True)
class _Padder:
  """grain batch_fn: a global batch -> this host's rows, padded to the global bucket.

  (A class, not a lambda, so that grain worker processes can pickle it.)
  """
  per_host_batch_size: int
  pad_id: int
  bucket_lengths: tuple[int, ...]
  with_metadata: bool
  process_index: int = 0
  process_count: int = 1
  packing: bool = False
  row_multiple: int = 1
  score_positions: bool = False

  def __call__(self, examples: Sequence[Example]) -> Batch:
    start = self.process_index * self.per_host_batch_size
    if self.packing:
      b = self.per_host_batch_size
      hosts = [examples[i * b:(i + 1) * b] for i in range(self.process_count)]
      batch = pack_batch(hosts[self.process_index], pad_id=self.pad_id,
                         bucket_lengths=self.bucket_lengths,
                         row_multiple=self.row_multiple, hosts=hosts,
                         host=self.process_index,
                         score_positions=self.score_positions)
      if self.with_metadata:
        raise ValueError("with_metadata is not supported with packing")
      return batch
    return pad_batch(examples[start:start + self.per_host_batch_size],
                     batch_size=self.per_host_batch_size, pad_id=self.pad_id,
                     bucket_lengths=self.bucket_lengths,
                     with_metadata=self.with_metadata, length_of=examples,
                     score_positions=self.score_positions)


def _shuffle_seed(seed: int) -> int:
  # grain shuffles epoch e with seed + e; mixing the user seed first keeps runs with
  # seeds s and s + 1 from sharing an epoch order.
  return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


def make_batches(source: Sequence[Example], *, per_host_batch_size: int, pad_id: int,
                 bucket_lengths: Sequence[int] = DEFAULT_BUCKETS, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, process_index: int = 0,
                 process_count: int = 1, with_metadata: bool = False,
                 packing: bool = False, row_multiple: int = 1,
                 score_positions: bool = False) -> grain.MapDataset:
  """Source of tokenized examples -> grain MapDataset of this host's fixed-shape batches.

  Pipeline: source -> shuffle (deterministic in (seed, epoch), different every epoch)
  -> repeat `num_epochs` (None: forever) -> global batches of
  `per_host_batch_size * process_count` -> this host's contiguous block of rows,
  right-padded to the bucket of the whole global batch (`pad_batch`).

  So the global batch is the same whatever the number of hosts (a run resumed on another
  topology sees the same data), every host builds the same shapes, and host i's rows
  are rows [i * per_host, (i + 1) * per_host) of the global batch, the order in which
  `sharding.global_batch` assembles them. Batches run across epoch boundaries; with a
  finite `num_epochs` and drop_remainder=False the last batch is completed with padding
  rows (valid=False) so that shapes stay fixed.

  With `packing`, each host's examples are packed into rows (`pack_batch`: a pair's
  prompt is shared by its two responses) instead of one example per row: the batch
  still holds `per_host_batch_size` examples, in a number of rows that varies with
  their lengths (a multiple of `row_multiple`; give the number of batch shards times
  accum_steps, over the processes) and per-slot arrays; see docs/inputs.md.
  `score_positions`: pairs batches carry the columns of the response targets, where
  DPO's log-probs run the LM head (`score_columns`); the reward model needs none.
  """
  if per_host_batch_size <= 0:
    raise ValueError(f"per_host_batch_size must be positive, got {per_host_batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  buckets = tuple(int(b) for b in bucket_lengths)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
    raise ValueError(f"bucket_lengths must be positive and increasing, got {buckets}")
  ds = grain.MapDataset.source(source)
  if len(ds) == 0:
    raise ValueError("make_batches: the source has no examples")
  if shuffle:
    ds = ds.shuffle(seed=_shuffle_seed(seed))
  ds = ds.repeat(num_epochs)
  if row_multiple <= 0:
    raise ValueError(f"row_multiple must be positive, got {row_multiple}")
  return ds.batch(per_host_batch_size * process_count, drop_remainder=drop_remainder,
                  batch_fn=_Padder(per_host_batch_size, pad_id, buckets, with_metadata,
                                   process_index, process_count, packing, row_multiple,
                                   score_positions))


class BatchIterator(grain.DatasetIterator):
  """A grain iterator whose state also records the pipeline it belongs to.

  `get_state()` is {'next_index': int, 'pipeline': {...}}, JSON-ready; `set_state`
  refuses a state saved by a different pipeline (batch size, seed, hosts, data size),
  which would otherwise resume at a silently wrong position.
  """

  def __init__(self, parent: grain.DatasetIterator, pipeline: Mapping[str, Any]):
    super().__init__(parent)
    self._pipeline = json.loads(json.dumps(dict(pipeline)))  # JSON types only

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return dict(self._parent.get_state()) | {"pipeline": self._pipeline}

  def set_state(self, state: Mapping[str, Any]) -> None:
    state = dict(state)
    saved = state.pop("pipeline", None)
    if saved is not None and saved != self._pipeline:
      diff = {k: (saved.get(k), v) for k, v in self._pipeline.items()
              if saved.get(k) != v}
      raise ValueError(f"input state was saved by a different pipeline; "
                       f"(saved, now): {diff}")
    self._parent.set_state(state)


def make_iterator(source: Sequence[Example], *, num_threads: int = 0,
                  prefetch_buffer_size: int = 4, **batch_options: Any) -> BatchIterator:
  """`make_batches(source, **batch_options)` as an iterator with a restorable state.

  Use num_threads > 0 when the source reads from disk or a bucket (array_record); 0 is
  best for an in-memory HF source (no GIL contention).
  """
  bound = inspect.signature(make_batches).bind(source, **batch_options)
  bound.apply_defaults()
  # What fixes the sequence of global batches; not the host layout (a run may resume
  # on another number of hosts) nor the row layout (packing), and with_metadata only
  # adds columns.
  args = bound.arguments
  pipeline = {k: v for k, v in args.items() if k not in (
      "source", "with_metadata", "per_host_batch_size", "process_index",
      "process_count", "packing", "row_multiple", "score_positions")}
  pipeline["global_batch_size"] = args["per_host_batch_size"] * args["process_count"]
  pipeline["num_examples"] = len(source)
  batches = make_batches(source, **batch_options)
  it = batches.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)).__iter__()
  return BatchIterator(it, pipeline)
