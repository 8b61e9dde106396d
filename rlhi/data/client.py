"""Inference clients: one interface for the LLM calls of the data pipeline.

Classification, persona inference, rewrites and the LLM judge all ask an inference
client for chat completions in batches:

    client = make_client(config.client, cache_path=f"{workdir}/llm_cache.sqlite")
    results = client.chat([ChatRequest(key="classify/ab12/3", messages=(...,))],
                          desc="classify")
    for r in results:
      print(r.key, r.text if r.text is not None else r.error)
    client.close()

`chat()` returns one `ChatResult` per request, in input order. A request that still
fails after its retries is returned with `text=None` and the reason in `error`; it is
never raised, so a stage can write it to its rejects file. `chat()` is synchronous and
also works when called from inside a running event loop (a colab cell): the HTTP backend
runs its own event loop in a background thread.

Config (`cfg`, an ml_collections.ConfigDict; `default_config()` gives every field):
  backend         'openai' | 'reference' | 'local'.
  base_url        OpenAI-compatible server root, e.g. 'http://127.0.0.1:8000/v1'
                  (vLLM, SGLang, TGI, llama.cpp, Ollama, or a hosted API); requests go
                  to f'{base_url}/chat/completions'. Several replicas of one model: a
                  list, or one string separated by commas ('http://a:8000/v1,
                  http://b:8000/v1'); each request goes to the replica with the fewest
                  in flight, away from one that just failed (it cools down for the
                  backoff time) and, on a retry, to another replica than its last
                  attempt's. `replica_stats()` counts requests and failures per replica.
  model           the model name the server expects (vLLM: --served-model-name).
  api_key_env     NAME of the environment variable holding the API key; '' for a server
                  without auth. The key is read once at construction, sent as
                  'Authorization: Bearer', and never logged, cached, or shown in `name`,
                  errors or reprs.
  concurrency     requests in flight at once, per replica.
  timeout_s       per-attempt timeout of one HTTP request, in seconds.
  max_retries     retries after the first attempt (so max_retries + 1 attempts) on 429,
                  408/409/425, 5xx, timeouts, connection errors and undecodable or
                  invalid response bodies. Other 4xx (400/401/403/404/422...) fail at
                  once with the server's message.
  backoff_base_s  exponential backoff with full jitter: before retry n, sleep
  backoff_max_s   uniform(0, min(backoff_max_s, backoff_base_s * 2**(n-1))); a
                  Retry-After header (seconds or HTTP date) replaces that, capped at
                  backoff_max_s.
  reference_path  'reference' backend: JSONL of hand-written annotations, one
                  {"key": ..., "response": ...} per line; '' means the bundled
                  rlhi/data/samples/reference_annotations.jsonl.
  extra_body      dict merged last into every request JSON (e.g. {'top_k': 20} for
                  vLLM, {'chat_template_kwargs': {...}}); may be empty.
  structured_output  how a request that wants JSON asks the server for it:
                  'json_schema' sends the stage's JSON schema as
                  response_format={'type': 'json_schema', 'json_schema': {'name', 'schema',
                  'strict': True}} (OpenAI's spelling, accepted by vLLM >= 0.6, SGLang and
                  the hosted APIs; the server constrains decoding to the schema);
                  'json_object_schema' sends response_format={'type': 'json_object',
                  'schema': ...}, the spelling of llama-cpp-python's server (and
                  llama.cpp's llama-server), which refuses 'json_schema';
                  'json_object' (default) sends response_format={'type': 'json_object'}
                  (any JSON object); 'none' sends neither (servers that refuse or ignore
                  response_format, e.g. `transformers serve`). The answer is validated
                  strictly by the stage whatever the mode (rlhi/data/prompting.py).
  checkpoint      'local' backend: an HF checkpoint directory (what rlhi exports to
                  <workdir>/hf, or a released model), a .gguf file or a registered
                  name such as 'smollm2' (rlhi/models/sources.py), generated with
                  rlhi's sampler in this process. The backend lives in
                  rlhi/local_backend.py (this package never imports jax-side code);
                  importing that module registers it.
  tokenizer       'local': tokenizer name or directory; '' = the checkpoint's own.
  local_batch_size  'local': rows generated together.

Cache: with `cache_path`, a SQLite file (WAL) wraps the backend. The cache key is the
sha256 of the canonical JSON of (backend, base_url, model, messages, temperature, top_p,
max_tokens, json_mode, seed, extra_body, and the JSON schema and structured_output when
'json_schema' sends one); `ChatRequest.key` is not part of it, so the
same prompt asked by two stages is paid once. Only successful answers are stored, each
as soon as it arrives, so a re-run or a run resumed after a crash sends no request that
already succeeded. Identical requests in one batch are sent once. The file holds hashes,
answers and token counts only: no key, no header, no prompt. Because equal requests
share one answer, draw several samples of one prompt by giving each a different `seed`.
The reference backend answers by item key, so its entries are keyed by (sha256 of the
annotations file, `ChatRequest.key`) instead: an edited file is never served stale.
Keep the cache on a local disk (SQLite locking is unreliable on network filesystems).

Backends: subclass `InferenceClient`, set `name` and `kind`, implement `_answer` (call
`on_result(i, result)` once per request, from any thread, as each finishes) and
`cache_identity`; then add the kind to `BACKENDS` and `make_client`, or, for a backend
that needs jax, define it outside this package and `register_backend` it.

This module is part of the lightweight data package: it never imports jax.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import datetime
import email.utils
import hashlib
import json
import logging
import math
import os
import pathlib
import random
import re
import sqlite3
import threading
import time
import urllib.parse
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

# aiohttp, not httpx: against the loopback server at 50 ms latency and 64 in flight on
# this 2-core machine, aiohttp 3.14 made ~1,150 requests/s at ~0.2 ms of CPU each, while
# httpx 0.28's AsyncClient made ~105/s at ~9 ms of CPU each (its connection pool, not
# the network, was the bottleneck). See docs/bench_client.md.
import aiohttp
import ml_collections
from tqdm import auto as tqdm_auto
import yarl

_LOG = logging.getLogger(__name__)

BACKENDS = ("openai", "reference", "local")
STRUCTURED_OUTPUTS = ("json_schema", "json_object_schema", "json_object", "none")
STAT_KEYS = ("requests", "sent", "cached", "failed", "retries", "prompt_tokens",
             "completion_tokens")
DEFAULT_REFERENCE_PATH = (pathlib.Path(__file__).resolve().parent / "samples" /
                          "reference_annotations.jsonl")
# 408/409/425 are "try again" statuses too (timeouts, conflicts and too-early at a proxy).
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})
_MAX_DETAIL_CHARS = 300

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
# Config.
# ----------------------------------------------------------------------------------------


def base_urls(value: Any) -> list[str]:
  """config `base_url` -> the replicas' URLs: a string (several separated by commas or
  whitespace) or a list of strings."""
  if isinstance(value, str):
    urls = [u for u in re.split(r"[,\s]+", value) if u]
  elif isinstance(value, Sequence) and all(isinstance(u, str) for u in value):
    urls = list(value)
  else:
    raise ValueError(f"client config: 'base_url' must be a URL, a comma-separated list "
                     f"of URLs or a list of strings, got {value!r:.200}")
  if not urls:
    raise ValueError("client config: 'base_url' is empty")
  return [u.rstrip("/") for u in urls]


def default_config() -> ml_collections.ConfigDict:
  """Every client field with its default (see the module docstring)."""
  return ml_collections.ConfigDict({
      "backend": "openai",
      "base_url": "http://127.0.0.1:8000/v1",
      "model": "",
      "api_key_env": "",
      "concurrency": 32,
      "timeout_s": 120.0,
      "max_retries": 5,
      "backoff_base_s": 1.0,
      "backoff_max_s": 60.0,
      "reference_path": "",
      "extra_body": {},
      # 'json_schema' | 'json_object_schema' | 'json_object' | 'none'
      "structured_output": "json_object",
      # 'local': an HF checkpoint directory, .gguf file or 'smollm2', served by rlhi's
      # sampler.
      "checkpoint": "",
      "tokenizer": "",  # '' = the checkpoint's own
      "local_batch_size": 16,
  })


def _config_values(cfg: Any) -> dict[str, Any]:
  """Reads cfg (ConfigDict, mapping or object) over the defaults; rejects unknown names."""
  defaults = default_config().to_dict()
  if isinstance(cfg, ml_collections.ConfigDict):
    given = cfg.to_dict()
  elif isinstance(cfg, Mapping):
    given = dict(cfg)
  else:
    given = dict(vars(cfg))
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"client config: unknown field(s) {', '.join(unknown)}; known: "
                     f"{', '.join(sorted(defaults))}")
  if "backend" not in given:
    raise ValueError(f"client config: 'backend' is required; allowed: "
                     f"{', '.join(repr(b) for b in BACKENDS)}")
  values = dict(defaults)
  values.update({k: v for k, v in given.items() if v is not None})
  return values


def _check_number(values: dict[str, Any], name: str, *, integer: bool, minimum: float,
                  exclusive: bool = False) -> None:
  v = values[name]
  kinds = (int,) if integer else (int, float)
  ok = isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v)
  ok = ok and (v > minimum if exclusive else v >= minimum)
  if not ok:
    expected = "an integer" if integer else "a number"
    bound = f"> {minimum}" if exclusive else f">= {minimum}"
    raise ValueError(f"client config: '{name}' must be {expected} {bound}, got {v!r}")


def _check_openai_config(values: dict[str, Any]) -> None:
  urls = base_urls(values["base_url"])
  for base_url in urls:
    if not base_url.startswith(("http://", "https://")):
      raise ValueError(f"client config: 'base_url' must start with http:// or "
                       f"https://, got {base_url!r}")
    if not urllib.parse.urlsplit(base_url).hostname:
      raise ValueError(f"client config: 'base_url' has no host: {base_url!r}")
    if base_url.endswith("/chat/completions"):
      raise ValueError(f"client config: 'base_url' is the server root (e.g. "
                       f"'http://host:8000/v1'), without '/chat/completions'; got "
                       f"{base_url!r}")
  if len(set(urls)) != len(urls):
    raise ValueError(f"client config: 'base_url' lists a replica twice: {urls}")
  if not isinstance(values["model"], str) or not values["model"]:
    raise ValueError("client config: 'model' is empty; set the model name the server "
                     "serves (vLLM: --served-model-name)")
  if not isinstance(values["api_key_env"], str):
    raise ValueError(f"client config: 'api_key_env' must be the NAME of an environment "
                     f"variable (or ''), got a {type(values['api_key_env']).__name__}")
  _check_number(values, "concurrency", integer=True, minimum=1)
  _check_number(values, "timeout_s", integer=False, minimum=0, exclusive=True)
  _check_number(values, "max_retries", integer=True, minimum=0)
  _check_number(values, "backoff_base_s", integer=False, minimum=0)
  _check_number(values, "backoff_max_s", integer=False, minimum=0)
  extra = values["extra_body"]
  if not isinstance(extra, Mapping):
    raise ValueError(f"client config: 'extra_body' must be a dict, got {extra!r:.200}")
  for reserved in ("messages", "stream"):
    if reserved in extra:
      raise ValueError(f"client config: 'extra_body' may not set '{reserved}'")
  if values["structured_output"] not in STRUCTURED_OUTPUTS:
    raise ValueError(f"client config: 'structured_output' must be one of "
                     f"{', '.join(repr(m) for m in STRUCTURED_OUTPUTS)}, got "
                     f"{values['structured_output']!r}")
  try:
    json.dumps(dict(extra))
  except (TypeError, ValueError) as e:
    raise ValueError(f"client config: 'extra_body' is not JSON-serialisable: {e}") from e


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
# OpenAI-compatible HTTP backend.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Answer:
  text: str
  prompt_tokens: int
  completion_tokens: int


@dataclasses.dataclass(frozen=True)
class _Failure:
  reason: str  # Short and countable: "HTTP 500", "timeout after 30.0 s", ...
  detail: str  # The server's message or the exception text, clipped.
  retryable: bool
  retry_after_s: float | None = None


@dataclasses.dataclass
class _Replica:
  """One server of the openai backend, as the request router sees it."""
  url: yarl.URL  # .../chat/completions
  shown: str  # base URL without credentials, for errors and stats
  in_flight: int = 0
  sent: int = 0
  failed: int = 0
  consecutive_failures: int = 0
  cool_until: float = 0.0  # time.monotonic() before which it is used only if all are


class _Secret:
  """Holds the Authorization header so that no repr, vars() dump or log shows it."""

  def __init__(self, api_key: str):
    self.api_key = api_key
    self.headers = {"Content-Type": "application/json"}
    if api_key:
      self.headers["Authorization"] = f"Bearer {api_key}"

  def redact(self, text: str) -> str:
    return text.replace(self.api_key, "[redacted]") if self.api_key else text

  def __repr__(self) -> str:
    return "_Secret(<hidden>)"


class _LoopThread:
  """An event loop in a daemon thread, owning the aiohttp session across chat() calls.

  A thread of our own (rather than asyncio.run in the caller's thread) makes chat()
  work inside a running loop (colab), and keeps keep-alive connections between batches.
  """

  def __init__(self):
    self.session: aiohttp.ClientSession | None = None
    self.semaphore: asyncio.Semaphore | None = None
    # Plain asyncio: uvloop measured within noise here (~2% at 64 in flight), not worth
    # a second code path.
    self.loop = asyncio.new_event_loop()
    self.thread = threading.Thread(target=self._run, name="rlhi-inference-client",
                                   daemon=True)
    self.thread.start()

  def _run(self) -> None:
    asyncio.set_event_loop(self.loop)
    self.loop.run_forever()

  def run(self, coro) -> Any:
    if threading.current_thread() is self.thread:
      coro.close()
      raise RuntimeError("chat() was called from inside one of its own callbacks")
    future = asyncio.run_coroutine_threadsafe(coro, self.loop)
    try:
      return future.result()
    except BaseException:
      future.cancel()  # KeyboardInterrupt in the caller: stop sending this batch.
      raise

  async def _close_session(self) -> None:
    if self.session is not None:
      await self.session.close()
      self.session = None

  def shutdown(self) -> None:
    """Closes the session and stops the loop; called once, by close() or at exit."""
    if threading.current_thread() is self.thread or not self.thread.is_alive():
      return
    try:
      asyncio.run_coroutine_threadsafe(self._close_session(), self.loop).result(10)
    except Exception:  # pylint: disable=broad-except
      pass  # Best effort: the process may be exiting.
    self.loop.call_soon_threadsafe(self.loop.stop)
    self.thread.join(timeout=10)
    if not self.thread.is_alive():
      self.loop.close()


class OpenAIClient(InferenceClient):
  """Chat completions over HTTP from an OpenAI-compatible server."""

  kind = "openai"

  def __init__(self, *, base_url: str | Sequence[str], model: str, api_key_env: str = "",
               concurrency: int = 32, timeout_s: float = 120.0, max_retries: int = 5,
               backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
               extra_body: Mapping[str, Any] | None = None,
               structured_output: str = "json_object"):
    super().__init__()
    values = dict(base_url=base_url, model=model, api_key_env=api_key_env,
                  concurrency=concurrency, timeout_s=timeout_s, max_retries=max_retries,
                  backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s,
                  extra_body=dict(extra_body or {}),
                  structured_output=structured_output)
    _check_openai_config(values)
    api_key = ""
    if api_key_env:
      api_key = os.environ.get(api_key_env, "")
      if not api_key:
        raise ValueError(f"client config: api_key_env={api_key_env!r} names an "
                         f"environment variable that is unset or empty; export it, or "
                         f"set api_key_env='' for a server without auth")
    self._secret = _Secret(api_key)
    urls = base_urls(base_url)
    self.base_url = urls[0] if len(urls) == 1 else urls
    self.model = model
    self.concurrency = int(concurrency)
    self.timeout_s = float(timeout_s)
    self.max_retries = int(max_retries)
    self.backoff_base_s = float(backoff_base_s)
    self.backoff_max_s = float(backoff_max_s)
    self.extra_body = dict(extra_body or {})
    self.structured_output = structured_output
    # URLs parsed once, not per call.
    self._replicas = [_Replica(yarl.URL(u + "/chat/completions"), _without_credentials(u))
                      for u in urls]
    more = f" (+{len(urls) - 1} replicas)" if len(urls) > 1 else ""
    self.name = f"openai:{self._replicas[0].shown}{more} model={model}"
    self._rng = random.Random()
    self._loop_lock = threading.Lock()
    self._loop_thread: _LoopThread | None = None
    self._loop_pid = 0
    self._finalizer: weakref.finalize | None = None

  def cache_identity(self) -> dict[str, Any]:
    # structured_output only when not the default, so that caches written before it
    # existed (json_object) keep their keys.
    mode = ({} if self.structured_output == "json_object"
            else {"structured_output": self.structured_output})
    # Several replicas: the set of them (sorted), so that their order does not matter.
    base_url = (self.base_url if isinstance(self.base_url, str)
                else sorted(self.base_url))
    return {"backend": self.kind, "base_url": base_url, "model": self.model,
            "extra_body": self.extra_body, **mode}

  def replica_stats(self) -> list[dict[str, Any]]:
    if len(self._replicas) == 1:
      return []
    with self._stats_lock:
      return [{"url": r.shown, "sent": r.sent, "failed": r.failed}
              for r in self._replicas]

  def sends_schema(self, request: ChatRequest) -> bool:
    return (request.json_mode and bool(request.json_schema)
            and self.structured_output in ("json_schema", "json_object_schema"))

  def response_format(self, request: ChatRequest) -> dict[str, Any] | None:
    """The request's `response_format`, as config `structured_output` spells it."""
    if not request.json_mode or self.structured_output == "none":
      return None
    if not self.sends_schema(request):
      return {"type": "json_object"}
    named = json.loads(request.json_schema)
    if self.structured_output == "json_object_schema":
      return {"type": "json_object", "schema": named["schema"]}
    return {"type": "json_schema", "json_schema": {**named, "strict": True}}

  def close(self) -> None:
    with self._loop_lock:
      if self._finalizer is not None:
        self._finalizer()  # Runs _LoopThread.shutdown once.
      self._loop_thread = None

  # --- batch ----------------------------------------------------------------------------

  def _answer(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
    loop_thread = self._ensure_loop()
    loop_thread.run(self._run_batch(loop_thread, requests, on_result))

  def _ensure_loop(self) -> _LoopThread:
    with self._loop_lock:
      if self._loop_thread is None or self._loop_pid != os.getpid():
        # After a fork the child has the object but not the thread: start a new one.
        self._loop_thread = _LoopThread()
        self._loop_pid = os.getpid()
        self._finalizer = weakref.finalize(self, self._loop_thread.shutdown)
      return self._loop_thread

  def _make_session(self) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=self.concurrency * len(self._replicas),
                                     limit_per_host=self.concurrency, ttl_dns_cache=300)
    # trust_env=False: never route the Bearer key through an HTTP(S)_PROXY from the
    # environment by surprise.
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
        trust_env=False, auto_decompress=True)

  def _encode(self, request: ChatRequest) -> bytes:
    body: dict[str, Any] = {
        "model": self.model,
        "messages": [{"role": m["role"], "content": m["content"]}
                     for m in request.messages],
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
    }
    response_format = self.response_format(request)
    if response_format is not None:
      body["response_format"] = response_format
    if request.seed is not None:
      body["seed"] = request.seed
    body.update(self.extra_body)
    try:
      return json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
      # Lone surrogates (they occur in scraped chat logs) are not UTF-8; \u escapes are.
      return json.dumps(body, ensure_ascii=True).encode("ascii")

  async def _run_batch(self, lt: _LoopThread, requests: Sequence[ChatRequest],
                       on_result: OnResult) -> None:
    if lt.session is None:
      lt.session = self._make_session()
      # Shared by concurrent chat() calls from several threads: one bound per client.
      # Requests go to the least-loaded replica, so `concurrency` per replica holds.
      lt.semaphore = asyncio.Semaphore(self.concurrency * len(self._replicas))
    session, semaphore = lt.session, lt.semaphore
    loop = asyncio.get_running_loop()
    n = len(requests)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
      queue.put_nowait(i)
    bodies: list[bytes | None] = [None] * n
    failures: list[list[_Failure]] = [[] for _ in range(n)]
    last_replica: list[int | None] = [None] * n
    timers: set[asyncio.TimerHandle] = set()
    done = loop.create_future()
    remaining = n

    def finish(i: int, result: ChatResult) -> None:
      nonlocal remaining
      on_result(i, result)  # May raise (e.g. the cache's disk is full): ends the batch.
      remaining -= 1
      if remaining == 0 and not done.done():
        done.set_result(None)

    def requeue(i: int, handle_box: list[asyncio.TimerHandle]) -> None:
      timers.discard(handle_box[0])
      queue.put_nowait(i)

    async def worker() -> None:
      # Workers, not one task per item: memory stays flat for 100k-item batches, and an
      # item waiting out its backoff sits in a timer instead of holding a slot.
      try:
        while True:
          i = await queue.get()
          if bodies[i] is None:
            try:
              bodies[i] = self._encode(requests[i])
            except (TypeError, ValueError) as e:
              finish(i, ChatResult(key=requests[i].key, text=None,
                                   error=f"request could not be encoded as JSON: {e}"))
              continue
          async with semaphore:
            r = self._pick_replica(avoid=last_replica[i])
            last_replica[i] = r
            outcome = await self._attempt_on(r, session, bodies[i])
          attempts = len(failures[i]) + 1
          self._count(sent=1, retries=int(attempts > 1))
          if isinstance(outcome, _Answer):
            self._count(prompt_tokens=outcome.prompt_tokens,
                        completion_tokens=outcome.completion_tokens)
            finish(i, ChatResult(key=requests[i].key, text=outcome.text,
                                 prompt_tokens=outcome.prompt_tokens,
                                 completion_tokens=outcome.completion_tokens,
                                 attempts=attempts))
            continue
          failures[i].append(outcome)
          if outcome.retryable and attempts <= self.max_retries:
            box: list[asyncio.TimerHandle] = []
            box.append(loop.call_later(self._delay(attempts, outcome), requeue, i, box))
            timers.add(box[0])
          else:
            finish(i, ChatResult(key=requests[i].key, text=None, attempts=attempts,
                                 error=self._secret.redact(_summarize(failures[i]))))
      except asyncio.CancelledError:
        raise
      except BaseException as e:  # pylint: disable=broad-except
        if not done.done():
          done.set_exception(e)

    workers = [asyncio.create_task(worker())
               for _ in range(min(self.concurrency * len(self._replicas), n))]
    try:
      await done
    finally:
      for handle in timers:
        handle.cancel()
      for w in workers:
        w.cancel()
      await asyncio.gather(*workers, return_exceptions=True)

  def _delay(self, attempts: int, failure: _Failure) -> float:
    if failure.retry_after_s is not None:
      return min(failure.retry_after_s, self.backoff_max_s)
    # Full jitter (AWS architecture blog): spreads a burst of retries evenly.
    ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0**(attempts - 1))
    return self._rng.uniform(0.0, ceiling)

  def _pick_replica(self, avoid: int | None) -> int:
    """The replica for the next attempt: not cooling down after a failure, fewest in
    flight, fewest failures in a row; another than `avoid` (a retry's last) if any."""
    now = time.monotonic()
    return min(range(len(self._replicas)), key=lambda i: (
        i == avoid and len(self._replicas) > 1, self._replicas[i].cool_until > now,
        self._replicas[i].in_flight, self._replicas[i].consecutive_failures, i))

  async def _attempt_on(self, index: int, session: aiohttp.ClientSession,
                        body: bytes) -> _Answer | _Failure:
    replica = self._replicas[index]
    replica.in_flight += 1  # only the event loop's thread touches in_flight
    try:
      outcome = await self._attempt(session, replica.url, body)
    finally:
      replica.in_flight -= 1
    with self._stats_lock:
      replica.sent += 1
      if isinstance(outcome, _Failure):
        replica.failed += 1
        replica.consecutive_failures += 1
        replica.cool_until = time.monotonic() + min(
            self.backoff_max_s,
            self.backoff_base_s * 2.0**(replica.consecutive_failures - 1))
      else:
        replica.consecutive_failures, replica.cool_until = 0, 0.0
    if isinstance(outcome, _Failure) and len(self._replicas) > 1:
      outcome = dataclasses.replace(outcome, detail=f"[{replica.shown}] {outcome.detail}")
    return outcome

  async def _attempt(self, session: aiohttp.ClientSession, url: yarl.URL,
                     body: bytes) -> _Answer | _Failure:
    try:
      async with session.post(url, data=body, headers=self._secret.headers) as resp:
        raw = await resp.read()
        status = resp.status
        retry_after = resp.headers.get("Retry-After")
    except asyncio.TimeoutError:
      return _Failure(f"timeout after {self.timeout_s:g} s", "", True)
    except (aiohttp.ClientError, OSError) as e:
      detail = self._secret.redact(_clip(str(e)))
      return _Failure(f"connection error ({type(e).__name__})", detail, True)
    if 200 <= status < 300:
      return _parse_answer(raw)
    detail = self._secret.redact(_clip(_server_message(raw)))
    if status >= 500 or status in _RETRYABLE_4XX:
      return _Failure(f"HTTP {status}", detail, True, _parse_retry_after(retry_after))
    return _Failure(f"HTTP {status}", detail, False)


def _parse_answer(raw: bytes) -> _Answer | _Failure:
  try:
    data = json.loads(raw)
  except (ValueError, UnicodeDecodeError):
    return _Failure("invalid response body", f"not JSON: {_clip(repr(raw[:120]))}", True)
  try:
    choice = data["choices"][0]
    text = choice["message"]["content"]
  except (KeyError, IndexError, TypeError):
    return _Failure("invalid response body", "no choices[0].message.content", True)
  if not isinstance(text, str):
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return _Failure("invalid response body",
                    f"message.content is {type(text).__name__} "
                    f"(finish_reason={finish!r})", True)
  usage = data.get("usage") if isinstance(data, dict) else None
  usage = usage if isinstance(usage, dict) else {}
  return _Answer(text, _as_count(usage.get("prompt_tokens")),
                 _as_count(usage.get("completion_tokens")))


def _as_count(value: Any) -> int:
  return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _server_message(raw: bytes) -> str:
  """The error message of an OpenAI-style error body, else the body as text."""
  try:
    data = json.loads(raw)
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict) and isinstance(error.get("message"), str):
      return error["message"]
    if isinstance(error, str):
      return error
  except (ValueError, UnicodeDecodeError):
    pass
  return raw.decode("utf-8", errors="replace")


def _parse_retry_after(value: str | None) -> float | None:
  """Retry-After as seconds from now: delta-seconds or an HTTP date (RFC 9110)."""
  if not value:
    return None
  try:
    seconds = float(value)
  except ValueError:
    try:
      when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
      return None
    if when.tzinfo is None:
      when = when.replace(tzinfo=datetime.timezone.utc)
    seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
  return max(0.0, seconds) if math.isfinite(seconds) else None


def _clip(text: str, limit: int = _MAX_DETAIL_CHARS) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit] + "..."


def _without_credentials(url: str) -> str:
  """user:password@ in a URL is a credential too: keep it out of names and errors."""
  parts = urllib.parse.urlsplit(url)
  return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _summarize(failures: list[_Failure]) -> str:
  """One line for ChatResult.error, e.g. 'HTTP 500 after 6 attempts: <message>'."""
  last = failures[-1]
  detail = f": {last.detail}" if last.detail else ""
  n = len(failures)
  if n == 1:
    return last.reason + detail
  reasons = collections.Counter(f.reason for f in failures)
  if len(reasons) == 1:
    if not detail:
      return f"{last.reason} x {n}"
    return f"{last.reason} after {n} attempts{detail}"
  mix = ", ".join(f"{reason} x{count}" for reason, count in reasons.items())
  return f"failed after {n} attempts ({mix}); last: {last.reason}{detail}"


# ----------------------------------------------------------------------------------------
# Reference backend: hand-written annotations.
# ----------------------------------------------------------------------------------------


def load_reference_annotations(path: str | os.PathLike[str]) -> dict[str, str]:
  """{"key": ..., "response": ...} lines -> {key: response}; errors name file:line."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"reference backend: annotations file not found: {path} "
                            f"(set 'reference_path' in the client config)")
  answers: dict[str, str] = {}
  lines: dict[str, int] = {}
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      where = f"{path}:{lineno}"
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from e
      if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with 'key' and 'response'")
      for field in ("key", "response"):
        if not isinstance(record.get(field), str):
          raise ValueError(f"{where}: field '{field}': expected a string, got "
                           f"{record.get(field)!r:.80}")
      key = record["key"]
      if key in answers:
        raise ValueError(f"{where}: field 'key': {key!r} already annotated at line "
                         f"{lines[key]}")
      answers[key] = record["response"]
      lines[key] = lineno
  return answers


class ReferenceClient(InferenceClient):
  """Answers each request by exact `key` lookup in hand-written annotations."""

  kind = "reference"

  def __init__(self, path: str | os.PathLike[str] | None = None):
    super().__init__()
    self.path = pathlib.Path(path) if path else DEFAULT_REFERENCE_PATH
    self._answers = load_reference_annotations(self.path)
    self._digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
    if self.path.resolve() == DEFAULT_REFERENCE_PATH:
      self.name = "reference (hand-written annotations of the bundled sample; not a model)"
    else:
      self.name = f"reference (hand-written annotations from {self.path}; not a model)"

  def cache_identity(self) -> dict[str, Any]:
    # Edited annotations must not be served stale from a cache.
    return {"backend": self.kind, "annotations_sha256": self._digest}

  def cache_payload(self, request: ChatRequest) -> dict[str, Any]:
    # The answer depends on the key alone here, unlike for a model.
    return {**self.cache_identity(), "key": request.key}

  def _answer(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
    for i, request in enumerate(requests):
      text = self._answers.get(request.key)
      if text is None:
        on_result(i, ChatResult(key=request.key, text=None,
                                error=f"reference backend: no annotation for key "
                                      f"'{request.key}'"))
      else:
        on_result(i, ChatResult(key=request.key, text=text))


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


# ----------------------------------------------------------------------------------------
# Factory.
# ----------------------------------------------------------------------------------------


# Backends defined outside this package, by name: `rlhi.local_backend` registers
# 'local' when imported. The data package never imports jax-side code, lazily or not.
_REGISTERED: dict[str, Callable[[dict[str, Any]], InferenceClient]] = {}


def register_backend(name: str,
                     factory: Callable[[dict[str, Any]], InferenceClient]) -> None:
  """Makes `make_client` build `name` with factory(config values)."""
  if name not in BACKENDS:
    raise ValueError(f"register_backend: {name!r} is not one of {BACKENDS}")
  _REGISTERED[name] = factory


def make_client(cfg: Any, *, cache_path: str | os.PathLike[str] | None = None
               ) -> InferenceClient:
  """Builds the client that `cfg.backend` names, behind a cache when cache_path is set."""
  values = _config_values(cfg)
  backend = values["backend"]
  if backend == "openai":
    client: InferenceClient = OpenAIClient(
        base_url=values["base_url"], model=values["model"],
        api_key_env=values["api_key_env"], concurrency=values["concurrency"],
        timeout_s=values["timeout_s"], max_retries=values["max_retries"],
        backoff_base_s=values["backoff_base_s"], backoff_max_s=values["backoff_max_s"],
        extra_body=values["extra_body"], structured_output=values["structured_output"])
  elif backend == "reference":
    if not isinstance(values["reference_path"], str):
      raise ValueError(f"client config: 'reference_path' must be a path string, got "
                       f"{values['reference_path']!r}")
    client = ReferenceClient(values["reference_path"] or None)
  elif backend in _REGISTERED:
    client = _REGISTERED[backend](values)
  elif backend in BACKENDS:
    raise ValueError(f"client config: backend={backend!r} runs rlhi's own model (jax), "
                     f"which this jax-free package does not import: import "
                     f"rlhi.local_backend first, which registers it "
                     f"(experiments/prepare_data.py and rlhi.eval do)")
  else:
    raise ValueError(f"client config: backend={backend!r} is not supported; allowed: "
                     f"{', '.join(repr(b) for b in BACKENDS)}")
  if cache_path:
    try:
      cache = ResponseCache(cache_path)
    except BaseException:
      client.close()
      raise
    client = CachedClient(client, cache)
  return client
