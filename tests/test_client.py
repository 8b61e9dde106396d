"""Tests of rlhi.data.client against the loopback OpenAI-compatible server.

Expected values are computed here from the request contents (word counts, echo text),
and "what was sent" is read from the server's own request log, not from client stats.
"""

import asyncio
import collections
import datetime
import email.utils
import json
import os
import pathlib
import secrets
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from rlhi.data import client as client_lib
from rlhi.data.client import ChatRequest
from rlhi.data.client import openai as openai_client
from rlhi.testing.openai_server import OpenAIServer, last_user_message, marker_fault

REPO = pathlib.Path(__file__).resolve().parents[1]
KEY_ENV = "RLHI_TEST_CLIENT_API_KEY"


@pytest.fixture
def api_key(monkeypatch):
  key = "sk-test-" + secrets.token_hex(16)
  monkeypatch.setenv(KEY_ENV, key)
  return key


def make_cfg(server, **overrides):
  cfg = client_lib.default_config()
  cfg.base_url = server.base_url
  cfg.model = "test-model"
  cfg.api_key_env = KEY_ENV
  cfg.concurrency = 16
  cfg.timeout_s = 5.0
  cfg.max_retries = 3
  cfg.backoff_base_s = 0.01
  cfg.backoff_max_s = 0.05
  for name, value in overrides.items():
    setattr(cfg, name, value)
  return cfg


def make_requests(n, prefix="item", **kwargs):
  return [ChatRequest(key=f"{prefix}/{i}",
                      messages=({"role": "system", "content": "be brief"},
                                {"role": "user", "content": f"{prefix} question number {i}"}),
                      **kwargs)
          for i in range(n)]


def words(text):
  return len(text.split())


def sent_contents(server):
  return [last_user_message(r.body) for r in server.requests()]


# ----------------------------------------------------------------------------------------
# Success path.
# ----------------------------------------------------------------------------------------


def test_success_path_order_tokens_and_request_body(api_key):
  reqs = make_requests(30)
  reqs.append(ChatRequest(key="json", messages=({"role": "user", "content": "give json"},),
                          temperature=0.7, top_p=0.9, max_tokens=64, json_mode=True,
                          seed=11))
  with OpenAIServer(latency_s=0.005) as server:
    cfg = make_cfg(server, extra_body={"top_k": 20})
    with client_lib.make_client(cfg) as client:
      results = client.chat(reqs)
      stats = client.stats()

  assert [r.key for r in results] == [r.key for r in reqs]
  for req, res in zip(reqs, results):
    user = req.messages[-1]["content"]
    assert res.ok and res.error is None and not res.cached and res.attempts == 1
    assert res.text == "echo: " + user
    assert res.prompt_tokens == sum(words(m["content"]) for m in req.messages)
    assert res.completion_tokens == words("echo: " + user)
  assert stats == {
      "requests": 31, "sent": 31, "cached": 0, "failed": 0, "retries": 0,
      "prompt_tokens": sum(words(m["content"]) for r in reqs for m in r.messages),
      "completion_tokens": sum(words("echo: " + r.messages[-1]["content"]) for r in reqs),
  }

  log = server.requests()
  assert len(log) == 31
  assert all(r.path == "/v1/chat/completions" for r in log)
  assert all(r.headers["Authorization"] == f"Bearer {api_key}" for r in log)
  by_content = {last_user_message(r.body): r.body for r in log}
  plain = by_content["item question number 0"]
  assert plain["model"] == "test-model" and plain["top_k"] == 20
  assert plain["temperature"] == 0.0 and plain["top_p"] == 1.0 and plain["max_tokens"] == 512
  assert "response_format" not in plain and "seed" not in plain
  assert plain["messages"] == [dict(m) for m in reqs[0].messages]
  special = by_content["give json"]
  assert special["response_format"] == {"type": "json_object"}
  assert (special["temperature"], special["top_p"], special["max_tokens"],
          special["seed"]) == (0.7, 0.9, 64, 11)


@pytest.mark.usefixtures("api_key")
def test_concurrency_bound_is_respected():
  in_flight = collections.Counter()

  async def responder(request_json):
    in_flight["now"] += 1
    in_flight["max"] = max(in_flight["max"], in_flight["now"])
    await asyncio.sleep(0.03)
    in_flight["now"] -= 1
    return "ok"

  with OpenAIServer(responder) as server:
    with client_lib.make_client(make_cfg(server, concurrency=4)) as client:
      results = client.chat(make_requests(24))
  assert all(r.ok for r in results)
  assert in_flight["max"] == 4


def _counting_responder(in_flight, name):
  async def responder(request_json):
    del request_json
    in_flight[name] += 1
    in_flight[name + "/max"] = max(in_flight[name + "/max"], in_flight[name])
    await asyncio.sleep(0.02)
    in_flight[name] -= 1
    return "ok from " + name
  return responder


@pytest.mark.usefixtures("api_key")
def test_replicas_share_the_load_within_their_concurrency():
  in_flight = collections.Counter()
  with OpenAIServer(_counting_responder(in_flight, "a")) as a, \
       OpenAIServer(_counting_responder(in_flight, "b")) as b:
    cfg = make_cfg(a, base_url=f"{a.base_url}, {b.base_url}", concurrency=3)
    with client_lib.make_client(cfg, cache_path=None) as client:
      results = client.chat(make_requests(60))
      stats = client.replica_stats()
      assert client.name.endswith("(+1 replicas) model=test-model")
    served = collections.Counter(r.text for r in results)
  assert all(r.ok for r in results)
  # 3 in flight on each, never more; the work split about evenly.
  assert (in_flight["a/max"], in_flight["b/max"]) == (3, 3)
  assert served["ok from a"] + served["ok from b"] == 60
  assert min(served.values()) >= 20, served
  assert stats == [{"url": a.base_url, "sent": served["ok from a"], "failed": 0},
                   {"url": b.base_url, "sent": served["ok from b"], "failed": 0}]


@pytest.mark.usefixtures("api_key")
def test_a_failing_replica_is_avoided_and_retries_go_to_another(tmp_path):
  with OpenAIServer(lambda body: "fine") as good, \
       OpenAIServer(permanent=lambda body: "500") as bad:
    # A list, in a plain dict config (a ConfigDict field holds one type: a string).
    cfg = dict(make_cfg(good, max_retries=1, concurrency=2, backoff_base_s=0.5,
                        backoff_max_s=1.0).to_dict(),
               base_url=[bad.base_url, good.base_url])
    with client_lib.make_client(cfg, cache_path=str(tmp_path / "c")) as client:
      results = client.chat(make_requests(40))
      stats = client.replica_stats()
    # Every item is answered: a request that failed on `bad` was retried on `good`.
    assert all(r.ok and r.text == "fine" for r in results)
    bad_sent = len(bad.requests())
  assert stats[0] == {"url": bad.base_url, "sent": bad_sent, "failed": bad_sent}
  assert stats[1]["failed"] == 0 and stats[1]["sent"] == 40
  # After its first failures the bad replica cools down: it got a few requests only.
  assert 1 <= bad_sent <= 4, bad_sent
  # The replicas' set keys the cache, whatever their order.
  cfg["base_url"] = f"{good.base_url},{bad.base_url}"
  with client_lib.make_client(cfg, cache_path=str(tmp_path / "c")) as client:
    assert all(r.cached for r in client.chat(make_requests(40)))
  with pytest.raises(ValueError, match="lists a replica twice"):
    client_lib.make_client(make_cfg(good, base_url=f"{good.base_url} {good.base_url}"))


@pytest.mark.usefixtures("api_key")
def test_progress_bar_and_empty_batch(capsys):
  with OpenAIServer() as server:
    with client_lib.make_client(make_cfg(server)) as client:
      assert client.chat([]) == []
      client.chat(make_requests(5), desc="classify follow-ups")
  err = capsys.readouterr().err
  assert "classify follow-ups" in err and "5/5" in err


# ----------------------------------------------------------------------------------------
# Retries and failures.
# ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("api_key")
def test_transient_faults_all_200_items_finish():
  kinds = ("500", "429", "drop", "slow", "malformed")
  with OpenAIServer(latency_s=0.002, fault_rate=0.2, fault_kinds=kinds, seed=3,
                    retry_after="0.02", slow_s=1.0) as server:
    cfg = make_cfg(server, concurrency=32, timeout_s=0.3, max_retries=8)
    with client_lib.make_client(cfg) as client:
      reqs = make_requests(200)
      results = client.chat(reqs)
      stats = client.stats()
    counters = server.counters()

  assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
  assert [r.text for r in results] == ["echo: " + r.messages[-1]["content"] for r in reqs]
  faults = {k: v for k, v in counters.items() if k.startswith("fault:")}
  assert set(faults) == {f"fault:{k}" for k in kinds}, faults
  n_faults = sum(faults.values())
  # About 20% of attempts failed; each failure cost exactly one retry.
  assert 0.1 < n_faults / counters["requests"] < 0.3
  assert stats["retries"] == n_faults
  assert stats["sent"] == counters["requests"] == 200 + n_faults
  assert sum(r.attempts for r in results) == stats["sent"]
  assert stats["failed"] == 0


@pytest.mark.usefixtures("api_key")
def test_retry_after_seconds_is_honoured():
  first_seen = set()

  def first_attempt_429(request_json):
    content = last_user_message(request_json)
    if content in first_seen:
      return None
    first_seen.add(content)
    return "429"

  with OpenAIServer(permanent=first_attempt_429, retry_after="0.6") as server:
    # Without Retry-After the retry would come after at most 1 ms of jittered backoff.
    cfg = make_cfg(server, backoff_base_s=0.001, backoff_max_s=5.0)
    with client_lib.make_client(cfg) as client:
      results = client.chat(make_requests(4))
  assert all(r.ok and r.attempts == 2 for r in results)
  arrivals = collections.defaultdict(list)
  for r in server.requests():
    arrivals[last_user_message(r.body)].append(r.time)
  gaps = [b - a for a, b in arrivals.values()]
  assert len(gaps) == 4 and min(gaps) >= 0.58 and max(gaps) < 1.5, gaps


@pytest.mark.usefixtures("api_key")
def test_retry_after_is_capped_at_backoff_max():
  with OpenAIServer(permanent=marker_fault("busy", "429"), retry_after="30") as server:
    cfg = make_cfg(server, max_retries=2, backoff_max_s=0.1)
    with client_lib.make_client(cfg) as client:
      start = time.monotonic()
      [result] = client.chat([ChatRequest(key="k", messages=(
          {"role": "user", "content": "busy"},))])
      elapsed = time.monotonic() - start
  assert not result.ok and result.attempts == 3
  assert result.error.startswith("HTTP 429 after 3 attempts")
  assert 0.2 <= elapsed < 2.0


def test_retry_after_http_date_is_parsed():
  when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=20)
  header = email.utils.format_datetime(when, usegmt=True)
  seconds = openai_client._parse_retry_after(header)  # pylint: disable=protected-access
  assert 18.5 <= seconds <= 20.5
  assert openai_client._parse_retry_after("7") == 7.0  # pylint: disable=protected-access
  assert openai_client._parse_retry_after("soon") is None  # pylint: disable=protected-access
  past = email.utils.format_datetime(when - datetime.timedelta(hours=1), usegmt=True)
  assert openai_client._parse_retry_after(past) == 0.0  # pylint: disable=protected-access


@pytest.mark.usefixtures("api_key")
def test_timeout_path():
  with OpenAIServer(permanent=marker_fault("hang", "slow"), slow_s=5.0) as server:
    cfg = make_cfg(server, timeout_s=0.2, max_retries=2, backoff_base_s=0.0)
    with client_lib.make_client(cfg) as client:
      start = time.monotonic()
      results = client.chat([
          ChatRequest(key="a", messages=({"role": "user", "content": "hang please"},)),
          ChatRequest(key="b", messages=({"role": "user", "content": "fine"},)),
      ])
      elapsed = time.monotonic() - start
      stats = client.stats()
  hung, fine = results
  assert fine.ok and fine.attempts == 1
  assert hung.text is None and hung.attempts == 3
  assert hung.error == "timeout after 0.2 s x 3"
  assert 0.6 <= elapsed < 3.0
  assert stats["failed"] == 1 and stats["sent"] == 4 and stats["retries"] == 2


@pytest.mark.usefixtures("api_key")
def test_non_retryable_status_fails_at_once_with_server_message():
  with OpenAIServer(permanent=marker_fault("forbidden", "403")) as server:
    with client_lib.make_client(make_cfg(server)) as client:
      [res] = client.chat([ChatRequest(key="x", messages=(
          {"role": "user", "content": "forbidden"},))])
  assert res.attempts == 1 and res.text is None
  assert res.error == "HTTP 403: injected fault: HTTP 403"
  assert server.counters()["requests"] == 1


@pytest.mark.usefixtures("api_key")
def test_long_server_messages_are_clipped():

  def responder(request_json):
    raise RuntimeError("x" * 5000)

  with OpenAIServer(responder) as server:
    with client_lib.make_client(make_cfg(server, max_retries=1)) as client:
      [res] = client.chat(make_requests(1))
  assert res.error.startswith("HTTP 500 after 2 attempts: responder failed: RuntimeError")
  assert len(res.error) < 400


@pytest.mark.usefixtures("api_key")
def test_permanent_failures_then_healthy_rerun_sends_only_the_failed(tmp_path):
  rules = {"FAIL500": "500", "FAIL400": "400", "DROPME": "drop", "BADJSON": "malformed",
           "NOCHOICES": "invalid"}

  def permanent(request_json):
    text = last_user_message(request_json)
    return next((kind for marker, kind in rules.items() if marker in text), None)

  reqs = make_requests(30)
  markers = list(rules)
  bad = [ChatRequest(key=f"bad/{m}", messages=({"role": "user", "content": f"{m} now"},))
         for m in markers]
  everything = reqs[:10] + bad + reqs[10:]
  cache_path = tmp_path / "cache" / "llm.sqlite"

  with OpenAIServer(permanent=permanent) as server:
    cfg = make_cfg(server, max_retries=2)
    with client_lib.make_client(cfg, cache_path=str(cache_path)) as client:
      first = client.chat(everything)
      stats1 = client.stats()
    failed = {r.key: r for r in first if not r.ok}
    assert set(failed) == {r.key for r in bad}
    assert failed["bad/FAIL500"].error == (
        "HTTP 500 after 3 attempts: injected fault: HTTP 500")
    assert failed["bad/FAIL400"].error == "HTTP 400: injected fault: HTTP 400"
    assert failed["bad/FAIL400"].attempts == 1
    assert failed["bad/DROPME"].error.startswith("connection error (")
    assert failed["bad/BADJSON"].error.startswith(
        "invalid response body after 3 attempts: not JSON")
    assert failed["bad/NOCHOICES"].error == (
        "invalid response body after 3 attempts: no choices[0].message.content")
    assert stats1["failed"] == 5 and stats1["requests"] == 35
    assert stats1["sent"] == server.counters()["requests"] == 30 + 1 + 4 * 3

    # The cache holds exactly the successes.
    with sqlite3.connect(cache_path) as db:
      assert db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 30

    # Heal the server (same base_url, so the same cache keys) and re-run twice.
    server.configure(permanent=None)
    server.clear()
    with client_lib.make_client(cfg, cache_path=str(cache_path)) as client:
      second = client.chat(everything)
      stats2 = client.stats()
    assert sorted(sent_contents(server)) == sorted(f"{m} now" for m in markers)
    assert all(r.ok for r in second)
    assert [r.text for r in second if r.key.startswith("item/")] == [
        r.text for r in first if r.key.startswith("item/")]
    assert sum(r.cached for r in second) == 30
    assert (stats2["cached"], stats2["sent"], stats2["failed"]) == (30, 5, 0)

    server.clear()
    with client_lib.make_client(cfg, cache_path=str(cache_path)) as client:
      third = client.chat(everything)
    assert server.requests() == []
    assert all(r.cached and r.attempts == 0 for r in third)
    # Cached answers keep their token counts.
    assert [r.prompt_tokens for r in third] == [r.prompt_tokens for r in second]


@pytest.mark.usefixtures("api_key")
def test_crash_mid_batch_keeps_finished_answers(tmp_path):
  cache_path = tmp_path / "llm.sqlite"
  with OpenAIServer(permanent=marker_fault("HANG", "slow"), slow_s=60.0) as server:
    script = textwrap.dedent(f"""
        from rlhi.data import client as client_lib
        cfg = client_lib.default_config()
        cfg.base_url = {server.base_url!r}
        cfg.model = "test-model"
        cfg.api_key_env = {KEY_ENV!r}
        cfg.concurrency = 8
        cfg.timeout_s = 120.0
        reqs = [client_lib.ChatRequest(key=f"k/{{i}}", messages=(
            {{"role": "user", "content": ("HANG " if i % 5 == 0 else "") + f"q {{i}}"}},))
            for i in range(25)]
        client_lib.make_client(cfg, cache_path={str(cache_path)!r}).chat(reqs)
        """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
      deadline = time.monotonic() + 30
      done = 0
      while time.monotonic() < deadline and done < 20:
        time.sleep(0.1)
        if cache_path.exists():
          with sqlite3.connect(cache_path, timeout=5) as db:
            try:
              done = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
            except sqlite3.OperationalError:
              done = 0  # Table not created yet.
      assert done == 20
      assert proc.poll() is None  # Still waiting for the 5 hung requests.
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()

    server.configure(permanent=None)
    server.clear()
    reqs = [ChatRequest(key=f"k/{i}", messages=(
        {"role": "user", "content": ("HANG " if i % 5 == 0 else "") + f"q {i}"},))
            for i in range(25)]
    with client_lib.make_client(make_cfg(server), cache_path=str(cache_path)) as client:
      results = client.chat(reqs)
      assert client.stats()["cached"] == 20
  assert all(r.ok for r in results)
  assert sorted(sent_contents(server)) == sorted(f"HANG q {i}" for i in range(0, 25, 5))


# ----------------------------------------------------------------------------------------
# Cache semantics.
# ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("api_key")
def test_structured_output_modes_send_the_schema_and_key_the_cache_on_it(tmp_path):
  schema = {"type": "object", "properties": {"label": {"type": "string",
                                                       "enum": ["a", "b"]}},
            "required": ["label"], "additionalProperties": False}
  text = json.dumps({"name": "classify", "schema": schema})
  msgs = ({"role": "user", "content": "give json"},)
  req = ChatRequest(key="k", messages=msgs, json_mode=True, json_schema=text)
  other_schema = ChatRequest(key="k", messages=msgs, json_mode=True, json_schema=text
                             .replace('"b"', '"c"'))
  sent = {}
  with OpenAIServer() as server:
    for mode in client_lib.STRUCTURED_OUTPUTS:
      server.clear()
      with client_lib.make_client(make_cfg(server, structured_output=mode),
                                  cache_path=str(tmp_path / "c")) as client:
        assert client.chat([req])[0].ok
        # Only a schema the server is sent keys the cache.
        sends = mode in ("json_schema", "json_object_schema")
        assert client.chat([other_schema])[0].cached == (not sends)
      sent[mode] = [r.body.get("response_format") for r in server.requests()]
  assert sent["json_schema"] == [
      {"type": "json_schema", "json_schema": {"name": "classify", "schema": schema,
                                              "strict": True}},
      {"type": "json_schema", "json_schema": {
          "name": "classify", "strict": True,
          "schema": json.loads(other_schema.json_schema)["schema"]}}]
  assert sent["json_object_schema"] == [
      {"type": "json_object", "schema": schema},
      {"type": "json_object", "schema": json.loads(other_schema.json_schema)["schema"]}]
  assert sent["json_object"] == [{"type": "json_object"}]
  assert sent["none"] == [None]  # a different mode is a different cache entry
  with pytest.raises(ValueError, match="'structured_output' must be one of "
                     "'json_schema', 'json_object_schema', 'json_object', 'none', got "
                     "'grammar'"):
    client_lib.make_client(make_cfg(server, structured_output="grammar"))


@pytest.mark.usefixtures("api_key")
def test_cache_key_ignores_item_key_and_dedups_within_a_batch(tmp_path):
  msgs = ({"role": "user", "content": "same prompt"},)
  reqs = [ChatRequest(key="classify/a", messages=msgs),
          ChatRequest(key="persona/b", messages=msgs),
          ChatRequest(key="sample/0", messages=msgs, temperature=0.6, seed=0),
          ChatRequest(key="sample/1", messages=msgs, temperature=0.6, seed=1)]
  with OpenAIServer() as server:
    with client_lib.make_client(make_cfg(server), cache_path=str(tmp_path / "c")) as client:
      results = client.chat(reqs)
      stats = client.stats()
    # A different model behind the same URL is a different answer.
    with client_lib.make_client(make_cfg(server, model="other-model"),
                                cache_path=str(tmp_path / "c")) as client:
      other = client.chat(reqs[:1])
  assert [r.key for r in results] == [r.key for r in reqs]
  assert all(r.ok for r in results)
  assert (results[0].cached, results[1].cached) == (False, True)
  assert (stats["sent"], stats["cached"]) == (3, 1)
  seeds = sorted(r.body.get("seed", -1) for r in server.requests())
  assert seeds == [-1, -1, 0, 1]  # 3 from the first client, 1 from the other model.
  assert not other[0].cached


def test_api_key_is_never_written_or_shown(api_key, tmp_path, caplog, capsys):
  caplog.set_level("DEBUG")

  def leaky_responder(request_json):
    if "leak" in last_user_message(request_json):
      # A server that echoes the key in its error message must not leak it through us.
      raise RuntimeError(f"bad credentials {api_key}")
    return "fine"

  with OpenAIServer(leaky_responder) as server:
    cfg = make_cfg(server, max_retries=1)
    cache_dir = tmp_path / "work"
    client = client_lib.make_client(cfg, cache_path=str(cache_dir / "llm.sqlite"))
    reqs = make_requests(10) + [ChatRequest(key="leak", messages=(
        {"role": "user", "content": "leak it"},))]
    results = client.chat(reqs, desc="leak test")
    shown = [client.name, repr(client), str(client), repr(results), repr(client.stats()),
             repr(vars(client)), repr(vars(client.inner)), repr(cfg)]
    client.close()
  assert server.requests()[0].headers["Authorization"] == f"Bearer {api_key}"
  assert "[redacted]" in results[-1].error
  for text in shown + [r.error or "" for r in results]:
    assert api_key not in text
  out = capsys.readouterr()
  assert api_key not in out.out + out.err
  assert all(api_key not in rec.getMessage() for rec in caplog.records)
  files = [p for p in tmp_path.rglob("*") if p.is_file()]
  assert any(p.name == "llm.sqlite" for p in files)
  for path in files:
    data = path.read_bytes()
    assert api_key.encode() not in data, path
    assert b"Bearer" not in data, path


# ----------------------------------------------------------------------------------------
# Reference backend.
# ----------------------------------------------------------------------------------------


def _write_annotations(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_reference_backend_lookup_and_unknown_key(tmp_path):
  path = tmp_path / "reference.jsonl"
  _write_annotations(path, [{"key": "classify/h1/1", "response": '{"label": "positive"}'},
                            {"key": "persona/u7", "response": "likes short answers"}])
  cfg = client_lib.default_config()
  cfg.backend = "reference"
  cfg.reference_path = str(path)
  msgs = ({"role": "user", "content": "whatever the prompt"},)
  with client_lib.make_client(cfg) as client:
    results = client.chat([ChatRequest(key="persona/u7", messages=msgs),
                           ChatRequest(key="nope/1", messages=msgs),
                           ChatRequest(key="classify/h1/1", messages=msgs)])
    stats = client.stats()
    name = client.name
  assert [r.text for r in results] == ["likes short answers", None, '{"label": "positive"}']
  assert results[1].error == "reference backend: no annotation for key 'nope/1'"
  assert stats["requests"] == 3 and stats["sent"] == 0 and stats["failed"] == 1
  assert "hand-written" in name and "not a model" in name


def test_reference_backend_default_path_and_cache(tmp_path):
  assert client_lib.DEFAULT_REFERENCE_PATH == (
      pathlib.Path(client_lib.__file__).resolve().parent.parent / "samples" /
      "reference_annotations.jsonl")
  path = tmp_path / "reference.jsonl"
  _write_annotations(path, [{"key": "a", "response": "first"}])
  cfg = client_lib.default_config()
  cfg.backend = "reference"
  cfg.reference_path = str(path)
  req = [ChatRequest(key="a", messages=({"role": "user", "content": "p"},))]
  cache = str(tmp_path / "cache.sqlite")
  with client_lib.make_client(cfg, cache_path=cache) as client:
    assert client.chat(req)[0].text == "first"
    assert client.chat(req)[0].cached
  # Edited annotations are not served stale from the cache.
  _write_annotations(path, [{"key": "a", "response": "second"}])
  with client_lib.make_client(cfg, cache_path=cache) as client:
    [res] = client.chat(req)
  assert (res.text, res.cached) == ("second", False)


def test_reference_backend_bad_files(tmp_path):
  missing = tmp_path / "missing.jsonl"
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    client_lib.ReferenceClient(missing)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"key": "a", "response": "x"}\n{"key": "b"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'response'"):
    client_lib.ReferenceClient(bad)
  dup = tmp_path / "dup.jsonl"
  _write_annotations(dup, [{"key": "a", "response": "x"}, {"key": "a", "response": "y"}])
  with pytest.raises(ValueError, match=r"dup.jsonl:2: field 'key': 'a' already annotated"):
    client_lib.ReferenceClient(dup)


# ----------------------------------------------------------------------------------------
# Event loops and config errors.
# ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("api_key")
def test_chat_works_inside_a_running_event_loop():
  with OpenAIServer() as server:
    client = client_lib.make_client(make_cfg(server))

    async def notebook_cell():
      assert asyncio.get_running_loop().is_running()
      return client.chat(make_requests(5))

    first = asyncio.run(notebook_cell())
    second = asyncio.run(notebook_cell())  # A second cell, a new loop: still fine.
    third = client.chat(make_requests(5))  # And plain synchronous use.
    client.close()
  for results in (first, second, third):
    assert [r.text for r in results] == [f"echo: item question number {i}" for i in range(5)]


def test_bad_config_errors(monkeypatch):
  def cfg(**kw):
    c = client_lib.default_config()
    c.model = "m"
    for k, v in kw.items():
      setattr(c, k, v)
    return c

  with pytest.raises(ValueError, match=r"backend='vllm'.*allowed: 'openai', 'reference', 'local'"):
    client_lib.make_client(cfg(backend="vllm"))
  monkeypatch.delenv("RLHI_NO_SUCH_KEY", raising=False)
  with pytest.raises(ValueError, match="RLHI_NO_SUCH_KEY"):
    client_lib.make_client(cfg(api_key_env="RLHI_NO_SUCH_KEY"))
  with pytest.raises(ValueError, match="'concurrency' must be an integer >= 1"):
    client_lib.make_client(cfg(concurrency=0))
  with pytest.raises(ValueError, match="'timeout_s' must be a number > 0"):
    client_lib.make_client(cfg(timeout_s=-1.0))
  with pytest.raises(ValueError, match="without '/chat/completions'"):
    client_lib.make_client(cfg(base_url="http://127.0.0.1:1/v1/chat/completions"))
  with pytest.raises(ValueError, match="'base_url' must start with http"):
    client_lib.make_client(cfg(base_url="127.0.0.1:8000"))
  with pytest.raises(ValueError, match="'model' is empty"):
    client_lib.make_client(cfg(model=""))
  with pytest.raises(ValueError, match="may not set 'stream'"):
    client_lib.make_client(cfg(extra_body={"stream": True}))
  typo = cfg()
  typo.unlock()
  typo.concurency = 4
  with pytest.raises(ValueError, match="unknown field.*concurency"):
    client_lib.make_client(typo)
  with pytest.raises(ValueError, match="'backend' is required"):
    client_lib.make_client({"model": "m"})
  with pytest.raises(ValueError, match="messages"):
    ChatRequest(key="k", messages=())
  with pytest.raises(ValueError, match=r"messages\[0\]"):
    ChatRequest(key="k", messages=({"role": "user"},))


# ----------------------------------------------------------------------------------------
# The loopback server itself, and odd inputs.
# ----------------------------------------------------------------------------------------


def test_server_fault_draws_are_reproducible_and_bad_requests_rejected():
  import httpx  # pylint: disable=import-outside-toplevel

  def fault_sequence(seed):
    kinds = ("500", "429", "malformed", "invalid")
    with OpenAIServer(fault_rate=0.5, fault_kinds=kinds, seed=seed) as server:
      with httpx.Client() as http:
        for i in range(40):
          body = {"model": "m", "messages": [{"role": "user", "content": f"q{i % 10}"}]}
          http.post(server.base_url + "/chat/completions", json=body)
        bad = http.post(server.base_url + "/chat/completions", content=b"not json")
        missing = http.get(server.base_url + "/nowhere")
      assert bad.status_code == 400 and missing.status_code == 404
      assert server.counters()["rejected"] == 1
      return [(last_user_message(r.body), r.attempt, r.fault)
              for r in server.requests() if r.body is not None]

  first = fault_sequence(seed=1)
  assert first == fault_sequence(seed=1)
  assert first != fault_sequence(seed=2)
  faults = [f for _, _, f in first]
  assert 10 <= sum(f is not None for f in faults) <= 30
  # Each body's attempts are numbered 0, 1, 2, 3 in arrival order.
  assert [a for c, a, _ in first if c == "q3"] == [0, 1, 2, 3]


@pytest.mark.usefixtures("api_key")
def test_lone_surrogates_in_messages_are_sent_and_cached(tmp_path):
  text = "broken emoji \ud83d from a scraped log"
  req = ChatRequest(key="s", messages=({"role": "user", "content": text},))
  with OpenAIServer(lambda _: "fine") as server:
    cfg = make_cfg(server)
    with client_lib.make_client(cfg, cache_path=str(tmp_path / "c.sqlite")) as client:
      [first] = client.chat([req])
      [second] = client.chat([req])
  assert first.text == "fine" and second.cached
  assert last_user_message(server.requests()[0].body) == text
