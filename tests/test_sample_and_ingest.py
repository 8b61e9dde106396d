"""The bundled sample, the malformed-rows file, and the ingest stage end to end."""

import collections
import json
import subprocess
import sys

import pytest

from configs import data_prep
from rlhi.data import pipeline
from rlhi.data import schema
from rlhi.data import wildchat
from rlhi.data.samples import build_sample

FILES = ("wildchat_sample.jsonl", "reference_annotations.jsonl", "malformed_rows.jsonl")


def test_committed_sample_is_built_from_the_sources(tmp_path):
  build_sample.main(str(tmp_path))
  for name in FILES:
    with open(f"{wildchat.SAMPLES_DIR}/{name}", "rb") as f:
      committed = f.read()
    assert (tmp_path / name).read_bytes() == committed, (
        f"{name} is stale: run python -m rlhi.data.samples.build_sample")


def test_sample_has_what_the_issue_asks_for():
  users = build_sample.load_users()
  n_conv = collections.Counter(u["id"] for u in users for _ in u["conversations"])
  assert sum(1 for u in users if n_conv[u["id"]] >= 4) >= 24
  assert sum(n_conv.values()) >= 120
  labels = collections.Counter(
      m["annotation"]["label"] for u in users for c in u["conversations"]
      for m in c["messages"] if "annotation" in m)
  assert sum(labels.values()) >= 100
  assert set(labels) == {"new_request", "continuation", "clarification", "correction",
                         "style_feedback", "reattempt", "positive", "other"}
  for u in users:
    for c in u["conversations"]:
      msgs = c["messages"]
      for i, m in enumerate(msgs):
        a = m.get("annotation")
        # annotated exactly the user messages that follow an answer
        assert (a is not None) == (m["role"] == "user" and i > 0), (u["id"], i)
        if a:
          assert bool(a.get("rewrite")) == a["actionable"], (u["id"], m["content"])


# The reason ingest must give each line of malformed_rows.jsonl, written by hand from
# how build_sample.malformed_lines breaks it (None: a valid row that must be kept).
MALFORMED_EXPECTED = [
    None, "malformed_json", "invalid_utf8", "missing_field", "wrong_type", "wrong_type",
    "wrong_type", "empty_message", "non_alternating_roles", "message_too_long",
    "missing_field", "wrong_type", "bad_role", "wrong_type", None,
]
MALFORMED_DETAIL = {
    3: "invalid UTF-8", 4: "field 'conversation[0].role' is missing",
    5: "field 'conversation': expected list, got str",
    6: "field 'conversation[0].content': expected a string, got int",
    7: "field 'toxic': expected a bool, got str",
    9: "conversation[1] is user, expected assistant",
    10: "2000000 characters > 32000", 11: "field 'conversation_hash' is missing",
    12: "expected a JSON object per line, got list",
    13: "expected user or assistant, got 'bot'",
    14: "field 'timestamp': expected an ISO 8601 time, got 'yesterday'",
}


def test_malformed_rows_counts_and_messages(tmp_path):
  cfg = data_prep.get_config("sample")
  cfg.ingest.source = wildchat.MALFORMED_ROWS
  report = pipeline.run_ingest(cfg.ingest, str(tmp_path), progress=False)
  rejects = schema.read_jsonl(tmp_path / "ingest_rejects.jsonl", schema.Reject)
  got = {r.line: r.reason for r in rejects}
  want = {i: r for i, r in enumerate(MALFORMED_EXPECTED, start=1) if r}
  assert got == want
  for r in rejects:
    if r.line in MALFORMED_DETAIL:
      assert MALFORMED_DETAIL[r.line] in r.detail, (r.line, r.detail)
  assert report["rows_read"] == len(MALFORMED_EXPECTED)
  assert report["kept"] == MALFORMED_EXPECTED.count(None)  # nothing else lost
  assert sum(report["rejected"].values()) + report["kept"] == report["rows_read"]


def test_ingest_sample_end_to_end_and_byte_identical(tmp_path):
  cfg = data_prep.get_config("sample")
  a, b = tmp_path / "a", tmp_path / "b"
  report = pipeline.run_ingest(cfg.ingest, str(a), progress=False)
  pipeline.run_ingest(cfg.ingest, str(b), progress=False)
  for name in ("conversations.jsonl", "users.jsonl", "splits.json",
               "ingest_rejects.jsonl", "ingest_report.json", "ingest_report.md"):
    assert (a / name).read_bytes() == (b / name).read_bytes(), name

  # Independent expectation from the sources: every hand-written conversation is kept,
  # every extra row of build_sample._FILTERED is rejected for its own reason.
  source = build_sample.load_users()
  n_source = sum(len(u["conversations"]) for u in source)
  assert report["kept"] == n_source
  assert report["rejected"] == {"language": 2, "toxic": 1, "empty_message": 1,
                                "non_alternating_roles": 1, "duplicate_hash": 1}
  users = schema.read_jsonl(a / "users.jsonl", schema.User)
  assert {u.user_id for u in users} == {build_sample.hashed_ip(u["id"]) for u in source}
  splits = json.loads((a / "splits.json").read_text())["users"]
  assert all(splits[s] for s in schema.SPLITS)  # the sample fills every split
  assert sum(map(len, splits.values())) == len(users)
  convs = schema.read_jsonl(a / "conversations.jsonl", schema.Conversation)
  by_user = collections.defaultdict(list)
  for c in convs:
    by_user[c.user_id].append(c)
  for u in users:
    times = [c.timestamp for c in by_user[u.user_id]]
    assert times == sorted(times)
    assert u.history + u.targets == tuple(c.conversation_hash for c in by_user[u.user_id])
    assert len(u.targets) == min(2, len(times))


def test_demo_prepare_data_cli(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.prepare_data",
       "--config", "configs/data_prep.py:sample", "--workdir", str(tmp_path),
       "--stage", "ingest", "--config.ingest.num_targets=1"],
      capture_output=True, text=True, check=True)
  assert "# Ingest report" in out.stdout
  users = schema.read_jsonl(tmp_path / "users.jsonl", schema.User)
  assert all(len(u.targets) == 1 for u in users)


@pytest.mark.parametrize("module", ["rlhi.data.wildchat", "rlhi.data.pipeline",
                                    "rlhi.data.client"])
def test_data_package_does_not_import_jax(module):
  code = (f"import {module}, sys; bad = [m for m in ('jax', 'flax', 'optax', 'orbax') "
          f"if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)
