"""A loopback OpenAI-compatible chat-completions server for tests and benchmarks.

Real HTTP on 127.0.0.1 with an ephemeral port, served by aiohttp on an event loop in a
background thread, so the client under test goes through sockets, keep-alive, timeouts
and dropped connections exactly as against vLLM or a hosted API:

    with OpenAIServer(responder=lambda req: "hi", latency_s=0.01) as server:
      cfg.base_url = server.base_url          # http://127.0.0.1:<port>/v1
      ...
      assert server.counters()["requests"] == 3
      assert server.requests()[0].headers["Authorization"] == "Bearer ..."

Answers: `responder(request_json) -> str` (sync or async) writes the assistant text;
the default echoes the last user message. A responder that raises gives an HTTP 500 with
the exception's message. Usage is counted in whitespace-separated words
(`count_tokens`), so a test can compute expected totals on its own.

Faults, chosen per attempt (one HTTP request):
  - permanent: `permanent(request_json) -> kind | None`, e.g.
    `marker_fault("FAIL_ME", "500")` fails every request whose messages contain
    "FAIL_ME", on every attempt;
  - transient: with probability `fault_rate`, one kind drawn from `fault_kinds`. The draw
    is a hash of (seed, request body, how many times that body was seen before), so a
    run is reproducible whatever order concurrent requests arrive in, and a retry of
    the same body gets a fresh draw.
Kinds: "<3-digit status>" (an error JSON with that status; 429 adds `Retry-After:
retry_after`), "drop" (close the socket without answering), "slow" (answer after
`slow_s`, past the client's timeout), "malformed" (200 with a truncated JSON body),
"invalid" (200 with JSON that has no `choices`).

`configure(**changes)` swaps the behaviour of a running server (e.g. heal it for a
re-run: the base_url, and so the client's cache key, stays the same).

For benchmarks the server can run in its own process (`serve_subprocess`, or
`python -m rlhi.testing.openai_server --latency-s 0.05`), so that it does not share the
client's GIL; its counters are then at GET /_testing/counters.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Awaitable, Callable, Iterator, Union

from aiohttp import web

try:
  import uvloop  # Optional: a cheaper server leaves more of the machine to the client.
except ImportError:  # pragma: no cover
  uvloop = None

Responder = Callable[[dict[str, Any]], Union[str, Awaitable[str]]]
FaultRule = Callable[[dict[str, Any]], Union[str, None]]

# The mix a flaky real deployment produces; "invalid" and other statuses are opt-in.
TRANSIENT_FAULTS = ("500", "429", "drop", "slow", "malformed")
_NAMED_FAULTS = ("drop", "slow", "malformed", "invalid")


def count_tokens(text: str) -> int:
  """The server's stand-in tokenizer: whitespace-separated words."""
  return len(text.split())


def last_user_message(request_json: dict[str, Any]) -> str:
  for message in reversed(request_json.get("messages", [])):
    if message.get("role") == "user":
      return message.get("content", "")
  return ""


def echo_responder(request_json: dict[str, Any]) -> str:
  return "echo: " + last_user_message(request_json)


def marker_fault(marker: str, kind: str) -> FaultRule:
  """A permanent-fault rule: `kind` for every request whose messages contain `marker`."""
  _check_kind(kind)

  def rule(request_json: dict[str, Any]) -> str | None:
    for message in request_json.get("messages", []):
      if marker in str(message.get("content", "")):
        return kind
    return None

  return rule


def _check_kind(kind: str) -> None:
  if kind in _NAMED_FAULTS or (len(kind) == 3 and kind.isdigit()):
    return
  raise ValueError(f"unknown fault kind {kind!r}; expected a 3-digit HTTP status or one "
                   f"of {', '.join(_NAMED_FAULTS)}")


@dataclasses.dataclass(frozen=True)
class Behaviour:
  """What the server does; replaced whole by `OpenAIServer.configure`."""
  responder: Responder = echo_responder
  latency_s: float = 0.0              # added to every answer, faults included
  fault_rate: float = 0.0             # probability per attempt of a transient fault
  fault_kinds: tuple[str, ...] = TRANSIENT_FAULTS
  seed: int = 0
  permanent: FaultRule | None = None
  retry_after: str = "1"              # Retry-After header of 429s: seconds or HTTP date
  slow_s: float = 30.0                # how long a "slow" answer takes

  def __post_init__(self):
    for kind in self.fault_kinds:
      _check_kind(kind)
    if not 0.0 <= self.fault_rate <= 1.0:
      raise ValueError(f"fault_rate must be in [0, 1], got {self.fault_rate}")


@dataclasses.dataclass(frozen=True)
class LoggedRequest:
  """One HTTP request as the server received it."""
  time: float                         # time.monotonic() at arrival
  method: str
  path: str
  headers: dict[str, str]
  body: Any                           # the parsed JSON body; None if it was not JSON
  attempt: int                        # times this exact body had been received before
  fault: str | None                   # the fault served; None for a normal answer


class _Drop(Exception):
  """Raised by the handler after aborting the transport, so nothing is written."""


class OpenAIServer:
  """Loopback server; a context manager that starts and stops it."""

  def __init__(self, responder: Responder | None = None, *, host: str = "127.0.0.1",
               port: int = 0, log_requests: bool = True, **behaviour: Any):
    if host not in ("127.0.0.1", "localhost", "::1"):
      raise ValueError(f"the test server only listens on loopback, got host={host!r}")
    if responder is not None:
      behaviour["responder"] = responder
    self._behaviour = Behaviour(**behaviour)
    self._host = host
    self._port = port
    self._log_requests = log_requests
    self._lock = threading.Lock()
    self._log: list[LoggedRequest] = []
    self._counters: collections.Counter[str] = collections.Counter()
    self._seen: collections.Counter[bytes] = collections.Counter()
    self._loop: asyncio.AbstractEventLoop | None = None
    self._thread: threading.Thread | None = None
    self._runner: web.AppRunner | None = None
    self.port: int | None = None

  # --- lifecycle ------------------------------------------------------------------------

  @property
  def base_url(self) -> str:
    if self.port is None:
      raise RuntimeError("server not started")
    return f"http://{self._host}:{self.port}/v1"

  def start(self) -> "OpenAIServer":
    if self._thread is not None:
      raise RuntimeError("server already started")
    self._loop = uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()
    started = threading.Event()
    errors: list[BaseException] = []

    def run():
      asyncio.set_event_loop(self._loop)
      try:
        self._loop.run_until_complete(self._start_site())
      except BaseException as e:  # pylint: disable=broad-except
        errors.append(e)
        started.set()
        return
      started.set()
      self._loop.run_forever()
      self._loop.close()

    self._thread = threading.Thread(target=run, name="openai-test-server", daemon=True)
    self._thread.start()
    started.wait()
    if errors:
      raise errors[0]
    return self

  def stop(self) -> None:
    if self._thread is None or self._loop is None:
      return
    future = asyncio.run_coroutine_threadsafe(self._stop_site(), self._loop)
    future.result(timeout=30)
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(timeout=30)
    self._thread = None

  def __enter__(self) -> "OpenAIServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  async def _start_site(self) -> None:
    self._runner = make_runner(self)
    await self._runner.setup()
    # shutdown_timeout: "slow" answers may still be sleeping at exit; don't wait for them.
    site = web.TCPSite(self._runner, self._host, self._port, shutdown_timeout=0.1)
    await site.start()
    self.port = self._runner.addresses[0][1]

  async def _stop_site(self) -> None:
    if self._runner is not None:
      await self._runner.cleanup()
    # Handlers still sleeping ("slow" faults, latency) would be destroyed pending.
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
      task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

  # --- behaviour, log, counters ---------------------------------------------------------

  @property
  def behaviour(self) -> Behaviour:
    return self._behaviour

  def configure(self, **changes: Any) -> None:
    """Changes the behaviour from now on (requests already being served keep theirs)."""
    self._behaviour = dataclasses.replace(self._behaviour, **changes)

  def requests(self) -> list[LoggedRequest]:
    """A copy of the log of every request received so far."""
    with self._lock:
      return list(self._log)

  def counters(self) -> dict[str, int]:
    """requests, answered (normal 200s), and 'fault:<kind>' for each fault served."""
    with self._lock:
      out = {"requests": 0, "answered": 0}
      out.update(self._counters)
      return out

  def clear(self) -> None:
    """Empties the log and the counters (not the per-body attempt memory)."""
    with self._lock:
      self._log.clear()
      self._counters.clear()

  # --- request handling -----------------------------------------------------------------

  def _choose_fault(self, b: Behaviour, body: Any, raw: bytes) -> tuple[int, str | None]:
    digest = hashlib.sha256(raw).digest()
    with self._lock:
      attempt = self._seen[digest]
      self._seen[digest] += 1
    if b.permanent is not None and isinstance(body, dict):
      kind = b.permanent(body)
      if kind is not None:
        _check_kind(kind)
        return attempt, kind
    if b.fault_rate > 0 and b.fault_kinds:
      h = hashlib.sha256(b"%d:%d:" % (b.seed, attempt) + digest).digest()
      if int.from_bytes(h[:8], "big") / 2.0**64 < b.fault_rate:
        return attempt, b.fault_kinds[int.from_bytes(h[8:16], "big") % len(b.fault_kinds)]
    return attempt, None

  def _record(self, request: web.Request, body: Any, attempt: int, fault: str | None):
    with self._lock:
      self._counters["requests"] += 1
      self._counters[f"fault:{fault}" if fault else "answered"] += 1
      if self._log_requests:
        self._log.append(LoggedRequest(
            time=time.monotonic(), method=request.method, path=request.path,
            headers=dict(request.headers), body=body, attempt=attempt, fault=fault))

  async def handle_chat(self, request: web.Request) -> web.StreamResponse:
    b = self._behaviour  # One snapshot per request: configure() may swap it meanwhile.
    raw = await request.read()
    try:
      body = json.loads(raw)
    except ValueError:
      body = None
    attempt, fault = self._choose_fault(b, body, raw)
    problem = _validate(body)
    if problem:
      fault = None
    self._record(request, body, attempt, fault if not problem else "400")
    if b.latency_s:
      await asyncio.sleep(b.latency_s)
    if problem:
      return _error(400, problem)

    if fault == "drop":
      # Abort (RST) rather than a polite close: what a crashed worker or a proxy reset
      # looks like to the client. _Drop keeps aiohttp from writing a response.
      if request.transport is not None:
        request.transport.abort()
      raise _Drop()
    if fault == "slow":
      await asyncio.sleep(b.slow_s)
    elif fault == "malformed":
      return web.Response(status=200, body=b'{"id": "chatcmpl-x", "choices": [{"mess',
                          content_type="application/json")
    elif fault == "invalid":
      return web.json_response({"id": "chatcmpl-x", "object": "chat.completion"})
    elif fault is not None:
      status = int(fault)
      headers = {"Retry-After": b.retry_after} if status == 429 else None
      return _error(status, f"injected fault: HTTP {status}", headers=headers)

    try:
      text = b.responder(body)
      if inspect.isawaitable(text):
        text = await text
    except Exception as e:  # pylint: disable=broad-except
      return _error(500, f"responder failed: {type(e).__name__}: {e}")
    prompt_tokens = sum(count_tokens(str(m.get("content", ""))) for m in body["messages"])
    completion_tokens = count_tokens(text)
    return web.json_response({
        "id": f"chatcmpl-{attempt}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })

  async def handle_models(self, request: web.Request) -> web.Response:
    del request
    return web.json_response({"object": "list", "data": [{"id": "test-model",
                                                          "object": "model"}]})

  async def handle_counters(self, request: web.Request) -> web.Response:
    del request
    # process_cpu_s lets a benchmark see how much of the machine the server itself used.
    return web.json_response({**self.counters(), "process_cpu_s": time.process_time()})


def _validate(body: Any) -> str | None:
  """What a real server would reject with a 400; None when the request is well formed."""
  if not isinstance(body, dict):
    return "request body is not a JSON object"
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    return "'messages' must be a non-empty list"
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
        m.get("content"), str):
      return f"messages[{i}] must have string 'role' and 'content'"
  if body.get("stream"):
    return "this test server does not stream"
  return None


def _error(status: int, message: str, headers: dict[str, str] | None = None):
  return web.json_response({"error": {"message": message, "type": "test_server_error",
                                      "code": status}}, status=status, headers=headers)


def make_runner(server: OpenAIServer) -> web.AppRunner:
  app = web.Application()
  for prefix in ("/v1", ""):
    app.router.add_post(prefix + "/chat/completions", server.handle_chat)
    app.router.add_get(prefix + "/models", server.handle_models)
  app.router.add_get("/_testing/counters", server.handle_counters)

  @web.middleware
  async def swallow_drop(request, handler):
    try:
      return await handler(request)
    except _Drop:
      # The transport is already gone; this just ends the handler without a 500.
      raise asyncio.CancelledError() from None

  app.middlewares.append(swallow_drop)
  return web.AppRunner(app, access_log=None, handle_signals=False)


# --- a server in its own process (benchmarks) ---------------------------------------------


@contextlib.contextmanager
def serve_subprocess(*, latency_s: float = 0.0, fault_rate: float = 0.0,
                     seed: int = 0) -> Iterator[str]:
  """Runs the server (echo responder) in a child process; yields its base_url."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ)
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, "-m", "rlhi.testing.openai_server", "--latency-s", str(latency_s),
         "--fault-rate", str(fault_rate), "--seed", str(seed), "--no-log"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
  try:
    line = proc.stdout.readline()
    if not line.startswith("http://"):
      raise RuntimeError(f"test server did not start (said {line!r})")
    yield line.strip()
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--latency-s", type=float, default=0.0)
  parser.add_argument("--fault-rate", type=float, default=0.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-log", action="store_true",
                      help="keep counters only, not every request (long benchmarks)")
  args = parser.parse_args(argv)
  server = OpenAIServer(port=args.port, latency_s=args.latency_s,
                        fault_rate=args.fault_rate, seed=args.seed,
                        log_requests=not args.no_log)
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  with server:
    print(server.base_url, flush=True)
    try:
      stop.wait()
    except KeyboardInterrupt:
      pass


if __name__ == "__main__":
  main()
