"""WildChat ingestion: every filter on hand-made rows, users, ordering and splits."""

import collections
import hashlib
import json

import pytest

from rlhi.data import wildchat
from rlhi.data.wildchat import IngestConfig, RowError


def msg(role, content, **kw):
  return {"role": role, "content": content, "timestamp": "2023-05-01T10:00:00Z",
          "toxic": False, "turn_identifier": 1, **kw}


def row(h="h", ip="ip1", t="2023-05-01T10:00:00Z", turns=1, lang="English", **kw):
  conv = []
  for i in range(turns):
    conv += [msg("user", f"question {i}"), msg("assistant", f"answer {i}")]
  base = {"conversation_hash": h, "model": "gpt-4-0314", "timestamp": t,
          "conversation": conv, "turn": turns, "language": lang, "toxic": False,
          "redacted": False, "hashed_ip": ip, "country": "Chile", "state": None,
          "header": {"user-agent": "UA-1", "accept-language": "en"}}
  base.update(kw)
  return base


CFG = IngestConfig(max_turns=3, max_message_chars=100)


def reason(r, cfg=CFG):
  with pytest.raises(RowError) as e:
    wildchat.normalize_row(r, cfg)
  return e.value.reason


def test_valid_row_normalises():
  c = wildchat.normalize_row(row(turns=2, t="2023-05-01 10:00:00"), CFG)
  assert c.user_id == "ip1" and c.timestamp == "2023-05-01T10:00:00Z"
  assert [m.role for m in c.messages] == ["user", "assistant"] * 2
  assert c.follow_up_indices() == [2]


@pytest.mark.parametrize("r,expected", [
    (row(lang="Spanish"), "language"),
    (row(toxic=True), "toxic"),
    (row(conversation=[msg("user", "hey", toxic=True), msg("assistant", "hi")]),
     "toxic"),
    (row(conversation=[msg("user", "  \n"), msg("assistant", "hi")]), "empty_message"),
    (row(conversation=[msg("user", "a"), msg("user", "b"), msg("assistant", "c")]),
     "non_alternating_roles"),
    (row(conversation=[msg("assistant", "a"), msg("user", "b")]),
     "non_alternating_roles"),
    (row(conversation=[msg("user", "a"), msg("assistant", "b"), msg("user", "c")]),
     "non_alternating_roles"),
    (row(turns=4), "too_many_turns"),
    (row(conversation=[msg("user", "x" * 101), msg("assistant", "b")]),
     "message_too_long"),
    (row(conversation=[msg("system", "x"), msg("assistant", "b")]), "bad_role"),
    (row(conversation="hi"), "wrong_type"),
    (row(conversation=[]), "missing_field"),
    (row(conversation=[{"content": "x"}, msg("assistant", "b")]), "missing_field"),
    (row(conversation=[msg("user", None), msg("assistant", "b")]), "missing_field"),
    (row(conversation=[msg("user", ["x"]), msg("assistant", "b")]), "wrong_type"),
    (row(timestamp="last tuesday"), "wrong_type"),
    (row(hashed_ip=None), "missing_field"),
    (row(toxic="no"), "wrong_type"),
    ({k: v for k, v in row().items() if k != "model"}, "missing_field"),
])
def test_each_filter(r, expected):
  assert reason(r) == expected


def test_filters_that_are_switches():
  assert reason(row(redacted=True), IngestConfig(drop_redacted=True)) == "redacted"
  wildchat.normalize_row(row(redacted=True), IngestConfig())
  wildchat.normalize_row(row(toxic=True), IngestConfig(drop_toxic=False))
  wildchat.normalize_row(row(lang="Klingon"), IngestConfig(languages=()))
  assert reason(row(turns=1), IngestConfig(min_turns=2)) == "too_few_turns"


def _ingest(rows, cfg=CFG):
  return wildchat.ingest((("mem", i, r, None) for i, r in enumerate(rows, 1)), cfg)


def test_duplicates_counted_once_and_first_kept():
  res = _ingest([row(h="a", t="2023-05-02T00:00:00Z"), row(h="a"), row(h="b")])
  assert [c.conversation_hash for c in res.conversations] == ["b", "a"]
  assert [(r.line, r.reason) for r in res.rejects] == [(2, "duplicate_hash")]
  assert res.counts["rows_read"] == 3 and res.counts["kept"] == 2


def test_grouping_and_time_order():
  rows = [row(h="x3", ip="B", t="2023-06-03T00:00:00Z"),
          row(h="x1", ip="A", t="2023-06-02T00:00:00Z"),
          row(h="x2", ip="B", t="2023-06-01T00:00:00Z"),
          row(h="x0", ip="A", t="2023-06-01T00:00:00+02:00")]  # 22:00 UTC on 31 May
  res = _ingest(rows, IngestConfig(num_targets=1))
  assert [(c.user_id, c.conversation_hash) for c in res.conversations] == [
      ("A", "x0"), ("A", "x1"), ("B", "x2"), ("B", "x3")]
  users = {u.user_id: u for u in res.users}
  assert users["A"].history == ("x0",) and users["A"].targets == ("x1",)
  assert users["B"].history == ("x2",) and users["B"].targets == ("x3",)


def test_user_key_with_user_agent():
  cfg = IngestConfig(user_key=("hashed_ip", "user_agent"))
  a = wildchat.normalize_row(row(), cfg)
  b = wildchat.normalize_row(row(header={"user-agent": "UA-2"}), cfg)
  assert a.user_id != b.user_id
  assert a.user_id == hashlib.sha256(b"ip1\x1fUA-1").hexdigest()[:32]
  with pytest.raises(ValueError, match="user_key"):
    IngestConfig(user_key=("email",))


def _independent_split(user_id, salt, fractions):
  # Recomputed from the documented rule, not from the module.
  u = int(hashlib.sha256(f"{salt}\x1f{user_id}".encode()).hexdigest()[:16], 16) / 2**64
  total = 0
  for name, f in fractions:
    total += f
    if u < total:
      return name


def test_split_is_deterministic_disjoint_and_matches_rule():
  cfg = IngestConfig()
  ids = [f"user-{i}" for i in range(2000)]
  splits = [wildchat.split_of(i, cfg) for i in ids]
  assert splits == [_independent_split(i, "rlhi-v1", cfg.split_fractions) for i in ids]
  counts = collections.Counter(splits)
  assert abs(counts["train"] / 2000 - 0.8) < 0.04
  assert abs(counts["test"] / 2000 - 0.1) < 0.03
  other = IngestConfig(split_salt="other")
  assert splits != [wildchat.split_of(i, other) for i in ids]


def test_every_conversation_of_a_user_is_in_one_split():
  rows = [row(h=f"c{u}-{k}", ip=f"ip{u}", t=f"2023-05-{k + 1:02d}T00:00:00Z")
          for u in range(40) for k in range(3)]
  res = _ingest(rows, IngestConfig())
  split_of_user = {u.user_id: u.split for u in res.users}
  by_split = collections.defaultdict(set)
  for u in res.users:
    by_split[u.split] |= set(u.history) | set(u.targets)
  assert sum(map(len, by_split.values())) == 120  # no conversation in two splits
  for c in res.conversations:
    assert c.conversation_hash in by_split[split_of_user[c.user_id]]


@pytest.mark.parametrize("cfg,n_targets", [
    (IngestConfig(target_rule="last_k", num_targets=2), [0, 1, 2, 2, 2]),
    (IngestConfig(target_rule="fraction", target_fraction=0.4), [0, 1, 1, 2, 2]),
    (IngestConfig(target_rule="after", targets_after="2023-05-03T00:00:00Z"),
     [0, 0, 0, 1, 2]),
])
def test_history_target_rules(cfg, n_targets):
  for n, want in zip(range(5), n_targets):
    rows = [row(h=f"c{k}", t=f"2023-05-{k + 1:02d}T00:00:00Z") for k in range(n)]
    res = _ingest(rows, cfg)
    if n == 0:
      assert res.users == []
      continue
    (user,) = res.users
    hashes = [f"c{k}" for k in range(n)]
    assert user.targets == tuple(hashes[n - want:])
    assert user.history == tuple(hashes[:n - want])
    # targets are always the newest: every history conversation is older
    assert not set(user.history) & set(user.targets)


def test_bad_configs_are_clear():
  with pytest.raises(ValueError, match="summing to 1"):
    IngestConfig(split_fractions=(("train", 0.5), ("val", 0.1), ("test", 0.1)))
  with pytest.raises(ValueError, match="target_rule"):
    IngestConfig(target_rule="random")
  with pytest.raises(ValueError, match="unknown key"):
    IngestConfig.from_config({"langauges": ("English",)})


def test_local_jsonl_and_parquet_sources_agree(tmp_path):
  import pandas as pd  # datasets depends on pandas
  rows = [row(h=f"h{i}", ip=f"ip{i % 3}", turns=1 + i % 2,
              t=f"2023-05-{i + 1:02d}T00:00:00Z") for i in range(6)]
  jsonl = tmp_path / "rows.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
  pdir = tmp_path / "pq"
  pdir.mkdir()
  pd.DataFrame(rows[:3]).to_parquet(pdir / "a.parquet")
  pd.DataFrame(rows[3:]).to_parquet(pdir / "b.parquet")
  a = wildchat.ingest(wildchat.iter_rows(str(jsonl)), CFG)
  b = wildchat.ingest(wildchat.iter_rows(str(pdir)), CFG)
  assert a.conversations == b.conversations and len(a.conversations) == 6
  assert a.users == b.users


def test_missing_local_source_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    list(wildchat.iter_rows(str(tmp_path / "nope.jsonl")))
