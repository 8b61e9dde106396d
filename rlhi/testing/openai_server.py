"""A loopback OpenAI-compatible chat-completions server for tests and benchmarks.

Real HTTP/1.1 on 127.0.0.1 with an ephemeral port, served on an event loop in a
background thread, so the client under test goes through sockets, keep-alive, timeouts
and dropped connections exactly as against vLLM or a hosted API:

    with OpenAIServer(responder=lambda req: "hi", latency_s=0.01) as server:
      cfg.base_url = server.base_url          # http://127.0.0.1:<port>/v1
      ...
      assert server.counters()["requests"] == 3
      assert server.requests()[0].headers["authorization"] == "Bearer ..."

Endpoints: POST {/v1,}/chat/completions, GET {/v1,}/models, GET /_testing/counters.

Answers: `responder(request_json) -> str` (sync or async) writes the assistant text;
the default echoes the last user message. A responder that raises gives an HTTP 500 with
the exception's message. Usage is counted in whitespace-separated words
(`count_tokens`), so a test can compute expected totals on its own. A request a real
server would refuse (not JSON, no messages, stream=true) gets a 400.

Faults, chosen per attempt (one HTTP request):
  - permanent: `permanent(request_json) -> kind | None`, e.g.
    `marker_fault("FAIL_ME", "500")` fails every request whose messages contain
    "FAIL_ME", on every attempt;
  - transient: with probability `fault_rate`, one kind drawn from `fault_kinds`. The draw
    is a hash of (seed, request body, how many times that body was seen before), so a
    run is reproducible whatever order concurrent requests arrive in, and a retry of
    the same body gets a fresh draw.
Kinds: "<3-digit status>" (an error JSON with that status; 429 adds `Retry-After:
retry_after`), "drop" (reset the connection without answering), "slow" (answer after
`slow_s`, past the client's timeout), "malformed" (200 with a truncated JSON body),
"invalid" (200 with JSON that has no `choices`).

`configure(**changes)` swaps the behaviour of a running server (e.g. heal it for a
re-run: the base_url, and so the client's cache key, stays the same).

The HTTP layer is a small asyncio protocol rather than aiohttp.web: the benchmark's
server shares two cores with the client under test, and aiohttp.web spent ~4x more CPU
per request (175 vs 45 us), which showed up as client "latency". It speaks the subset
that HTTP clients use for JSON APIs: Content-Length or chunked request bodies,
keep-alive, `Connection: close`, `Expect: 100-continue`; one request at a time per
connection, answered in order.

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
import http
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Awaitable, Callable, Iterator, Mapping, Union

try:
  import uvloop  # Optional: a cheaper server leaves more of the machine to the client.
except ImportError:  # pragma: no cover
  uvloop = None

Responder = Callable[[dict[str, Any]], Union[str, Awaitable[str]]]
FaultRule = Callable[[dict[str, Any]], Union[str, None]]

# The mix a flaky real deployment produces; "invalid" and other statuses are opt-in.
TRANSIENT_FAULTS = ("500", "429", "drop", "slow", "malformed")
_NAMED_FAULTS = ("drop", "slow", "malformed", "invalid")
_MAX_HEAD_BYTES = 64 * 1024


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


class Headers(dict):
  """Request headers with case-insensitive lookup (keys are stored lower-cased)."""

  def __getitem__(self, name: str) -> str:
    return super().__getitem__(name.lower())

  def get(self, name: str, default: Any = None) -> Any:
    return super().get(name.lower(), default)

  def __contains__(self, name: object) -> bool:
    return isinstance(name, str) and super().__contains__(name.lower())


@dataclasses.dataclass(frozen=True)
class LoggedRequest:
  """One HTTP request as the server received it."""
  time: float                         # time.monotonic() at arrival
  method: str
  path: str
  headers: Headers                    # case-insensitive: headers["Authorization"]
  body: Any                           # the parsed JSON body; None if it was not JSON
  attempt: int                        # times this exact body had been received before
  fault: str | None                   # the fault served; None for a normal answer


@dataclasses.dataclass
class _Reply:
  status: int
  body: bytes
  headers: Mapping[str, str] | None = None


_DROP = object()  # Handler result: reset the connection instead of answering.


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
    self._server: asyncio.AbstractServer | None = None
    self._connections: set[_HttpProtocol] = set()
    self.port: int | None = None

  # --- lifecycle ------------------------------------------------------------------------

  @property
  def base_url(self) -> str:
    if self.port is None:
      raise RuntimeError("server not started")
    host = f"[{self._host}]" if ":" in self._host else self._host
    return f"http://{host}:{self.port}/v1"

  def start(self) -> "OpenAIServer":
    if self._thread is not None:
      raise RuntimeError("server already started")
    self._loop = uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()
    started = threading.Event()
    errors: list[BaseException] = []

    def run():
      asyncio.set_event_loop(self._loop)
      try:
        self._loop.run_until_complete(self._listen())
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
      self._thread = None
      raise errors[0]
    return self

  def stop(self) -> None:
    if self._thread is None or self._loop is None:
      return
    asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(timeout=30)
    self._thread = None

  def __enter__(self) -> "OpenAIServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  async def _listen(self) -> None:
    loop = asyncio.get_running_loop()
    self._server = await loop.create_server(lambda: _HttpProtocol(self), self._host,
                                            self._port)
    self.port = self._server.sockets[0].getsockname()[1]

  async def _shutdown(self) -> None:
    self._server.close()
    for connection in list(self._connections):
      connection.abort()
    # Handlers still sleeping ("slow" faults, latency) would be destroyed pending.
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
      task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await self._server.wait_closed()

  # --- behaviour, log, counters ---------------------------------------------------------

  @property
  def behaviour(self) -> Behaviour:
    return self._behaviour

  def configure(self, **changes: Any) -> None:
    """Changes the behaviour from now on (requests already being served keep theirs)."""
    self._behaviour = dataclasses.replace(self._behaviour, **changes)

  def requests(self) -> list[LoggedRequest]:
    """A copy of the log of every chat request received so far."""
    with self._lock:
      return list(self._log)

  def counters(self) -> dict[str, int]:
    """Chat requests: requests, answered (normal 200s), rejected (refused with a 400 as
    a real server would) and 'fault:<kind>' for each fault served."""
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

  async def handle(self, method: str, path: str, headers: Headers, raw: bytes):
    """Returns a _Reply, or _DROP to reset the connection."""
    path = path.split("?", 1)[0]
    if path in ("/v1/chat/completions", "/chat/completions"):
      if method != "POST":
        return _error(405, f"{method} not allowed on {path}")
      return await self._chat(path, headers, raw)
    if path in ("/v1/models", "/models") and method == "GET":
      return _json(200, {"object": "list",
                         "data": [{"id": "test-model", "object": "model"}]})
    if path == "/_testing/counters" and method == "GET":
      # process_cpu_s lets a benchmark see how much of the machine the server used.
      return _json(200, {**self.counters(), "process_cpu_s": time.process_time()})
    return _error(404, f"no route for {method} {path}")

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

  async def _chat(self, path: str, headers: Headers, raw: bytes):
    b = self._behaviour  # One snapshot per request: configure() may swap it meanwhile.
    arrival = time.monotonic()
    try:
      body = json.loads(raw)
    except ValueError:
      body = None
    problem = _validate(body)
    attempt, fault = self._choose_fault(b, body, raw) if not problem else (0, None)
    with self._lock:
      self._counters["requests"] += 1
      self._counters["rejected" if problem else f"fault:{fault}" if fault else
                     "answered"] += 1
      if self._log_requests:
        self._log.append(LoggedRequest(time=arrival, method="POST", path=path,
                                       headers=headers, body=body, attempt=attempt,
                                       fault=fault))
    if b.latency_s:
      await asyncio.sleep(b.latency_s)
    if problem:
      return _error(400, problem)
    if fault == "drop":
      return _DROP
    if fault == "slow":
      await asyncio.sleep(b.slow_s)
    elif fault == "malformed":
      return _Reply(200, b'{"id": "chatcmpl-x", "choices": [{"mess')
    elif fault == "invalid":
      return _json(200, {"id": "chatcmpl-x", "object": "chat.completion"})
    elif fault is not None:
      status = int(fault)
      extra = {"Retry-After": b.retry_after} if status == 429 else None
      return _error(status, f"injected fault: HTTP {status}", extra)

    try:
      text = b.responder(body)
      if inspect.isawaitable(text):
        text = await text
    except Exception as e:  # pylint: disable=broad-except
      return _error(500, f"responder failed: {type(e).__name__}: {e}")
    prompt_tokens = sum(count_tokens(m["content"]) for m in body["messages"])
    completion_tokens = count_tokens(text)
    return _json(200, {
        "id": f"chatcmpl-{attempt}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })


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


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> _Reply:
  return _Reply(status, json.dumps(payload).encode("utf-8"), headers)


def _error(status: int, message: str,
           headers: Mapping[str, str] | None = None) -> _Reply:
  return _json(status, {"error": {"message": message, "type": "test_server_error",
                                  "code": status}}, headers)


class _BadRequest(Exception):
  pass


class _HttpProtocol(asyncio.Protocol):
  """One connection: parses requests one at a time and writes replies in order."""

  def __init__(self, server: OpenAIServer):
    self._server = server
    self._buffer = bytearray()
    self._transport: asyncio.Transport | None = None
    self._busy = False  # A request is being handled; later bytes wait in the buffer.
    self._sent_continue = False
    self._task: asyncio.Task | None = None

  def connection_made(self, transport) -> None:
    self._transport = transport
    self._server._connections.add(self)  # pylint: disable=protected-access
    sock = transport.get_extra_info("socket")
    if sock is not None:
      with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

  def connection_lost(self, exc) -> None:
    self._server._connections.discard(self)  # pylint: disable=protected-access
    self._transport = None
    if self._task is not None:
      self._task.cancel()

  def abort(self) -> None:
    if self._transport is not None:
      self._transport.abort()

  def data_received(self, data: bytes) -> None:
    self._buffer += data
    if not self._busy:
      self._next_request()

  def _next_request(self) -> None:
    try:
      parsed = self._parse()
    except _BadRequest as e:
      self._write(_error(400, str(e)), keep_alive=False)
      return
    if parsed is None:
      return
    self._busy = True
    self._task = asyncio.get_running_loop().create_task(self._serve(*parsed))

  def _parse(self):
    """(method, path, headers, body, keep_alive) once a whole request is buffered."""
    end = self._buffer.find(b"\r\n\r\n")
    if end < 0:
      if len(self._buffer) > _MAX_HEAD_BYTES:
        raise _BadRequest("request head too large")
      return None
    lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
    try:
      method, path, version = lines[0].split(" ", 2)
    except ValueError:
      raise _BadRequest(f"bad request line {lines[0][:100]!r}") from None
    headers = Headers()
    for line in lines[1:]:
      name, sep, value = line.partition(":")
      if not sep:
        raise _BadRequest(f"bad header line {line[:100]!r}")
      headers[name.strip().lower()] = value.strip()
    start = end + 4
    if "chunked" in headers.get("transfer-encoding", "").lower():
      body, consumed = _dechunk(self._buffer, start)
      if body is None:
        self._maybe_continue(headers)
        return None
    else:
      try:
        length = int(headers.get("content-length", "0"))
      except ValueError:
        raise _BadRequest("bad Content-Length") from None
      if len(self._buffer) < start + length:
        self._maybe_continue(headers)
        return None
      body, consumed = bytes(self._buffer[start:start + length]), start + length
    del self._buffer[:consumed]
    self._sent_continue = False
    connection = headers.get("connection", "").lower()
    keep_alive = (version == "HTTP/1.1" and connection != "close") or (
        version == "HTTP/1.0" and connection == "keep-alive")
    return method, path, headers, body, keep_alive

  def _maybe_continue(self, headers: Headers) -> None:
    if (headers.get("expect", "").lower() == "100-continue" and not self._sent_continue and
        self._transport is not None):
      self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
      self._sent_continue = True

  async def _serve(self, method, path, headers, body, keep_alive) -> None:
    try:
      reply = await self._server.handle(method, path, headers, body)
    except asyncio.CancelledError:
      return
    except Exception as e:  # pylint: disable=broad-except
      reply = _error(500, f"test server error: {type(e).__name__}: {e}")
    if reply is _DROP:
      # Abort (RST) rather than a polite close: what a crashed worker or a proxy reset
      # looks like to the client.
      self.abort()
      return
    self._write(reply, keep_alive)
    self._busy = False
    self._task = None
    if keep_alive and self._buffer and self._transport is not None:
      self._next_request()

  def _write(self, reply: _Reply, keep_alive: bool) -> None:
    if self._transport is None or self._transport.is_closing():
      return  # The client went away (e.g. it timed out on a "slow" answer).
    head = [f"HTTP/1.1 {reply.status} {http.HTTPStatus(reply.status).phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(reply.body)}",
            "Server: rlhi-openai-test-server"]
    for name, value in (reply.headers or {}).items():
      head.append(f"{name}: {value}")
    if not keep_alive:
      head.append("Connection: close")
    self._transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body)
    if not keep_alive:
      self._transport.close()


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes | None, int]:
  """Decodes a chunked body at buffer[start:]; (None, 0) while it is incomplete."""
  out = bytearray()
  pos = start
  while True:
    eol = buffer.find(b"\r\n", pos)
    if eol < 0:
      return None, 0
    try:
      size = int(bytes(buffer[pos:eol]).split(b";", 1)[0], 16)
    except ValueError:
      raise _BadRequest("bad chunk size") from None
    pos = eol + 2
    if size == 0:
      trailer_end = buffer.find(b"\r\n\r\n", pos - 2)
      if trailer_end < 0:
        return None, 0
      return bytes(out), trailer_end + 4
    if len(buffer) < pos + size + 2:
      return None, 0
    out += buffer[pos:pos + size]
    pos += size + 2


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
