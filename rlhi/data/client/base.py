"""The inference-client interface: requests, results, InferenceClient and the cache.

See the package docstring (rlhi/data/client/__init__.py) for the whole contract. Never
imports jax.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from tqdm import auto as tqdm_auto

_LOG = logging.getLogger(__name__)

STAT_KEYS = ("requests", "sent", "cached", "failed", "retries", "prompt_tokens",
             "completion_tokens")

# ----------------------------------------------------------------------------------------
# Records.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """One chat completion to make."""
  key: str  # Stable item id, e.g. "classify/<hash>/3"; names results and rejects.
  messages: tuple[dict[str, str], ...]  # OpenAI chat messages {"role", "content"}.
  temperature: float = 0.0
  top_p: float = 1.0
  max_tokens: int = 512
  json_mode: bool = False  # Wants a JSON object (how: config `structured_output`).
  # The answer's JSON schema, as canonical JSON of {"name", "schema"}
  # (prompting.schema_text); sent with structured_output='json_schema'.
  json_schema: str = ""
  seed: int | None = None  # Sent when set; distinct seeds = distinct cache entries.

  def __post_init__(self):
    if not isinstance(self.key, str) or not self.key:
      raise ValueError(f"ChatRequest.key must be a non-empty string, got {self.key!r}")
    if isinstance(self.messages, list):
      object.__setattr__(self, "messages", tuple(self.messages))
    if not isinstance(self.messages, tuple) or not self.messages:
      raise ValueError(f"ChatRequest {self.key!r}: messages must be a non-empty tuple of "
                       f"{{'role', 'content'}} dicts, got {type(self.messages).__name__}")
    for i, m in enumerate(self.messages):
      if (not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or
          not isinstance(m.get("content"), str)):
        raise ValueError(f"ChatRequest {self.key!r}: messages[{i}] must be a dict with "
                         f"string 'role' and 'content', got {m!r:.200}")
    for name in ("temperature", "top_p"):
      value = getattr(self, name)
      if (not isinstance(value, (int, float)) or isinstance(value, bool) or
          not math.isfinite(value)):
        raise ValueError(f"ChatRequest {self.key!r}: {name} must be a finite number, "
                         f"got {value!r}")
    if self.seed is not None and (not isinstance(self.seed, int) or
                                  isinstance(self.seed, bool)):
      raise ValueError(f"ChatRequest {self.key!r}: seed must be an int or None, got "
                       f"{self.seed!r}")
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise ValueError(f"ChatRequest {self.key!r}: max_tokens must be a positive int, "
                       f"got {self.max_tokens!r}")


@dataclasses.dataclass
class ChatResult:
  """The answer to one ChatRequest: `text`, or `text=None` and the reason in `error`."""
  key: str
  text: str | None
  error: str | None = None
  prompt_tokens: int = 0
  completion_tokens: int = 0
  cached: bool = False
  attempts: int = 0  # HTTP attempts made for this result (0 when cached or reference).

  @property
  def ok(self) -> bool:
    return self.text is not None


OnResult = Callable[[int, ChatResult], None]

# ----------------------------------------------------------------------------------------
# The interface.
# ----------------------------------------------------------------------------------------


class InferenceClient(abc.ABC):
  """Answers batches of ChatRequests; see the module docstring."""

  name: str = "?"  # For reports; never holds a secret.
  kind: str = "?"  # Backend kind; part of the cache key.

  def __init__(self):
    self._stats_lock = threading.Lock()
    self._counters = collections.Counter({k: 0 for k in STAT_KEYS})

  def chat(self, requests: Sequence[ChatRequest], *,
           desc: str | None = None) -> list[ChatResult]:
    """Answers `requests` in order; failures come back as results with `error` set.

    Args:
      requests: the requests; any order, duplicates allowed.
      desc: when given, a tqdm progress bar with this label.

    Returns:
      One ChatResult per request, in the same order.
    """
    requests = list(requests)
    for i, r in enumerate(requests):
      if not isinstance(r, ChatRequest):
        raise TypeError(f"chat(): requests[{i}] is a {type(r).__name__}, not a ChatRequest")
    results: list[ChatResult | None] = [None] * len(requests)
    bar = (tqdm_auto.tqdm(total=len(requests), desc=desc, unit="req", smoothing=0.1)
           if desc is not None else None)

    def on_result(i: int, result: ChatResult) -> None:
      results[i] = result
      if bar is not None:
        bar.update(1)

    try:
      if requests:
        self._answer(requests, on_result)
    finally:
      if bar is not None:
        bar.close()
    missing = [requests[i].key for i, r in enumerate(results) if r is None]
    if missing:  # A backend bug, not a request failure: say so loudly.
      raise RuntimeError(f"{type(self).__name__} returned no result for {len(missing)} "
                         f"request(s), e.g. {missing[0]!r}")
    failed = [r for r in results if r.text is None]
    self._count(requests=len(requests), failed=len(failed))
    if failed:
      _LOG.info("%s: %d of %d request(s) failed; first: %s: %s", self.name, len(failed),
                len(requests), failed[0].key, failed[0].error)
    return results  # type: ignore[return-value]

  def stats(self) -> dict[str, int]:
    """Cumulative counts since construction (keys: STAT_KEYS).

    requests: items asked; sent: HTTP requests made, retries included; cached: answered
    from the cache; failed: items returned with an error; retries: attempts after the
    first; prompt_tokens / completion_tokens: spent on fresh answers (cached ones cost
    nothing and are not counted).
    """
    with self._stats_lock:
      return {k: int(self._counters[k]) for k in STAT_KEYS}

  def replica_stats(self) -> list[dict[str, Any]]:
    """Per server replica (the openai backend with several base URLs): url, sent,
    failed (attempts); [] for one server or another backend."""
    return []

  def close(self) -> None:
    """Releases connections and files; the client must not be used afterwards."""

  def forget(self, requests: Sequence[ChatRequest]) -> None:
    """Drops the cached answers to `requests` (a cached client; others keep nothing).

    The caller validates answers; one that failed validation must not be served again
    from the cache, or a re-run against a healthy server would reject the same items
    forever. Stages call this for every answer they set aside, so resuming is
    re-running: exactly those requests are sent again.
    """

  def cache_identity(self) -> dict[str, Any]:
    """What, besides the request, decides the answer (goes into the cache key)."""
    return {"backend": self.kind}

  def sends_schema(self, request: ChatRequest) -> bool:
    """Whether the answer to `request` is constrained by its JSON schema (then the
    schema is part of its cache key)."""
    del request
    return False

  def cache_payload(self, request: ChatRequest) -> dict[str, Any]:
    """Everything that decides the answer to `request`; its hash is the cache key."""
    return {
        **self.cache_identity(),
        "messages": [{"role": m["role"], "content": m["content"]}
                     for m in request.messages],
        "temperature": float(request.temperature),
        "top_p": float(request.top_p),
        "max_tokens": int(request.max_tokens),
        "json_mode": bool(request.json_mode),
        "seed": request.seed,
        **({"json_schema": request.json_schema} if self.sends_schema(request) else {}),
    }

  @abc.abstractmethod
  def _answer(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
    """Calls on_result(i, result) exactly once per request, as each finishes."""

  def _count(self, **deltas: int) -> None:
    with self._stats_lock:
      self._counters.update(deltas)

  def __enter__(self) -> "InferenceClient":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r})"


# ----------------------------------------------------------------------------------------
# Persistent cache.
# ----------------------------------------------------------------------------------------


def cache_key(payload: Mapping[str, Any]) -> str:
  # ensure_ascii: one spelling for every string, lone surrogates included.
  canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"),
                         ensure_ascii=True, allow_nan=False)
  return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class ResponseCache:
  """SQLite table cache_key -> (text, token counts); safe across threads and processes."""

  def __init__(self, path: str | os.PathLike[str]):
    self.path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(parent, exist_ok=True)
    self._lock = threading.Lock()
    # isolation_level=None: autocommit, so each put is durable on its own (a crash
    # mid-batch keeps every answer written so far).
    self._conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                                 check_same_thread=False)
    try:
      self._conn.execute("PRAGMA journal_mode=WAL")
      # NORMAL in WAL mode survives a process crash; only power loss may lose the tail.
      self._conn.execute("PRAGMA synchronous=NORMAL")
      self._conn.execute(
          "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
          "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
          "created REAL NOT NULL) WITHOUT ROWID")
    except sqlite3.Error as e:
      self._conn.close()
      raise ValueError(f"cache {self.path}: not a usable SQLite file: {e}") from e

  def get_many(self, keys: Iterable[str]) -> dict[str, tuple[str, int, int]]:
    keys = list(dict.fromkeys(keys))
    out: dict[str, tuple[str, int, int]] = {}
    with self._lock:
      for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit.
        chunk = keys[start:start + 500]
        rows = self._conn.execute(
            "SELECT key, text, prompt_tokens, completion_tokens FROM answers WHERE key "
            f"IN ({','.join('?' * len(chunk))})", chunk)
        for key, text, prompt_tokens, completion_tokens in rows:
          out[key] = (text, prompt_tokens, completion_tokens)
    return out

  def put(self, key: str, result: ChatResult) -> None:
    if result.text is None:
      raise ValueError("only successful answers are cached")
    with self._lock:
      try:
        self._conn.execute(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
            (key, result.text, result.prompt_tokens, result.completion_tokens,
             time.time()))
      except UnicodeEncodeError:
        # An answer with lone surrogates cannot be stored as TEXT; it is still returned,
        # just asked again on a re-run.
        _LOG.debug("cache: answer for %s not storable (lone surrogates)", result.key)

  def delete_many(self, keys: Iterable[str]) -> None:
    keys = list(dict.fromkeys(keys))
    with self._lock:
      for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit.
        chunk = keys[start:start + 500]
        self._conn.execute(
            f"DELETE FROM answers WHERE key IN ({','.join('?' * len(chunk))})", chunk)

  def __len__(self) -> int:
    with self._lock:
      return self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

  def close(self) -> None:
    with self._lock:
      self._conn.close()


class CachedClient(InferenceClient):
  """Serves answers from a ResponseCache and sends the rest to `inner`."""

  def __init__(self, inner: InferenceClient, cache: ResponseCache):
    super().__init__()
    self.inner = inner
    self.cache = cache
    self.name = inner.name
    self.kind = inner.kind

  def cache_identity(self) -> dict[str, Any]:
    return self.inner.cache_identity()

  def cache_payload(self, request: ChatRequest) -> dict[str, Any]:
    return self.inner.cache_payload(request)

  def key_for(self, request: ChatRequest) -> str:
    return cache_key(self.cache_payload(request))

  def _answer(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
    keys = [self.key_for(r) for r in requests]
    hits = self.cache.get_many(keys)
    waiting: dict[str, list[int]] = {}  # cache key -> indices asking it, first is sent.
    n_cached = 0
    for i, (request, key) in enumerate(zip(requests, keys)):
      if key in hits:
        text, prompt_tokens, completion_tokens = hits[key]
        on_result(i, ChatResult(key=request.key, text=text, prompt_tokens=prompt_tokens,
                                completion_tokens=completion_tokens, cached=True))
        n_cached += 1
      else:
        waiting.setdefault(key, []).append(i)
    self._count(cached=n_cached)
    if not waiting:
      return
    send_keys = list(waiting)

    def on_inner(j: int, result: ChatResult) -> None:
      key = send_keys[j]
      if result.text is not None:
        self.cache.put(key, result)
      first, *duplicates = waiting[key]
      on_result(first, result)
      for i in duplicates:
        self._count(cached=int(result.text is not None))
        on_result(i, dataclasses.replace(result, key=requests[i].key, attempts=0,
                                         cached=result.text is not None))

    to_send = [requests[waiting[k][0]] for k in send_keys]
    self.inner._answer(to_send, on_inner)  # pylint: disable=protected-access

  def forget(self, requests: Sequence[ChatRequest]) -> None:
    self.cache.delete_many(self.key_for(r) for r in requests)

  def replica_stats(self) -> list[dict[str, Any]]:
    return self.inner.replica_stats()

  def stats(self) -> dict[str, int]:
    merged = self.inner.stats()
    own = super().stats()
    for k in ("requests", "cached", "failed"):
      merged[k] = own[k]
    return merged

  def close(self) -> None:
    try:
      self.inner.close()
    finally:
      self.cache.close()

  def __repr__(self) -> str:
    return f"CachedClient(name={self.name!r}, cache={self.cache.path!r})"
