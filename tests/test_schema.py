"""Schema validation messages, JSONL round trips, lenient rejects, HF datasets."""

import json

import pytest

from rlhi.data import schema
from rlhi.data.schema import Conversation, Message, PreferencePair, User


def _conv(**kw):
  base = dict(conversation_hash="h1", user_id="u", model="gpt-4", timestamp=
              "2023-04-10T00:00:00Z", language="English",
              messages=(Message("user", "hi"), Message("assistant", "hello")))
  base.update(kw)
  return Conversation(**base)


def test_jsonl_round_trip(tmp_path):
  convs = [_conv(), _conv(conversation_hash="h2", country="Chile")]
  path = tmp_path / "c.jsonl"
  assert schema.write_jsonl(path, convs) == 2
  assert schema.read_jsonl(path, Conversation) == convs


def test_write_is_byte_stable(tmp_path):
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  schema.write_jsonl(a, [_conv()])
  schema.write_jsonl(b, [_conv()])
  assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("obj,field,expected", [
    ({"user_id": "u", "split": "train", "history": [], "targets": []},
     None, None),
    ({"user_id": "u", "split": "dev", "history": [], "targets": []},
     "split", "expected one of train/val/test, got 'dev'"),
    ({"user_id": "u", "split": "train", "history": "abc", "targets": []},
     "history", "expected a list of a string, got str"),
    ({"user_id": 3, "split": "train", "history": [], "targets": []},
     "user_id", "expected a string, got int 3"),
    ({"split": "train", "history": [], "targets": []},
     "user_id", "missing (expected a string)"),
    ({"user_id": "u", "split": "train", "history": [], "targets": [], "x": 1},
     "", "unknown field(s) ['x']"),
])
def test_validation_messages_name_file_line_field(tmp_path, obj, field, expected):
  path = tmp_path / "users.jsonl"
  good = {"user_id": "ok", "split": "val", "history": ["a"], "targets": []}
  path.write_text(json.dumps(good) + "\n" + json.dumps(obj) + "\n")
  if expected is None:
    assert len(schema.read_jsonl(path, User)) == 2
    return
  with pytest.raises(schema.SchemaError) as e:
    schema.read_jsonl(path, User)
  msg = str(e.value)
  assert msg.startswith(f"{path}:2: ")
  if field:
    assert f"field '{field}'" in msg
  assert expected in msg


def test_nested_field_path_in_error(tmp_path):
  d = schema.to_dict(_conv())
  d["messages"][1]["role"] = "bot"
  path = tmp_path / "c.jsonl"
  path.write_text(json.dumps(d) + "\n")
  with pytest.raises(schema.SchemaError, match=r"c.jsonl:1: field 'messages\[1\].role': "
                     r"expected one of system/user/assistant, got 'bot'"):
    schema.read_jsonl(path, Conversation)


def test_lenient_counts_and_keeps_the_rest(tmp_path):
  path = tmp_path / "c.jsonl"
  good = json.dumps(schema.to_dict(_conv()))
  path.write_bytes(b"\n".join([good.encode(), b"{not json", b"\xff\xfe",
                               b'{"conversation_hash": 1}', good.encode()]) + b"\n")
  rejects = []
  out = schema.read_jsonl(path, Conversation, lenient=True, rejects=rejects)
  assert len(out) == 2
  assert [(r.line, r.reason) for r in rejects] == [
      (2, "malformed_json"), (3, "invalid_utf8"), (4, "schema")]
  assert "field 'conversation_hash'" in rejects[2].detail


def test_lenient_needs_a_rejects_list(tmp_path):
  with pytest.raises(ValueError, match="rejects"):
    schema.read_jsonl(tmp_path / "x", User, lenient=True)


def test_hf_dataset_round_trip():
  pairs = [PreferencePair(
      pair_id=f"p{i}", user_id="u", split="train",
      prompt=(Message("user", "q"),), chosen="good", rejected="bad",
      persona=None if i else "Likes brevity.", source="rewrite",
      conversation_hash="h", message_index=1, label="style_feedback")
      for i in range(3)]
  ds = schema.to_hf_dataset(pairs)
  assert ds.num_rows == 3
  assert schema.from_hf_dataset(ds, PreferencePair) == pairs


def test_trl_format_with_and_without_persona():
  p = PreferencePair(pair_id="p", user_id="u", split="train",
                     prompt=(Message("user", "q"),), chosen="c", rejected="r",
                     persona="Terse.", source="rewrite")
  with_p = p.to_trl(system_template="User persona:\n{persona}")
  assert with_p["prompt"] == [{"role": "system", "content": "User persona:\nTerse."},
                              {"role": "user", "content": "q"}]
  assert with_p["chosen"] == [{"role": "assistant", "content": "c"}]
  assert p.to_trl(with_persona=False)["prompt"] == [{"role": "user", "content": "q"}]
