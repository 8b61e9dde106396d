"""Data stages end to end: the reference backend, and real HTTP with faults.

A scripted LLM on the loopback server answers from the hand-written annotations of the
sample, found by reading its own prompt (the follow-up text, the user's conversations),
so the HTTP path must reproduce the reference path exactly; faults are injected on top.
"""

import collections
import glob
import json
import os
import re
import secrets

import pytest

from configs import data_prep
from rlhi.data import classify
from rlhi.data import pipeline
from rlhi.data import schema
from rlhi.data.samples import build_sample
from rlhi.testing.openai_server import OpenAIServer

SOURCE_USERS = build_sample.load_users()


def _annotations():
  """(answer, follow-up) -> annotation; first user message of a user -> persona."""
  by_follow_up, persona_by_opening = {}, {}
  for u in SOURCE_USERS:
    for conv in u["conversations"]:
      msgs = conv["messages"]
      for i, m in enumerate(msgs):
        if "annotation" in m:
          by_follow_up[msgs[i - 1]["content"], m["content"]] = m["annotation"]
    if u.get("persona"):
      persona_by_opening[u["conversations"][0]["messages"][0]["content"]] = u["persona"]
  return by_follow_up, persona_by_opening


BY_FOLLOW_UP, PERSONA_BY_OPENING = _annotations()


def _between(tag, text):
  m = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.DOTALL)
  return m.group(1) if m else None


def _item(prompt):
  """(answer, follow-up) that a classify or rewrite prompt is about."""
  answer = _between("answer", prompt)
  if answer is None:  # classify: the answer ends the conversation block
    answer = _between("conversation", prompt).rsplit("[assistant]\n", 1)[1].rstrip("\n")
  return answer, _between("follow_up", prompt)


class ScriptedLLM:
  """Answers rlhi's own prompts from the sample's annotations, like a perfect model.

  `bad_first` follow-ups get an unknown label first and a good answer on re-ask;
  `always_bad` follow-ups get malformed JSON every time.
  """

  def __init__(self, bad_first=(), always_bad=()):
    self.bad_first, self.always_bad = set(bad_first), set(always_bad)

  def __call__(self, body):
    prompt = body["messages"][0]["content"]
    is_reask = len(body["messages"]) > 1
    if "<follow_up>" in prompt and "Rewrite the assistant's answer" not in prompt:
      item = _item(prompt)
      if item in self.always_bad:
        return '{"label": "style_feedback", "actionable": tru'
      a = BY_FOLLOW_UP[item]
      label = "banana" if (item in self.bad_first and not is_reask) else a["label"]
      return "```json\n" + json.dumps(dict(
          label=label, actionable=a["actionable"], feedback=a["feedback"],
          rationale=a["rationale"])) + "\n```"
    if "Infer this user's persona" in prompt:
      for opening, card in PERSONA_BY_OPENING.items():
        if opening in prompt:
          return json.dumps(card)
      raise KeyError("persona prompt of an unknown user")
    if "Rewrite the assistant's answer" in prompt:
      return BY_FOLLOW_UP[_item(prompt)]["rewrite"]
    raise KeyError("unknown prompt")


def _cfg(server=None, key_env=""):
  cfg = data_prep.get_config("sample")
  if server is not None:
    cfg.client.backend = "openai"
    cfg.client.base_url = server.base_url
    cfg.client.model = "scripted"
    cfg.client.api_key_env = key_env
    cfg.client.concurrency = 16
    cfg.client.timeout_s = 2.0
    cfg.client.max_retries = 8
    cfg.client.backoff_base_s = 0.01
    cfg.client.backoff_max_s = 0.05
  return cfg


def _run(cfg, workdir, stages=tuple(pipeline.STAGES)):
  return {s: pipeline.run_stage(s, cfg, str(workdir)) for s in stages}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  return workdir, _run(_cfg(), workdir)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_reference_run_matches_the_hand_written_annotations(reference_run):
  workdir, reports = reference_run
  # Independent expectation straight from the source files.
  want_labels = collections.Counter(
      m["annotation"]["label"] for u in SOURCE_USERS for c in u["conversations"]
      for m in c["messages"] if "annotation" in m)
  follow_ups = schema.read_jsonl(workdir / "follow_ups.jsonl", schema.FollowUp)
  assert collections.Counter(f.label for f in follow_ups) == want_labels
  assert reports["classify"]["rejected"] == {}
  users = schema.read_jsonl(workdir / "users.jsonl", schema.User)
  personas = schema.read_jsonl(workdir / "personas.jsonl", schema.Persona)
  assert len(personas) == sum(len(u.history) >= 2 for u in users)
  n_actionable_targets = sum(f.actionable and f.part == "target" for f in follow_ups)
  assert reports["rewrites"]["actionable_targets"] == n_actionable_targets
  pairs = [p for s in schema.SPLITS
           for p in schema.read_jsonl(workdir / f"pairs_rewrites.{s}.jsonl",
                                      schema.PreferencePair)]
  assert len(pairs) + sum(reports["rewrites"]["rejected"].values()) == n_actionable_targets
  conv = {c.conversation_hash: c for c in
          schema.read_jsonl(workdir / "conversations.jsonl", schema.Conversation)}
  for p in pairs:
    c = conv[p.conversation_hash]
    assert p.rejected == c.messages[p.message_index].content
    assert p.prompt == c.messages[:p.message_index]
    assert p.prompt[-1].role == "user"
    item = (p.rejected, c.messages[p.message_index + 1].content)
    assert p.chosen == BY_FOLLOW_UP[item]["rewrite"]


def test_hf_pairs_are_trl_conversational(reference_run):
  import datasets
  workdir, reports = reference_run
  dd = datasets.load_from_disk(str(workdir / "pairs_rewrites_hf"))
  assert {s: dd[s].num_rows for s in dd} == reports["rewrites"]["pairs_by_split"]
  row = dd["train"][0]
  assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
  assert row["persona"] and row["label"] in (
      "clarification", "correction", "style_feedback", "reattempt")


def test_rerun_is_cached_and_identical(reference_run, tmp_path):
  workdir, _ = reference_run
  again = _run(_cfg(), workdir, ("classify",))
  assert again["classify"]["requests"]["cached"] == again["classify"]["follow_ups"]


def test_http_path_with_transient_faults_equals_reference(reference_run, tmp_path):
  ref_dir, _ = reference_run
  key = "sk-test-" + secrets.token_hex(16)
  os.environ["RLHI_TEST_API_KEY"] = key
  try:
    with OpenAIServer(ScriptedLLM(), fault_rate=0.2, seed=3, retry_after="0",
                      slow_s=3.0) as server:
      reports = _run(_cfg(server, "RLHI_TEST_API_KEY"), tmp_path)
      log = server.requests()
  finally:
    del os.environ["RLHI_TEST_API_KEY"]
  faults = collections.Counter(r.fault for r in log if r.fault)
  assert sum(faults.values()) >= 0.1 * len(log), faults  # faults really happened
  assert reports["classify"]["requests"]["retries"] > 0
  for name in ["follow_ups.jsonl", "personas.jsonl"] + [
      f"pairs_rewrites.{s}.jsonl" for s in schema.SPLITS]:
    assert _read(tmp_path / name) == _read(ref_dir / name), name
  # The key was sent, and was written nowhere.
  assert all(r.headers.get("Authorization") == f"Bearer {key}" for r in log)
  for path in glob.glob(str(tmp_path / "**" / "*"), recursive=True):
    if os.path.isfile(path):
      assert key.encode() not in _read(path), path
  assert reports["classify"]["requests"]["prompt_tokens"] > 0


def test_permanent_failures_go_to_rejects_and_a_rerun_completes_only_them(
    reference_run, tmp_path):
  ref_dir, _ = reference_run
  doomed = sorted(BY_FOLLOW_UP)[:5]

  def permanent(body):
    prompt = body["messages"][0]["content"]
    return "500" if _item(prompt) in doomed else None

  cfg = _cfg()
  _run(cfg, tmp_path, ("ingest",))
  with OpenAIServer(ScriptedLLM(), permanent=permanent) as server:
    cfg = _cfg(server)
    cfg.client.max_retries = 2
    report = pipeline.run_stage("classify", cfg, str(tmp_path))
    assert report["rejected"] == {"request_failed": 5}
    rejects = schema.read_jsonl(tmp_path / "classify_rejects.jsonl", schema.Reject)
    assert all("HTTP 500" in r.detail and r.key.startswith("classify/") for r in rejects)
    assert report["classified"] + 5 == report["follow_ups"]

    server.configure(permanent=None)
    server.clear()
    report = pipeline.run_stage("classify", cfg, str(tmp_path))
    assert report["rejected"] == {} and report["requests"]["sent"] == 5
    sent = {_item(r.body["messages"][0]["content"]) for r in server.requests()}
    assert sent == set(doomed)
  assert _read(tmp_path / "follow_ups.jsonl") == _read(ref_dir / "follow_ups.jsonl")


def test_bad_answers_are_reasked_once_then_rejected_and_a_rerun_heals_them(tmp_path):
  cfg = _cfg()
  _run(cfg, tmp_path, ("ingest",))
  texts = sorted(BY_FOLLOW_UP)
  bad_first, always_bad = texts[:3], texts[3:5]
  with OpenAIServer(ScriptedLLM(bad_first, always_bad)) as server:
    report = pipeline.run_stage("classify", _cfg(server), str(tmp_path))
    reasks = [r for r in server.requests() if len(r.body["messages"]) == 3]
    assert report["rejected"] == {"invalid_answer": 2}
    assert len(reasks) == 5  # one re-ask per bad first answer, no more
    assert "unknown label 'banana'" in reasks[0].body["messages"][2]["content"]
    rejects = schema.read_jsonl(tmp_path / "classify_rejects.jsonl", schema.Reject)
    assert all("not valid JSON" in r.detail and "after re-ask" in r.detail
               for r in rejects)
    # What the model said, both times, is in the rejects file and the report.
    bad = '{"label": "style_feedback", "actionable": tru'
    assert [json.loads(r.raw) for r in rejects] == [[bad, bad]] * 2
    assert report["common_failures"] == [{
        "kind": "invalid answer: not valid JSON", "items": 2, "key": rejects[0].key,
        "reason": rejects[0].detail, "answers": [bad, bad]}]
    md = (tmp_path / "classify_report.md").read_text()
    assert (f"| invalid answer: not valid JSON | 2 | {rejects[0].key} | "
            f"{json.dumps(bad)} / {json.dumps(bad)} |") in md

    # The rejected answers did not stay in the request cache: once the server is
    # healthy, a re-run heals the two rejected items by sending exactly their first
    # requests again (the three saved by their re-ask come from the cache).
    server.configure(responder=ScriptedLLM())
    server.clear()
    report = pipeline.run_stage("classify", _cfg(server), str(tmp_path))
    sent = [r.body["messages"] for r in server.requests()]
  assert report["rejected"] == {}
  assert sorted(_item(m[0]["content"]) for m in sent) == sorted(always_bad)
  assert all(len(m) == 1 for m in sent)  # first requests, no re-asks


def test_target_text_never_reaches_a_persona(tmp_path):
  cfg = _cfg()
  _run(cfg, tmp_path, ("ingest",))
  with OpenAIServer(ScriptedLLM()) as server:
    pipeline.run_stage("persona", _cfg(server), str(tmp_path))
    prompts = [r.body["messages"][0]["content"] for r in server.requests()]
  users = schema.read_jsonl(tmp_path / "users.jsonl", schema.User)
  convs = {c.conversation_hash: c for c in
           schema.read_jsonl(tmp_path / "conversations.jsonl", schema.Conversation)}
  personas = _read(tmp_path / "personas.jsonl").decode()
  assert prompts
  for u in users:
    for h in u.targets:
      for m in convs[h].messages:
        snippet = m.content.strip()[:80]
        if len(snippet) < 25:
          continue  # short texts ("thanks!") recur legitimately
        assert not any(snippet in p for p in prompts), snippet
        assert snippet not in personas
  # and the history does reach it
  u = next(u for u in users if len(u.history) >= 2)
  assert any(convs[u.history[0]].messages[0].content in p for p in prompts)


def test_users_with_little_history_get_no_persona(reference_run):
  workdir, reports = reference_run
  users = schema.read_jsonl(workdir / "users.jsonl", schema.User)
  short = sum(len(u.history) < 2 for u in users)
  assert short >= 1
  assert reports["persona"]["rejected"] == {"too_little_history": short}


def test_regenerated_rejected_answers_come_from_the_policy_client(reference_run,
                                                                   tmp_path):
  """rewrites.rejected='regenerate': the base policy (here a loopback server) answers
  each prompt without the persona; its answer is the rejected side, an empty one is
  counted as a reject, and the chosen rewrites are those of the reference run."""
  ref_dir, _ = reference_run
  ref_pairs = {p.pair_id: p for s in schema.SPLITS for p in schema.read_jsonl(
      ref_dir / f"pairs_rewrites.{s}.jsonl", schema.PreferencePair)}
  doomed = min(ref_pairs.values(), key=lambda p: p.pair_id)
  doomed_request = doomed.prompt[-1].content

  def policy(body):
    assert body["temperature"] == 0.7 and body["messages"][-1]["role"] == "user"
    assert not any(m["role"] == "system" for m in body["messages"])  # no persona
    last = body["messages"][-1]["content"]
    if last == doomed_request:
      return ""
    return f"Base policy answer number {len(last)} to the last request."

  cfg = _cfg()
  _run(cfg, tmp_path, ("ingest", "classify", "persona"))
  cfg.rewrites.rejected = "regenerate"
  with OpenAIServer(policy) as server:
    cfg.policy_client.backend = "openai"
    cfg.policy_client.base_url = server.base_url
    cfg.policy_client.model = "base-policy"
    cfg.policy_client.api_key_env = ""
    report = pipeline.run_stage("rewrites", cfg, str(tmp_path))
    asked = len(server.requests())
  got = {p.pair_id: p for s in schema.SPLITS for p in schema.read_jsonl(
      tmp_path / f"pairs_rewrites.{s}.jsonl", schema.PreferencePair)}
  assert asked == report["actionable_targets"]  # one regeneration per rewrite
  assert report["rejected_answer"] == "regenerate"
  assert report["rejected"].get("regeneration_failed") == 1
  rejects = schema.read_jsonl(tmp_path / "rewrites_rejects.jsonl", schema.Reject)
  assert [r.detail for r in rejects if r.reason == "regeneration_failed"] == [
      "regeneration failed: empty answer"]
  assert doomed.pair_id not in got
  # Every reference pair but the doomed one is kept (a rewrite can only get further
  # from a different rejected answer), with the same chosen side and prompt.
  assert set(ref_pairs) - {doomed.pair_id} <= set(got)
  for pid, p in got.items():
    assert p.rejected == (f"Base policy answer number {len(p.prompt[-1].content)} to "
                          "the last request.")
    if pid in ref_pairs:
      assert (p.chosen, p.prompt) == (ref_pairs[pid].chosen, ref_pairs[pid].prompt)


def test_structured_outputs_send_each_stage_its_schema(reference_run, tmp_path):
  """With structured_output='json_schema' the server is sent each stage's JSON schema
  (the classifier's labels as an enum), and the outputs are those of the reference."""
  ref_dir, _ = reference_run
  cfg = _cfg()
  _run(cfg, tmp_path, ("ingest",))
  with OpenAIServer(ScriptedLLM()) as server:
    cfg = _cfg(server)
    cfg.client.structured_output = "json_schema"
    _run(cfg, tmp_path, ("classify", "persona"))
    formats = [r.body["response_format"] for r in server.requests()]
  by_name = collections.defaultdict(list)
  for f in formats:
    assert f["type"] == "json_schema" and f["json_schema"]["strict"] is True
    by_name[f["json_schema"]["name"]].append(f["json_schema"]["schema"])
  assert set(by_name) == {"classify", "persona"}
  labels = [n for n, _ in classify.ClassifyConfig.from_config(cfg.classify).labels]
  (classify_schema,) = {json.dumps(s, sort_keys=True) for s in by_name["classify"]}
  classify_schema = json.loads(classify_schema)
  assert classify_schema["properties"]["label"] == {"type": "string", "enum": labels}
  assert classify_schema["required"] == ["label", "actionable", "feedback", "rationale"]
  assert not classify_schema["additionalProperties"]
  assert set(by_name["persona"][0]["required"]) == {
      "summary", "preferences", "expertise", "recurring_topics", "dislikes"}
  for name in ("follow_ups.jsonl", "personas.jsonl"):
    assert _read(tmp_path / name) == _read(ref_dir / name), name


def test_a_stage_over_two_replicas_reports_each(reference_run, tmp_path):
  ref_dir, _ = reference_run
  _run(_cfg(), tmp_path, ("ingest",))
  with OpenAIServer(ScriptedLLM()) as a, OpenAIServer(ScriptedLLM()) as b:
    cfg = _cfg(a)
    cfg.client.base_url = f"{a.base_url},{b.base_url}"
    report = pipeline.run_stage("classify", cfg, str(tmp_path))
    sent = (len(a.requests()), len(b.requests()))
  assert [r["url"] for r in report["replicas"]] == [a.base_url, b.base_url]
  assert tuple(r["sent"] for r in report["replicas"]) == sent and min(sent) > 0
  assert "| replica | HTTP sent | failed attempts |" in (
      tmp_path / "classify_report.md").read_text()
  assert _read(tmp_path / "follow_ups.jsonl") == _read(ref_dir / "follow_ups.jsonl")
