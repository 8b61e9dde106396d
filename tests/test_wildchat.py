"""WildChat ingestion: every filter on hand-made rows, users, ordering and splits."""

import codecs
import collections
import gzip
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


# ----------------------------------------------------------------------------------------
# Issue 18: nothing lost, nothing silent (text that cannot be written, input formats).
# ----------------------------------------------------------------------------------------


def _write_lines(path, rows, prefix=b""):
  # json.dumps escapes a lone surrogate as "\ud83d", as a scraped log holds it.
  path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in rows).encode())
  return str(path)


def test_lone_surrogates_are_counted_rejects_and_the_outputs_are_written(tmp_path):
  from rlhi.data import pipeline  # pylint: disable=g-import-not-at-top
  from rlhi.data import schema  # pylint: disable=g-import-not-at-top
  lone = "\ud83d"
  rows = [
      row(h="ok1"),
      row(h="c", conversation=[msg("user", f"smile {lone}"), msg("assistant", "b")]),
      row(h="ip", hashed_ip=f"ip{lone}"),
      row(h="ua", header={"user-agent": f"UA{lone}", "accept-language": "en"}),
      row(h="key", header={f"x-{lone}": "1", "user-agent": "UA-1"}),
      row(h=f"hash{lone}"),
      row(h="unused", openai_moderation=[{"categories": {"note": lone}}]),
      # A whole surrogate pair is one valid character (U+1F600): kept.
      row(h="ok2", conversation=[msg("user", "smile \ud83d\ude00"),
                                 msg("assistant", "b")]),
  ]
  src = _write_lines(tmp_path / "rows.jsonl", rows)
  assert "\\ud83d\\ude00" in open(src).read()  # the escapes are in the input file
  out = tmp_path / "out"
  cfg = {"source": src, "max_turns": 3, "user_key": ("hashed_ip", "user_agent")}
  report = pipeline.run_ingest(cfg, str(out), progress=False)

  rejects = schema.read_jsonl(out / "ingest_rejects.jsonl", schema.Reject)
  assert [(r.source, r.line, r.reason) for r in rejects] == [
      (src, i, "invalid_text") for i in range(2, 8)]
  fields = ["conversation[0].content", "hashed_ip", "header.user-agent",
            "header.x-\\ud83d", "conversation_hash",
            "openai_moderation[0].categories.note"]
  for r, field in zip(rejects, fields):
    assert f"field '{field}'" in r.detail, r.detail
  assert rejects[4].key == "hash\\ud83d"  # escaped, so that it can be written
  convs = schema.read_jsonl(out / "conversations.jsonl", schema.Conversation)
  assert [c.conversation_hash for c in convs] == ["ok1", "ok2"]
  assert convs[1].messages[0].content == "smile \U0001F600"
  assert report["rows_read"] == 8 and report["kept"] == 2
  assert report["rejected"] == {"invalid_text": 6}
  assert report["rows_read"] == report["kept"] + sum(report["rejected"].values())
  assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_lone_surrogate_rejected_before_the_user_key_is_hashed():
  # user_id_of encodes the key fields: without the check this was a UnicodeEncodeError.
  cfg = IngestConfig(user_key=("hashed_ip", "user_agent"))
  assert reason(row(hashed_ip="ip\udc80"), cfg) == "invalid_text"
  assert reason(row(header={"user-agent": "\ud800"}), cfg) == "invalid_text"


FORMAT_ROWS = [row(h=f"f{i}", ip=f"ip{i % 2}", turns=1 + i % 2,
                   t=f"2023-05-{i + 1:02d}T00:00:00Z") for i in range(3)]


def _write_format(path, rows, bom=False):
  """Writes `rows` in the format that `path`'s name says, with the standard library."""
  prefix = codecs.BOM_UTF8 if bom else b""
  name = path.name
  if name.endswith((".jsonl", ".jsonl.gz", ".lines.json")):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
  elif name.endswith(".compact.json"):
    data = json.dumps(rows).encode()  # one line
  else:
    data = json.dumps(rows, indent=2).encode()  # pretty-printed over many lines
  data = prefix + data
  path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
  return str(path)


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "rows.json", "rows.compact.json",
                                  "rows.lines.json", "rows.json.gz"])
def test_every_format_reads_the_same_conversations_as_jsonl(tmp_path, name):
  want = _ingest(FORMAT_ROWS)
  got = wildchat.ingest(
      wildchat.iter_rows(_write_format(tmp_path / name, FORMAT_ROWS)), CFG)
  assert got.rejects == [] and got.counts["rows_read"] == 3
  assert got.conversations == want.conversations and len(want.conversations) == 3
  assert got.users == want.users


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz", "rows.json",
                                  "rows.lines.json"])
def test_utf8_bom_is_stripped(tmp_path, name):
  got = wildchat.ingest(
      wildchat.iter_rows(_write_format(tmp_path / name, FORMAT_ROWS, bom=True)), CFG)
  assert got.rejects == [] and got.counts["kept"] == 3
  assert got.conversations == _ingest(FORMAT_ROWS).conversations


def test_reject_line_numbers_in_each_format(tmp_path):
  bad = row(h="bad", lang="Klingon")
  rows = [FORMAT_ROWS[0], bad, FORMAT_ROWS[1], ["not", "a", "row"]]
  jsonl = _write_format(tmp_path / "a.jsonl.gz", rows)
  array = _write_format(tmp_path / "b.json", rows)  # pretty: element != text line
  for path, unit in ((jsonl, "line"), (array, "array element")):
    res = wildchat.ingest(wildchat.iter_rows(path), CFG)
    assert [(r.source, r.line, r.reason) for r in res.rejects] == [
        (path, 2, "language"), (path, 4, "wrong_type")]
    assert f"expected a JSON object per {unit}, got list" in res.rejects[1].detail


def test_json_lines_whose_first_row_is_an_array(tmp_path):
  path = _write_format(tmp_path / "rows.lines.json", [["x"], FORMAT_ROWS[0]])
  res = wildchat.ingest(wildchat.iter_rows(path), CFG)
  assert [(r.line, r.reason) for r in res.rejects] == [(1, "wrong_type")]
  assert [c.conversation_hash for c in res.conversations] == ["f0"]


def test_directory_reads_every_supported_file_and_names_the_others(tmp_path):
  import pandas as pd  # pylint: disable=g-import-not-at-top
  d = tmp_path / "src"
  (d / "sub").mkdir(parents=True)
  rows = [row(h=f"d{i}", ip=f"ip{i}", t=f"2023-05-{i + 1:02d}T00:00:00Z")
          for i in range(5)]
  _write_format(d / "a.jsonl", rows[:1])
  _write_format(d / "b.jsonl.gz", rows[1:2])
  _write_format(d / "c.json", rows[2:3])
  _write_format(d / "sub" / "d.json.gz", rows[3:4])
  pd.DataFrame(rows[4:]).to_parquet(d / "sub" / "e.parquet")
  for name in ("notes.txt", "rows.csv", "sub/README.md"):
    (d / name).write_text("not rows\n")
  res = wildchat.ingest(wildchat.iter_rows(str(d)), CFG)
  assert res.conversations == _ingest(rows).conversations  # every row, once
  assert res.counts["rows_read"] == 5 and res.rejects == []
  assert res.counts["skipped_files"] == [
      str(d / "notes.txt"), str(d / "rows.csv"), str(d / "sub" / "README.md")]


def test_sources_that_cannot_be_read_are_clear_errors(tmp_path):
  csv = tmp_path / "rows.csv"
  csv.write_text("conversation_hash,model\n")
  with pytest.raises(ValueError, match=f"{csv}: unsupported file type.*.jsonl.gz"):
    list(wildchat.iter_rows(str(csv)))
  only_other = tmp_path / "other"
  only_other.mkdir()
  (only_other / "x.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="no .jsonl.*1 other files"):
    list(wildchat.iter_rows(str(only_other)))
  broken = tmp_path / "broken.json"
  broken.write_text(json.dumps(FORMAT_ROWS, indent=2)[:-10])  # a truncated array
  with pytest.raises(ValueError, match=f"{broken}: not a valid JSON array"):
    list(wildchat.iter_rows(str(broken)))
  truncated = tmp_path / "truncated.jsonl.gz"
  truncated.write_bytes(gzip.compress(b"{}\n" * 1000)[:-12])
  with pytest.raises(ValueError, match=f"{truncated}: not a readable gzip file"):
    list(wildchat.iter_rows(str(truncated)))
  with pytest.raises(FileNotFoundError, match="no such file"):
    list(wildchat.iter_rows(str(tmp_path / "nope.jsonl.gz")))


def test_missing_timestamp_is_missing_field():
  no_time = {k: v for k, v in row().items() if k != "timestamp"}
  assert reason(no_time) == "missing_field"
  assert reason(row(t=None)) == "missing_field"
  with pytest.raises(RowError, match="field 'timestamp' is missing"):
    wildchat.normalize_row(no_time, CFG)


def test_rejected_parquet_row_with_datetime_timestamp(tmp_path):
  import datetime as dt  # pylint: disable=g-import-not-at-top
  import pandas as pd  # pylint: disable=g-import-not-at-top
  rows = [row(h="es", lang="Spanish"), row(h="en")]
  for r in rows:
    r["timestamp"] = dt.datetime(2023, 5, 1, 10)  # WildChat-1M's parquet type
  pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
  res = wildchat.ingest(wildchat.iter_rows(str(tmp_path / "rows.parquet")), CFG)
  assert [(r.line, r.reason) for r in res.rejects] == [(1, "language")]
  assert res.rejects[0].raw.startswith('{"conversation": [{"content": "question 0"')
  assert [c.timestamp for c in res.conversations] == ["2023-05-01T10:00:00Z"]
