"""Records of the data pipeline, and their JSONL / HF `datasets` input and output.

Every record is a frozen dataclass. Reading validates each line against the dataclass's
type hints; a bad line raises `SchemaError` naming file, line, field and what was
expected, or, in lenient mode, is counted and written to a rejects file with the reason.
Nothing is dropped silently.

This module is part of the lightweight data package: it never imports jax.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import gzip
import json
import os
import types
import typing
import zlib
from typing import IO, Any, Iterable, Iterator, Sequence, TypeVar, Union

from rlhi import fileio

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val", "test")

T = TypeVar("T")


class SchemaError(ValueError):
  """A record does not match its schema. `where` is 'file:line', `field` a dotted path."""

  def __init__(self, message: str, *, where: str = "", field: str = ""):
    self.where = where
    self.field = field
    self.reason = message
    prefix = ": ".join(p for p in (where, f"field '{field}'" if field else "") if p)
    super().__init__(f"{prefix}: {message}" if prefix else message)


# ----------------------------------------------------------------------------------------
# Records.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Message:
  role: str
  content: str
  timestamp: str | None = None  # ISO 8601, UTC.
  turn_identifier: int | None = None

  def __post_init__(self):
    if self.role not in ROLES:
      raise SchemaError(f"expected one of {'/'.join(ROLES)}, got {self.role!r}",
                        field="role")

  def to_chat(self) -> dict[str, str]:
    """The OpenAI / TRL chat form: {'role', 'content'}."""
    return {"role": self.role, "content": self.content}


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One normalised WildChat conversation of one user."""
  conversation_hash: str
  user_id: str
  model: str
  timestamp: str  # ISO 8601 UTC of the conversation start; orders a user's history.
  language: str
  messages: tuple[Message, ...]
  country: str | None = None
  state: str | None = None

  def user_turn_indices(self) -> list[int]:
    return [i for i, m in enumerate(self.messages) if m.role == "user"]

  def follow_up_indices(self) -> list[int]:
    """Indices of user messages that follow an assistant answer."""
    return [i for i in self.user_turn_indices()
            if i > 0 and self.messages[i - 1].role == "assistant"]


@dataclasses.dataclass(frozen=True)
class User:
  """A user's conversations, split into history (persona only) and targets."""
  user_id: str
  split: str
  history: tuple[str, ...]  # conversation hashes, oldest first
  targets: tuple[str, ...]  # conversation hashes, oldest first

  def __post_init__(self):
    if self.split not in SPLITS:
      raise SchemaError(f"expected one of {'/'.join(SPLITS)}, got {self.split!r}",
                        field="split")


@dataclasses.dataclass(frozen=True)
class FollowUp:
  """A classified user message that follows an assistant answer."""
  conversation_hash: str
  message_index: int  # index of the user follow-up in Conversation.messages
  user_id: str
  split: str
  part: str  # 'history' or 'target'
  label: str
  actionable: bool
  feedback: str
  rationale: str


@dataclasses.dataclass(frozen=True)
class Persona:
  """A persona card inferred from a user's history conversations only."""
  user_id: str
  summary: str
  preferences: tuple[str, ...] = ()
  expertise: str = ""
  recurring_topics: tuple[str, ...] = ()
  dislikes: tuple[str, ...] = ()
  source_conversations: tuple[str, ...] = ()  # hashes it was inferred from (history)

  def to_text(self) -> str:
    """The persona as it goes into a system prompt."""
    lines = [self.summary.strip()]
    if self.preferences:
      lines.append("Preferences: " + "; ".join(self.preferences))
    if self.expertise:
      lines.append("Expertise: " + self.expertise)
    if self.recurring_topics:
      lines.append("Recurring topics: " + "; ".join(self.recurring_topics))
    if self.dislikes:
      lines.append("Dislikes: " + "; ".join(self.dislikes))
    return "\n".join(lines)


# How Persona.to_text() goes into the system slot: training's default
# (configs data.system_template), the reward model's saved template and persona-guided
# inference all start from this one, so a model is evaluated the way it was trained.
PERSONA_TEMPLATE = "About the user:\n{persona}"


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """A preference pair in TRL's conversational form, plus persona and provenance.

  `prompt` is the conversation up to and including the user request (no system
  message: the persona is kept apart so that training can include or ablate it).
  """
  pair_id: str
  user_id: str
  split: str
  prompt: tuple[Message, ...]
  chosen: str
  rejected: str
  persona: str | None  # Persona.to_text(), or None
  source: str  # 'rewrite', 'user_reward', ...
  conversation_hash: str = ""
  message_index: int = -1  # index of the answer that was rewritten
  label: str = ""  # follow-up label that triggered the pair
  feedback: str = ""

  def to_trl(self, with_persona: bool = True, system_template: str = "{persona}"
             ) -> dict[str, Any]:
    """TRL conversational format: prompt/chosen/rejected as lists of messages."""
    prompt = [m.to_chat() for m in self.prompt]
    if with_persona and self.persona:
      prompt = [{"role": "system",
                 "content": system_template.format(persona=self.persona)}] + prompt
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": self.chosen}],
        "rejected": [{"role": "assistant", "content": self.rejected}],
    }


# ----------------------------------------------------------------------------------------
# Validation: dict -> dataclass, guided by type hints.
# ----------------------------------------------------------------------------------------

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a bool",
               type(None): "null", dict: "an object"}


def _describe(tp: Any) -> str:
  if tp in _TYPE_NAMES:
    return _TYPE_NAMES[tp]
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    return " or ".join(_describe(a) for a in typing.get_args(tp))
  if origin is tuple:
    return f"a list of {_describe(typing.get_args(tp)[0])}"
  if dataclasses.is_dataclass(tp):
    return f"an object ({tp.__name__})"
  return str(tp)


def _convert(value: Any, tp: Any, field: str) -> Any:
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    for arg in typing.get_args(tp):
      try:
        return _convert(value, arg, field)
      except SchemaError:
        continue
    raise SchemaError(f"expected {_describe(tp)}, got {_short(value)}", field=field)
  if tp is type(None):
    if value is None:
      return None
  elif tp is bool:
    if isinstance(value, bool):
      return value
  elif tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif tp is str:
    if isinstance(value, str):
      return value
  elif tp is dict or origin is dict:
    if isinstance(value, dict):
      return value
  elif origin is tuple:
    if isinstance(value, (list, tuple)):
      (item_tp, *_) = typing.get_args(tp)
      return tuple(_convert(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value))
  elif dataclasses.is_dataclass(tp):
    if isinstance(value, dict):
      return from_dict(tp, value, field=field)
  else:
    raise TypeError(f"schema: unsupported type {tp} for field {field}")
  raise SchemaError(f"expected {_describe(tp)}, got {_short(value)}", field=field)


def _short(value: Any) -> str:
  text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
  kind = type(value).__name__ if value is not None else "null"
  return f"{kind} {text[:60]}{'...' if len(text) > 60 else ''}"


def from_dict(cls: type[T], data: dict[str, Any], field: str = "") -> T:
  """Builds dataclass `cls` from a JSON object, validating every field."""
  if not isinstance(data, dict):
    raise SchemaError(f"expected an object ({cls.__name__}), got {_short(data)}",
                      field=field)
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise SchemaError(f"unknown field(s) {unknown} for {cls.__name__}; "
                      f"expected {sorted(fields)}", field=field)
  kwargs = {}
  for name, f in fields.items():
    path = f"{field}.{name}" if field else name
    if name not in data:
      if (f.default is dataclasses.MISSING
          and f.default_factory is dataclasses.MISSING):
        raise SchemaError(f"missing (expected {_describe(hints[name])})", field=path)
      continue
    kwargs[name] = _convert(data[name], hints[name], path)
  try:
    return cls(**kwargs)
  except SchemaError as e:  # raised by __post_init__ checks
    raise SchemaError(e.reason, field=f"{field}.{e.field}" if field else e.field)


def to_dict(record: Any) -> dict[str, Any]:
  """Dataclass -> JSON-ready dict (tuples become lists)."""
  return dataclasses.asdict(record)


# ----------------------------------------------------------------------------------------
# JSONL.
# ----------------------------------------------------------------------------------------


def dumps(record: Any) -> str:
  """One canonical JSON line: stable key order, so re-runs are byte-identical."""
  data = to_dict(record) if dataclasses.is_dataclass(record) else record
  return json.dumps(data, ensure_ascii=False, sort_keys=True)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
  """Writes records atomically (temp file + rename); returns the count.

  `path` may be local or remote (gs://...; see rlhi.fileio).
  """
  path = os.fspath(path)
  fileio.makedirs(os.path.dirname(path) or ".")
  n = 0
  with fileio.atomic_write(path, "w", newline="\n") as f:
    for r in records:
      f.write(dumps(r) + "\n")
      n += 1
  return n


@dataclasses.dataclass(frozen=True)
class Reject:
  """An input that did not make it into an output, and why."""
  source: str  # file path or data set name
  line: int  # 1-based line (JSONL), element (JSON array) or row number (other sources)
  reason: str  # short machine-readable code, e.g. 'malformed_json', 'toxic'
  detail: str  # human-readable: field, expected, got
  key: str = ""  # conversation hash or item key, when known
  raw: str = ""  # the start of the offending input, for inspection


@contextlib.contextmanager
def open_bytes(path: str | os.PathLike) -> Iterator[IO[bytes]]:
  """Opens `path` for reading bytes, gunzipping it if its name ends in '.gz'.

  `path` may be local or remote (gs://...; see rlhi.fileio). A corrupt or truncated
  gzip file raises ValueError naming the path: its rows cannot be counted, so it stops
  the reader rather than ending the file early without a word.
  """
  path = os.fspath(path)
  with fileio.open(path, "rb") as f:
    if not path.endswith(".gz"):
      yield f
      return
    with gzip.GzipFile(fileobj=f, mode="rb") as g:
      try:
        yield g
      except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e})") from e


def iter_json_lines(path: str | os.PathLike
                    ) -> Iterator[tuple[int, Any | None, Reject | None]]:
  """Yields (line_no, parsed object, None) or (line_no, None, Reject) per non-blank line.

  Reads bytes so that one line of invalid UTF-8 is one reject, not a crash. A UTF-8 byte
  order mark at the start of the file is dropped (editors on Windows write one; JSON does
  not allow it). A '.gz' file is gunzipped. `path` may be local or remote (gs://...; see
  rlhi.fileio).
  """
  path = os.fspath(path)
  with open_bytes(path) as f:
    for line_no, raw in enumerate(f, start=1):
      if line_no == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)
      if not raw.strip():
        continue
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield line_no, None, Reject(
            path, line_no, "invalid_utf8", f"invalid UTF-8 at byte {e.start}",
            raw=raw[:200].decode("utf-8", "replace"))
        continue
      try:
        yield line_no, json.loads(text), None
      except json.JSONDecodeError as e:
        yield line_no, None, Reject(path, line_no, "malformed_json",
                                    f"invalid JSON: {e.msg} at column {e.colno}",
                                    raw=text[:200])


def read_jsonl(path: str | os.PathLike, cls: type[T], *, lenient: bool = False,
               rejects: list[Reject] | None = None) -> list[T]:
  """Reads and validates a JSONL file of `cls` records.

  Strict (default): the first bad line raises SchemaError with 'file:line', the field
  and what was expected. Lenient: bad lines are appended to `rejects` (required) and
  skipped; the caller writes them out with `write_jsonl`.
  """
  if lenient and rejects is None:
    raise ValueError("read_jsonl(lenient=True) needs a `rejects` list to fill")
  out = []
  for line_no, obj, reject in iter_json_lines(path):
    try:
      if reject is not None:
        raise SchemaError(reject.detail, where=f"{reject.source}:{line_no}")
      out.append(from_dict(cls, obj))
    except SchemaError as e:
      where = f"{os.fspath(path)}:{line_no}"
      if not lenient:
        if e.where:
          raise
        raise SchemaError(e.reason, where=where, field=e.field) from None
      reason = reject.reason if reject else "schema"
      detail = e.reason if not e.field else f"field '{e.field}': {e.reason}"
      rejects.append(Reject(os.fspath(path), line_no, reason, detail,
                            raw=(reject.raw if reject else json.dumps(obj)[:200])))
  return out


# ----------------------------------------------------------------------------------------
# HF datasets (imported lazily: it is heavy, and not every stage needs it).
# ----------------------------------------------------------------------------------------


def to_hf_dataset(records: Sequence[Any]):
  """Records -> datasets.Dataset (one column per field; nested records as structs)."""
  import datasets  # pylint: disable=g-import-not-at-top
  return datasets.Dataset.from_list([to_dict(r) for r in records])


def from_hf_dataset(ds, cls: type[T]) -> list[T]:
  """datasets.Dataset -> validated records; errors name the row and field."""
  out = []
  for i, row in enumerate(ds):
    try:
      out.append(from_dict(cls, dict(row)))
    except SchemaError as e:
      raise SchemaError(e.reason, where=f"dataset row {i}", field=e.field) from None
  return out
