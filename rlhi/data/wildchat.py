"""WildChat rows -> clean conversations, users, and user-level splits.

Input: rows in the WildChat-1M schema (HF `allenai/WildChat-1M`, or a local copy as
.jsonl, .jsonl.gz, .json (an array, or one object per line) or .parquet, a file or a
directory of files; see `iter_rows`). Each row either becomes a `Conversation` or a
`Reject` with a reason code; `IngestResult.counts` counts both, so
`rows_read == kept + sum(rejected by reason)` always holds. A file in a source directory
that is of no supported kind is not read; it is listed in counts["skipped_files"].

Reason codes, checked in this order (the first that applies is the one counted):
  malformed_json, invalid_utf8          the line is not a JSON object in UTF-8
  invalid_text                          a string anywhere in the row (a key or a value,
                                        used or not) cannot be written as UTF-8: a lone
                                        surrogate, from a JSON escape such as "\\ud83d"
                                        without its low half. The row is rejected, not
                                        repaired: a repaired hashed_ip could merge two
                                        users. In the reject (and in every reject field)
                                        such characters are written as "\\ud83d" text.
  missing_field, wrong_type, bad_role   the row does not match the WildChat schema
  language                              row language not in `languages` (if set)
  toxic                                 row or any message flagged toxic (if drop_toxic)
  redacted                              row flagged redacted (if drop_redacted)
  empty_message                         a message is empty or whitespace only
  non_alternating_roles                 not user/assistant alternating, starting with
                                        user and ending with assistant
  too_few_turns, too_many_turns         user turns outside [min_turns, max_turns]
  message_too_long                      a message over max_message_chars characters
  duplicate_hash                        the conversation_hash of a row already kept
                                        (a copy of a rejected row gets its reason)

Users are grouped by `user_key` (row fields; default the hashed IP, optionally with the
user agent). A user's conversations are ordered by (timestamp, hash). The split of a user
is a pure function of (salt, user id) through SHA-256, so it is the same on every run and
machine; no user is in two splits. Within a user, the earlier conversations are history
(persona only) and the later are targets, by `target_rule`.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

from rlhi.data import schema
from rlhi.data.schema import Conversation, Message, Reject, User

REASONS = (
    "malformed_json", "invalid_utf8", "invalid_text", "missing_field", "wrong_type",
    "bad_role", "language", "toxic", "redacted", "empty_message", "non_alternating_roles",
    "too_few_turns", "too_many_turns", "message_too_long", "duplicate_hash",
)

# Fields of a WildChat-1M row that this module reads, and their JSON types.
_ROW_REQUIRED = {"conversation_hash": str, "model": str, "conversation": list}
_USER_KEY_FIELDS = ("hashed_ip", "user_agent", "country", "state")


@dataclasses.dataclass(frozen=True)
class IngestConfig:
  languages: tuple[str, ...] = ("English",)  # empty: keep all languages
  drop_toxic: bool = True
  drop_redacted: bool = False
  min_turns: int = 1
  max_turns: int = 20
  max_message_chars: int = 32_000
  user_key: tuple[str, ...] = ("hashed_ip",)
  split_fractions: tuple[tuple[str, float], ...] = (
      ("train", 0.8), ("val", 0.1), ("test", 0.1))
  split_salt: str = "rlhi-v1"
  target_rule: str = "last_k"  # 'last_k' | 'fraction' | 'after'
  num_targets: int = 2  # last_k: the newest k conversations are targets
  target_fraction: float = 0.4  # fraction: the newest ceil(f * n) are targets
  targets_after: str = ""  # after: conversations starting at/after this ISO time

  def __post_init__(self):
    bad = [k for k in self.user_key if k not in _USER_KEY_FIELDS]
    if bad or not self.user_key:
      raise ValueError(f"ingest.user_key: unknown field(s) {bad}; "
                       f"expected a non-empty subset of {_USER_KEY_FIELDS}")
    names = [n for n, _ in self.split_fractions]
    if sorted(names) != sorted(schema.SPLITS):
      raise ValueError(f"ingest.split_fractions: expected fractions for "
                       f"{schema.SPLITS}, got {names}")
    total = sum(f for _, f in self.split_fractions)
    if abs(total - 1.0) > 1e-6 or any(f < 0 for _, f in self.split_fractions):
      raise ValueError(f"ingest.split_fractions: expected non-negative fractions "
                       f"summing to 1, got {dict(self.split_fractions)} (sum {total})")
    if self.target_rule not in ("last_k", "fraction", "after"):
      raise ValueError(f"ingest.target_rule: expected last_k, fraction or after, "
                       f"got {self.target_rule!r}")
    if self.target_rule == "after":
      _parse_time(self.targets_after, "ingest.targets_after")
    if self.min_turns < 1 or self.max_turns < self.min_turns:
      raise ValueError(f"ingest.min_turns/max_turns: expected 1 <= min_turns <= "
                       f"max_turns, got {self.min_turns}, {self.max_turns}")

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "IngestConfig":
    """From an ml_collections ConfigDict (or dict); unknown keys are errors."""
    cfg = dict(cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
      raise ValueError(f"ingest config: unknown key(s) {unknown}; known {sorted(fields)}")
    if "split_fractions" in cfg:
      cfg["split_fractions"] = tuple((k, float(v)) for k, v in
                                     dict(cfg["split_fractions"]).items())
    for k in ("languages", "user_key"):
      if k in cfg:
        cfg[k] = tuple(cfg[k])
    return cls(**cfg)


class RowError(Exception):
  """A row that cannot become a conversation. `reason` is one of REASONS."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


# ----------------------------------------------------------------------------------------
# Reading rows.
# ----------------------------------------------------------------------------------------


# Local files this module reads, by name ending (case-insensitive).
SUPPORTED_FILES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
# The reason of the marker that `iter_rows` yields for a file it does not read; `ingest`
# lists these files under counts["skipped_files"] and does not count them as rows.
SKIPPED_FILE = "skipped_file"


def _is_supported(path: str) -> bool:
  return path.lower().endswith(SUPPORTED_FILES)


def _walk(path: str) -> list[str]:
  """All files under `path`, sorted, so that every run reads them in the same order."""
  return sorted(os.path.join(root, name)
                for root, _, names in os.walk(path) for name in names)


def iter_rows(source: str, *, hf_split: str = "train", streaming: bool = False
              ) -> Iterator[tuple[str, int, dict[str, Any] | None, Reject | None]]:
  """Yields (source, row number, row, None) or (source, row number, None, reject).

  `source` is an HF hub id, or a local file or directory of files ending in one of
  SUPPORTED_FILES:
    .jsonl, .jsonl.gz   one JSON object per line; the row number is the line number.
                        Read line by line rather than through `datasets`' json builder,
                        which stops at the first bad line: here a bad line is one
                        counted reject and the rest is read.
    .json, .json.gz     a JSON array of rows if the first non-blank character is '[',
                        and the row number is the 1-based element number; otherwise
                        one object per line, as .jsonl.
    .parquet            through `datasets`; the row number counts from 1.
  A directory is read file by file in sorted path order; a file in it with any other
  ending is not read, and is yielded as a (path, 0, None, reject) marker with reason
  SKIPPED_FILE, so that the report names it. A file of another kind given directly is
  a ValueError, and so is a file that cannot be read as a whole (a corrupt gzip file, a
  JSON array that does not parse): their rows cannot be counted.
  """
  if os.path.isdir(source):
    files = _walk(source)
    if not any(_is_supported(p) for p in files):
      raise FileNotFoundError(f"ingest.source: {source}: no {', '.join(SUPPORTED_FILES)} "
                              f"files in directory ({len(files)} other files)")
    for path in files:
      if _is_supported(path):
        yield from _iter_file(path, streaming)
      else:
        yield path, 0, None, Reject(path, 0, SKIPPED_FILE,
                                    f"not one of {', '.join(SUPPORTED_FILES)}")
  elif os.path.exists(source):
    if not _is_supported(source):
      raise ValueError(f"ingest.source: {source}: unsupported file type; expected a "
                       f"directory, an HF hub id or a file ending in "
                       f"{', '.join(SUPPORTED_FILES)}")
    yield from _iter_file(source, streaming)
  else:
    if source.startswith((".", "/")) or _is_supported(source):
      raise FileNotFoundError(f"ingest.source: {source}: no such file or directory")
    yield from _iter_datasets(source, None, hf_split=hf_split, streaming=streaming)


def _iter_file(path: str, streaming: bool):
  """The rows of one local file of a supported kind."""
  name = path.lower()
  if name.endswith(".parquet"):
    yield from _iter_datasets("parquet", path, hf_split="train", streaming=streaming)
    return
  if name.endswith((".json", ".json.gz")) and _starts_with_bracket(path):
    items, unit = _iter_json_array(path), "array element"
  else:
    items, unit = schema.iter_json_lines(path), "line"
  for row_no, obj, reject in items:
    if reject is None and not isinstance(obj, dict):
      reject = Reject(path, row_no, "wrong_type",
                      f"expected a JSON object per {unit}, got {type(obj).__name__}",
                      raw=str(obj)[:200])
    yield path, row_no, (None if reject else obj), reject


def _starts_with_bracket(path: str) -> bool:
  """Whether the first character after any BOM and white space is '['."""
  with schema.open_bytes(path) as f:
    head = f.read(len(codecs.BOM_UTF8)).removeprefix(codecs.BOM_UTF8)
    while not head.strip():
      chunk = f.read(4096)
      if not chunk:
        return False
      head += chunk
    return head.lstrip().startswith(b"[")


def _iter_json_array(path: str) -> Iterator[tuple[int, Any | None, Reject | None]]:
  """(element number, element, None) for each element of a JSON array file.

  A file that holds several JSON values is JSON lines whose first row happens to be an
  array (a malformed row): it is read line by line instead.
  """
  with schema.open_bytes(path) as f:
    data = f.read().removeprefix(codecs.BOM_UTF8)
  try:
    elements = json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: a JSON array with invalid UTF-8 at byte {e.start}; "
                     f"its rows cannot be told apart, so none was read") from None
  except json.JSONDecodeError as e:
    if e.msg == "Extra data":
      yield from schema.iter_json_lines(path)
      return
    raise ValueError(f"{path}: not a valid JSON array ({e.msg} at line {e.lineno} "
                     f"column {e.colno}); its rows cannot be told apart, so none was "
                     f"read") from None
  for i, obj in enumerate(elements, start=1):
    yield i, obj, None


def _iter_datasets(name: str, data_files: str | None, *, hf_split: str,
                   streaming: bool):
  import datasets  # pylint: disable=g-import-not-at-top  (heavy; only for these sources)
  ds = datasets.load_dataset(name, data_files=data_files, split=hf_split,
                             streaming=streaming)
  label = data_files or f"{name}[{hf_split}]"
  for i, row in enumerate(ds, start=1):
    yield label, i, row, None


# ----------------------------------------------------------------------------------------
# One row -> one conversation.
# ----------------------------------------------------------------------------------------


def _parse_time(value: Any, field: str) -> dt.datetime:
  if isinstance(value, dt.datetime):
    t = value
  elif value is None:
    raise RowError("missing_field", f"field '{field}' is missing")
  elif isinstance(value, str):
    try:
      t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
      raise RowError("wrong_type", f"field '{field}': expected an ISO 8601 time, "
                                   f"got {value[:40]!r}") from None
  else:
    raise RowError("wrong_type", f"field '{field}': expected an ISO 8601 time, "
                                 f"got {type(value).__name__}")
  if t.tzinfo is None:  # WildChat times are UTC; parquet gives naive datetimes.
    t = t.replace(tzinfo=dt.timezone.utc)
  return t.astimezone(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
  return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _user_agent(row: Mapping[str, Any]) -> str | None:
  header = row.get("header")
  if isinstance(header, Mapping):
    return header.get("user-agent") or header.get("user_agent")
  return None


def user_id_of(row: Mapping[str, Any], user_key: Sequence[str]) -> str:
  """The user id: the hashed IP alone, or a hash over several key fields."""
  values = []
  for name in user_key:
    value = _user_agent(row) if name == "user_agent" else row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
      raise RowError("missing_field", f"field '{name}' (user key) is missing or empty")
    if not isinstance(value, str):
      raise RowError("wrong_type", f"field '{name}' (user key): expected a string, "
                                   f"got {type(value).__name__}")
    values.append(value)
  if len(values) == 1:
    return values[0]
  return hashlib.sha256("\x1f".join(values).encode()).hexdigest()[:32]


def _flag(value: Any, field: str) -> bool:
  if value is None:
    return False
  if not isinstance(value, bool):
    raise RowError("wrong_type", f"field '{field}': expected a bool, "
                                 f"got {type(value).__name__}")
  return value


def _check_text(value: Any, field: str = "") -> None:
  """Raises RowError('invalid_text') at the first string in `value` that is not text.

  A lone surrogate passes json.loads but no UTF-8 writer: caught here, it is one
  reject naming its field, rather than a crash when the outputs are written.
  """
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      raise RowError("invalid_text", f"field '{_printable(field)}': "
                                     f"{value[e.start]!r} at character {e.start} is "
                                     f"a lone surrogate, not text") from None
  elif isinstance(value, Mapping):
    for k, v in value.items():
      path = f"{field}.{k}" if field else str(k)
      _check_text(k, path)
      _check_text(v, path)
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      _check_text(v, f"{field}[{i}]")


def _printable(text: str) -> str:
  """`text` with lone surrogates written as backslash escapes, so it can be written."""
  return text.encode("utf-8", "backslashreplace").decode("utf-8")


def normalize_row(row: Mapping[str, Any], cfg: IngestConfig) -> Conversation:
  """Validates a WildChat row and applies the content filters; raises RowError."""
  _check_text(row)
  for name, tp in _ROW_REQUIRED.items():
    if name not in row or row[name] is None:
      raise RowError("missing_field", f"field '{name}' is missing")
    if not isinstance(row[name], tp):
      raise RowError("wrong_type", f"field '{name}': expected {tp.__name__}, "
                                   f"got {type(row[name]).__name__}")
  if not row["conversation"]:
    raise RowError("missing_field", "field 'conversation' is an empty list")
  user_id = user_id_of(row, cfg.user_key)
  start = _parse_time(row.get("timestamp"), "timestamp")

  messages = []
  any_toxic = _flag(row.get("toxic"), "toxic")
  for i, m in enumerate(row["conversation"]):
    where = f"conversation[{i}]"
    if not isinstance(m, Mapping):
      raise RowError("wrong_type", f"field '{where}': expected an object, "
                                   f"got {type(m).__name__}")
    role, content = m.get("role"), m.get("content")
    if role is None:
      raise RowError("missing_field", f"field '{where}.role' is missing")
    if not isinstance(role, str):
      raise RowError("wrong_type", f"field '{where}.role': expected a string, "
                                   f"got {type(role).__name__}")
    if role not in ("user", "assistant"):
      raise RowError("bad_role", f"field '{where}.role': expected user or assistant, "
                                 f"got {role!r}")
    if content is None:
      raise RowError("missing_field", f"field '{where}.content' is missing")
    if not isinstance(content, str):
      raise RowError("wrong_type", f"field '{where}.content': expected a string, "
                                   f"got {type(content).__name__}")
    any_toxic |= _flag(m.get("toxic"), f"{where}.toxic")
    ts = m.get("timestamp")
    turn_id = m.get("turn_identifier")
    if turn_id is not None and (not isinstance(turn_id, int) or isinstance(turn_id, bool)):
      raise RowError("wrong_type", f"field '{where}.turn_identifier': expected an "
                                   f"integer, got {type(turn_id).__name__}")
    messages.append(Message(role=role, content=content,
                            timestamp=_iso(_parse_time(ts, f"{where}.timestamp"))
                            if ts is not None else None,
                            turn_identifier=turn_id))

  language = row.get("language")
  if language is not None and not isinstance(language, str):
    raise RowError("wrong_type", f"field 'language': expected a string, "
                                 f"got {type(language).__name__}")
  language = language or ""
  if cfg.languages and language not in cfg.languages:
    raise RowError("language", f"language {language!r} not in {list(cfg.languages)}")
  if cfg.drop_toxic and any_toxic:
    raise RowError("toxic", "row or message flagged toxic")
  if cfg.drop_redacted and _flag(row.get("redacted"), "redacted"):
    raise RowError("redacted", "row flagged redacted")
  for i, m in enumerate(messages):
    if not m.content.strip():
      raise RowError("empty_message", f"conversation[{i}] ({m.role}) is empty")
  for i, m in enumerate(messages):
    expected = "user" if i % 2 == 0 else "assistant"
    if m.role != expected:
      raise RowError("non_alternating_roles",
                     f"conversation[{i}] is {m.role}, expected {expected}")
  if messages[-1].role != "assistant":
    raise RowError("non_alternating_roles",
                   "the last message is from the user (no answer)")
  turns = len(messages) // 2
  if turns < cfg.min_turns:
    raise RowError("too_few_turns", f"{turns} user turns < min_turns {cfg.min_turns}")
  if turns > cfg.max_turns:
    raise RowError("too_many_turns", f"{turns} user turns > max_turns {cfg.max_turns}")
  for i, m in enumerate(messages):
    if len(m.content) > cfg.max_message_chars:
      raise RowError("message_too_long", f"conversation[{i}] has {len(m.content)} "
                                         f"characters > {cfg.max_message_chars}")
  return Conversation(
      conversation_hash=row["conversation_hash"], user_id=user_id, model=row["model"],
      timestamp=_iso(start), language=language, messages=tuple(messages),
      country=row.get("country") if isinstance(row.get("country"), str) else None,
      state=row.get("state") if isinstance(row.get("state"), str) else None)


# ----------------------------------------------------------------------------------------
# Users and splits.
# ----------------------------------------------------------------------------------------


def split_of(user_id: str, cfg: IngestConfig) -> str:
  """Deterministic split of a user: SHA-256 of (salt, id) mapped to [0, 1)."""
  digest = hashlib.sha256(f"{cfg.split_salt}\x1f{user_id}".encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  edge = 0.0
  for name, frac in cfg.split_fractions:
    edge += frac
    if u < edge:
      return name
  return cfg.split_fractions[-1][0]  # u within rounding of 1.0


def num_targets(convs: Sequence[Conversation], cfg: IngestConfig) -> int:
  """How many of a user's time-ordered conversations are targets."""
  n = len(convs)
  if cfg.target_rule == "last_k":
    return min(cfg.num_targets, n)
  if cfg.target_rule == "fraction":
    return min(n, math.ceil(cfg.target_fraction * n - 1e-9))
  cut = _parse_time(cfg.targets_after, "ingest.targets_after")
  return sum(1 for c in convs if _parse_time(c.timestamp, "timestamp") >= cut)


def build_users(conversations: Iterable[Conversation], cfg: IngestConfig
                ) -> tuple[list[Conversation], list[User]]:
  """Groups by user, orders by time, assigns splits and history/targets.

  Returns conversations sorted by (user, time, hash) and users sorted by id.
  """
  by_user: dict[str, list[Conversation]] = collections.defaultdict(list)
  for c in conversations:
    by_user[c.user_id].append(c)
  ordered, users = [], []
  for user_id in sorted(by_user):
    convs = sorted(by_user[user_id], key=lambda c: (c.timestamp, c.conversation_hash))
    k = num_targets(convs, cfg)
    hashes = [c.conversation_hash for c in convs]
    users.append(User(user_id=user_id, split=split_of(user_id, cfg),
                      history=tuple(hashes[:len(hashes) - k]),
                      targets=tuple(hashes[len(hashes) - k:])))
    ordered.extend(convs)
  return ordered, users


# ----------------------------------------------------------------------------------------
# The whole ingestion.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class IngestResult:
  conversations: list[Conversation]
  users: list[User]
  rejects: list[Reject]
  counts: dict[str, Any]


def ingest(rows: Iterable[tuple[str, int, dict[str, Any] | None, Reject | None]],
           cfg: IngestConfig) -> IngestResult:
  """Rows (from `iter_rows`) -> conversations, users, rejects and counts."""
  kept: list[Conversation] = []
  rejects: list[Reject] = []
  seen: set[str] = set()
  skipped_files: list[str] = []
  rows_read = 0
  for source, row_no, row, reject in rows:
    if reject is not None and reject.reason == SKIPPED_FILE:  # a file, not a row
      skipped_files.append(_printable(source))
      continue
    rows_read += 1
    if reject is None:
      key = row.get("conversation_hash") if isinstance(
          row.get("conversation_hash"), str) else ""
      try:
        conv = normalize_row(row, cfg)
        if conv.conversation_hash in seen:
          raise RowError("duplicate_hash", f"conversation_hash {key} seen earlier")
        seen.add(conv.conversation_hash)
        kept.append(conv)
        continue
      except RowError as e:
        # default=str: parquet rows hold datetimes, which JSON has no type for.
        reject = Reject(source, row_no, e.reason, e.detail, key=key,
                        raw=json.dumps(row, ensure_ascii=False, sort_keys=True,
                                       default=str)[:200])
    # A rejected row may hold text that cannot be written (invalid_text); so may a
    # path from the file system. Escaped here, the rejects file can always be written.
    rejects.append(dataclasses.replace(
        reject, source=_printable(reject.source), detail=_printable(reject.detail),
        key=_printable(reject.key), raw=_printable(reject.raw)))

  conversations, users = build_users(kept, cfg)
  return IngestResult(conversations, users, rejects,
                      _counts(rows_read, conversations, users, rejects, skipped_files))


def _counts(rows_read: int, conversations: Sequence[Conversation],
            users: Sequence[User], rejects: Sequence[Reject],
            skipped_files: Sequence[str]) -> dict[str, Any]:
  by_reason = collections.Counter(r.reason for r in rejects)
  turns = collections.Counter(len(c.messages) // 2 for c in conversations)
  conv_by_hash = {c.conversation_hash: c for c in conversations}
  per_split: dict[str, dict[str, int]] = {
      s: collections.Counter() for s in schema.SPLITS}
  for u in users:
    c = per_split[u.split]
    c["users"] += 1
    c["users_without_history"] += not u.history
    for part, hashes in (("history", u.history), ("target", u.targets)):
      c[f"{part}_conversations"] += len(hashes)
      c[f"{part}_follow_ups"] += sum(
          len(conv_by_hash[h].follow_up_indices()) for h in hashes)
  return {
      "rows_read": rows_read,
      "kept": len(conversations),
      "rejected": {r: by_reason.get(r, 0) for r in REASONS if by_reason.get(r)},
      "skipped_files": list(skipped_files),
      "users": len(users),
      "splits": {s: dict(sorted(per_split[s].items())) for s in schema.SPLITS},
      "user_turns_histogram": {str(k): turns[k] for k in sorted(turns)},
  }


SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")
# The bundled sample: hand-written conversations in the exact WildChat-1M row schema.
SAMPLE_ROWS = os.path.join(SAMPLES_DIR, "wildchat_sample.jsonl")
# Deliberately malformed rows, for tests of the error paths.
MALFORMED_ROWS = os.path.join(SAMPLES_DIR, "malformed_rows.jsonl")
