"""The OpenAI-compatible HTTP backend (vLLM, SGLang, TGI, llama.cpp, Ollama, hosted APIs).

Its config fields and retry / replica behaviour are documented in the package docstring
(rlhi/data/client/__init__.py). Never imports jax.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import email.utils
import json
import math
import os
import random
import re
import threading
import time
import urllib.parse
import weakref
from typing import Any, Mapping, Sequence

# aiohttp, not httpx: against the loopback server at 50 ms latency and 64 in flight on
# this 2-core machine, aiohttp 3.14 made ~1,150 requests/s at ~0.2 ms of CPU each, while
# httpx 0.28's AsyncClient made ~105/s at ~9 ms of CPU each (its connection pool, not
# the network, was the bottleneck). See docs/bench_client.md.
import aiohttp
import yarl

from rlhi.data.client.base import ChatRequest
from rlhi.data.client.base import ChatResult
from rlhi.data.client.base import InferenceClient
from rlhi.data.client.base import OnResult

STRUCTURED_OUTPUTS = ("json_schema", "json_object_schema", "json_object", "none")
# 408/409/425 are "try again" statuses too (timeouts, conflicts and too-early at a proxy).
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})
_MAX_DETAIL_CHARS = 300

# ----------------------------------------------------------------------------------------
# Config checks.
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
