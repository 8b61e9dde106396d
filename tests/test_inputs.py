"""Input pipeline: tokenization, truncation, batch layout, grain order and state, sources.

Expected tokens are built from the documented chat format with the raw `tokenizers`
tokenizer (special tokens cut the text into blocks that tokenize independently), never
from rlhi.inputs itself.
"""

import collections
import json

import datasets
import numpy as np
import pytest
import tokenizers

from configs import data_prep
from rlhi import inputs
from rlhi.data import pipeline
from rlhi.data import schema
from rlhi.models import tokenizer as tok_lib

SYSTEM_TEMPLATE = "Persona: {persona}"
PERSONA = "Terse embedded C++ developer; wants code only."


@pytest.fixture(scope="module")
def tok():
  return tok_lib.load_tokenizer("bundled")


@pytest.fixture(scope="module")
def fmt(tok):
  return tok_lib.ChatFormatter(tok, system_template=SYSTEM_TEMPLATE)


@pytest.fixture(scope="module")
def raw():
  return tokenizers.Tokenizer.from_file(f"{tok_lib.BUNDLED_DIR}/tokenizer.json")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The bundled sample through all data stages (reference client; ~2 s)."""
  path = tmp_path_factory.mktemp("prep")
  cfg = data_prep.get_config("sample")
  for stage in ("ingest", "classify", "persona", "rewrites"):
    pipeline.run_stage(stage, cfg, str(path))
  return path


@pytest.fixture(scope="module")
def pair_examples(fmt, workdir):
  pairs = schema.read_jsonl(workdir / "pairs_rewrites.train.jsonl", schema.PreferencePair)
  examples, stats = inputs.tokenize_pairs(fmt, pairs, with_persona=True, max_length=512,
                                          max_response_length=192)
  assert stats.kept == len(examples) == len(pairs) > 16
  return examples


class Hand:
  """The bundled chat format written out by hand, tokenized block by block."""

  def __init__(self, raw):
    self.raw = raw
    self.bos = raw.token_to_id("<|begin_of_text|>")
    self.eot = raw.token_to_id("<|eot_id|>")

  def ids(self, text):
    return self.raw.encode(text, add_special_tokens=False).ids

  def header(self, role):
    return self.ids(f"<|start_header_id|>{role}<|end_header_id|>")

  def content(self, text):
    return self.ids(text.strip())

  def block(self, role, text):
    return self.header(role) + self.content(text) + [self.eot]

  def system(self, persona=PERSONA):
    return self.block("system", SYSTEM_TEMPLATE.format(persona=persona))

  def response(self, text):
    return self.content(text) + [self.eot]


def _msg(role, content):
  return schema.Message(role=role, content=content)


def _runs(mask):
  """[start, end) of each run of ones."""
  padded = np.concatenate([[0], np.asarray(mask), [0]])
  edges = np.flatnonzero(np.diff(padded))
  return list(zip(edges[::2], edges[1::2]))


# ----------------------------------------------------------------------------------------
# Tokenization and loss masks.
# ----------------------------------------------------------------------------------------


def test_sft_conversation_masks_exactly_the_assistant_turns(fmt, tok, raw):
  hand = Hand(raw)
  msgs = [("user", "how do i reverse a list in python"),
          ("assistant", "Use `xs[::-1]` or `xs.reverse()`."),
          ("user", "shorter pls, code only"),
          ("assistant", "xs[::-1]"),
          ("user", "thanks!")]  # after the last answer: no target, left out
  conv = schema.Conversation("h1", "u1", "gpt-4", "2024-01-01T00:00:00Z", "English",
                             tuple(_msg(r, c) for r, c in msgs))
  t = inputs.tokenize_conversation(fmt, conv, max_length=512, persona=PERSONA)
  ex = t.example
  expected = ([hand.bos] + hand.system() + hand.block(*msgs[0]) + hand.block(*msgs[1])
              + hand.block(*msgs[2]) + hand.header("assistant")
              + hand.response(msgs[3][1]))
  assert ex["tokens"].tolist() == expected
  assert ex["tokens"].dtype == ex["loss_mask"].dtype == np.int32
  runs = _runs(ex["loss_mask"])
  decoded = [tok.decode(ex["tokens"][a:b].tolist()) for a, b in runs]
  assert decoded == [msgs[1][1] + "<|eot_id|>", msgs[3][1] + "<|eot_id|>"]
  assert (ex["example_id"], ex["user_id"]) == ("h1", "u1")
  assert not t.truncation.truncated


def test_sft_completion_masks_only_the_completion(fmt, tok):
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "write a haiku about rust"}]
  ex = inputs.tokenize_completion(fmt, messages, "borrow checker sighs", max_length=256,
                                  example_id="e", user_id="u").example
  runs = _runs(ex["loss_mask"])
  assert len(runs) == 1 and runs[0][1] == len(ex["tokens"])
  assert tok.decode(ex["tokens"][slice(*runs[0])].tolist()) == (
      "borrow checker sighs<|eot_id|>")
  prompt = ex["tokens"][:runs[0][0]].tolist()
  assert prompt == fmt.encode(messages).prompt_ids


def test_persona_changes_only_the_system_segment(fmt, raw):
  hand = Hand(raw)
  pair = schema.PreferencePair(
      pair_id="p", user_id="u", split="train",
      prompt=(_msg("user", "ring buffer for uart rx"),
              _msg("assistant", "use std::vector"), _msg("user", "no heap please")),
      chosen="static array of 64 bytes", rejected="std::deque", persona=PERSONA,
      source="rewrite")
  on = inputs.tokenize_pair(fmt, pair, with_persona=True, max_length=512).example
  off = inputs.tokenize_pair(fmt, pair, with_persona=False, max_length=512).example
  system = hand.system()
  assert on["prompt_ids"].tolist() == (
      off["prompt_ids"][:1].tolist() + system + off["prompt_ids"][1:].tolist())
  for k in ("chosen_ids", "rejected_ids"):
    assert on[k].tolist() == off[k].tolist()
  assert on["chosen_ids"].tolist() == hand.response(pair.chosen)
  assert (on["pair_id"], on["user_id"]) == ("p", "u")


# ----------------------------------------------------------------------------------------
# Truncation.
# ----------------------------------------------------------------------------------------

N_TURNS = 9  # turn 0 (user) ... turn 8 (user), then the answer
ANSWER = "Answer to turn 8: " + " ".join(f"step{i}" for i in range(30))


def _numbered():
  return [{"role": "user" if i % 2 == 0 else "assistant",
           "content": f"Turn {i}: " + " ".join(f"word{i}x{j}" for j in range(6 + i))}
          for i in range(N_TURNS)]


def test_truncation_drops_the_oldest_turns_whole(fmt, raw):
  hand = Hand(raw)
  msgs = _numbered()
  blocks = [hand.block(m["role"], m["content"]) for m in msgs]
  tail = hand.header("assistant") + hand.response(ANSWER)
  head = [hand.bos] + hand.system()
  for keep_from in (0, 3, 8):
    max_length = len(head) + sum(map(len, blocks[keep_from:])) + len(tail)
    for slack, first_kept in ((0, keep_from), (-1, keep_from + 1)):
      if first_kept >= N_TURNS:
        continue
      t = inputs.tokenize_completion(fmt, msgs, ANSWER, max_length=max_length + slack,
                                     persona=PERSONA)
      expected = head + sum(blocks[first_kept:], []) + tail
      assert t.example["tokens"].tolist() == expected, (keep_from, slack)
      assert t.truncation == inputs.Truncation(turns_dropped=first_kept)


def test_truncation_caps_the_response_and_cuts_the_last_turn_from_the_left(fmt, raw):
  hand = Hand(raw)
  msgs = _numbered()
  last = msgs[-1]
  response = hand.response(ANSWER)
  cap = 12
  t = inputs.tokenize_completion(fmt, msgs, ANSWER, max_length=4096,
                                 max_response_length=cap, persona=PERSONA)
  assert t.example["tokens"][-cap:].tolist() == response[:cap]
  assert t.example["loss_mask"].sum() == cap
  assert t.truncation == inputs.Truncation(response_tokens_cut=len(response) - cap)

  # No context left to drop: the newest user turn loses its oldest tokens, keeps its
  # header and end-of-turn token.
  content = hand.content(last["content"])
  cut = 5
  max_length = (1 + len(hand.system()) + len(hand.block("user", last["content"])) - cut
                + len(hand.header("assistant")) + cap)
  t = inputs.tokenize_completion(fmt, msgs, ANSWER, max_length=max_length,
                                 max_response_length=cap, persona=PERSONA)
  expected = ([hand.bos] + hand.system() + hand.header("user") + content[cut:]
              + [hand.eot] + hand.header("assistant") + response[:cap])
  assert t.example["tokens"].tolist() == expected
  assert t.truncation == inputs.Truncation(len(response) - cap, N_TURNS - 1, cut)


def test_examples_that_cannot_fit_are_dropped_and_counted(fmt):
  msgs = _numbered()
  long_persona = " ".join(f"trait{i}" for i in range(300))
  convs = [
      schema.Conversation(f"h{i}", "u", "m", "t", "English",
                          tuple(_msg(m["role"], m["content"]) for m in msgs)
                          + (_msg("assistant", ANSWER),))
      for i in range(3)]
  convs.append(schema.Conversation("only_user", "u", "m", "t", "English",
                                   (_msg("user", "hello?"),)))
  examples, stats = inputs.tokenize_conversations(
      fmt, convs, max_length=256, max_response_length=32,
      personas={"u": long_persona})
  assert examples == []
  assert stats.dropped == {"too_long": 3, "no_assistant_turn": 1}
  examples, stats = inputs.tokenize_conversations(fmt, convs, max_length=256,
                                                  max_response_length=32)
  assert [e["example_id"] for e in examples] == ["h0", "h1", "h2"]
  assert all(len(e["tokens"]) <= 256 for e in examples)
  assert (stats.examples, stats.kept, stats.truncated, stats.num_dropped) == (4, 3, 3, 1)
  assert stats.response_truncated == stats.context_truncated == 3


def test_template_that_is_not_prefix_stable_is_refused(tok):
  bad = tok_lib.ChatFormatter(tok)
  bad.tok = type(tok).from_pretrained(tok_lib.BUNDLED_DIR)
  # Numbers each turn from the end: earlier renderings are not prefixes of later ones.
  bad.tok.chat_template = (
      "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }} "
      "{{ messages|length - loop.index }}<|end_header_id|>{{ m['content'] }}<|eot_id|>"
      "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
      "<|end_header_id|>{% endif %}")
  with pytest.raises(ValueError, match="cannot be split into turns"):
    inputs.tokenize_completion(bad, _numbered()[:3], "ok", max_length=512)


# ----------------------------------------------------------------------------------------
# Batch layout.
# ----------------------------------------------------------------------------------------


def _expected_rows(seq, mask, length, pad):
  """targets / loss_mask / positions / segment_ids of one row, element by element."""
  n = len(seq)
  tokens = [seq[j] if j < n else pad for j in range(length)]
  targets = [tokens[j + 1] if j + 1 < length else pad for j in range(length)]
  loss = [float(mask[j + 1]) if j + 1 < n else 0.0 for j in range(length)]
  positions = [j if j < n else 0 for j in range(length)]
  segments = [1 if j < n else 0 for j in range(length)]
  return tokens, targets, loss, positions, segments


def test_sft_batch_layout_by_hand():
  pad = 7
  examples = [{"tokens": [10, 11, 12, 13, 14], "loss_mask": [0, 0, 1, 1, 1]},
              {"tokens": [20, 21, 22], "loss_mask": [0, 1, 1]}]
  batch = inputs.pad_batch(examples, batch_size=3, pad_id=pad, bucket_lengths=(4, 8, 16))
  assert {k: v.shape for k, v in batch.items()} == {
      **{k: (3, 8) for k in inputs.SEQUENCE_FIELDS}, "valid": (3,)}
  assert batch["loss_mask"].dtype == np.float32 and batch["tokens"].dtype == np.int32
  for i, e in enumerate(examples):
    tokens, targets, loss, positions, segments = _expected_rows(
        e["tokens"], e["loss_mask"], 8, pad)
    assert batch["tokens"][i].tolist() == tokens
    assert batch["targets"][i].tolist() == targets
    assert batch["loss_mask"][i].tolist() == loss
    assert batch["positions"][i].tolist() == positions
    assert batch["segment_ids"][i].tolist() == segments
  # The padding row of a partial batch carries no loss and is marked invalid.
  assert batch["valid"].tolist() == [True, True, False]
  assert batch["segment_ids"][2].sum() == batch["loss_mask"][2].sum() == 0


def test_score_positions_list_every_response_target_once():
  """The LM head's columns (score_positions) are exactly the loss_mask columns, in
  order, then the last column (loss_mask 0 there); widths are quarters of the row, the
  same on every host; a one-token prompt puts a response target at column 0."""
  r = np.random.default_rng(0)
  pairs = [dict(prompt_ids=r.integers(1, 50, p), chosen_ids=r.integers(1, 50, c),
                rejected_ids=r.integers(1, 50, x), pair_id=str(i), user_id="u")
           for i, (p, c, x) in enumerate([(1, 5, 3), (9, 0, 4), (20, 31, 2), (3, 7, 7)])]
  plain = inputs.pad_batch(pairs, batch_size=5, pad_id=0, bucket_lengths=(64,),
                           score_positions=True)
  hosts = [pairs[:2], pairs[2:]]
  packed = [inputs.pack_batch(h, pad_id=0, bucket_lengths=(32, 64), hosts=hosts,
                              host=i, score_positions=True)
            for i, h in enumerate(hosts)]
  # Off (the reward model's batches): no such key.
  assert "chosen_score_positions" not in inputs.pad_batch(pairs, batch_size=5, pad_id=0)
  assert packed[0]["score_positions"].shape == packed[1]["score_positions"].shape
  rows = [(plain[f"{s}_loss_mask"], plain[f"{s}_score_positions"])
          for s in ("chosen", "rejected")]
  rows += [(b["loss_mask"], b["score_positions"]) for b in packed]
  for loss_mask, cols in rows:
    length, width = loss_mask.shape[1], cols.shape[1]
    assert width % (length // 4) == 0 and width >= loss_mask.sum(1).max()
    for mask, c in zip(loss_mask, cols):
      n = int(mask.sum())
      assert c[:n].tolist() == np.flatnonzero(mask).tolist()
      assert (c[n:] == length - 1).all() and mask[length - 1] == 0
  # The fewest quarters that hold the fullest row of the global batch.
  for loss_masks, width in (
      ([plain["chosen_loss_mask"], plain["rejected_loss_mask"]],
       plain["chosen_score_positions"].shape[1]),
      ([b["loss_mask"] for b in packed], packed[0]["score_positions"].shape[1])):
    quarter = loss_masks[0].shape[1] // 4
    assert width - quarter < max(m.sum(1).max() for m in loss_masks) <= width
  assert plain["chosen_score_positions"][0, 0] == 0  # one-token prompt


def test_pair_batch_layout_and_stacking(pair_examples, tok):
  examples = pair_examples[:4]
  batch = inputs.pad_batch(examples, batch_size=4, pad_id=0, with_metadata=True)
  length = batch["chosen_tokens"].shape[1]
  assert batch["rejected_tokens"].shape == (4, length)
  assert length == inputs.bucket_length(max(
      len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
      for e in examples))
  for i, e in enumerate(examples):
    p = len(e["prompt_ids"])
    assert batch["prompt_length"][i] == p
    for side in ("chosen", "rejected"):
      seq = e["prompt_ids"].tolist() + e[f"{side}_ids"].tolist()
      mask = [0] * p + [1] * len(e[f"{side}_ids"])
      expected = _expected_rows(seq, mask, length, 0)
      for field, want in zip(inputs.SEQUENCE_FIELDS, expected):
        assert batch[f"{side}_{field}"][i].tolist() == want, (side, field)
      # The targets under the loss mask are exactly the response.
      under = batch[f"{side}_targets"][i][batch[f"{side}_loss_mask"][i] == 1]
      assert under.tolist() == e[f"{side}_ids"].tolist()
    assert batch["pair_id"][i] == e["pair_id"]
  stacked = inputs.stack_pairs(batch)
  for k in inputs.SEQUENCE_FIELDS:
    assert stacked[k].shape == (8, length)
    np.testing.assert_array_equal(stacked[k][:4], batch[f"chosen_{k}"])
    np.testing.assert_array_equal(stacked[k][4:], batch[f"rejected_{k}"])
  assert stacked["prompt_length"].tolist() == 2 * batch["prompt_length"].tolist()


# ----------------------------------------------------------------------------------------
# Pipeline: buckets, order, hosts, state.
# ----------------------------------------------------------------------------------------


def _synthetic(n, max_len=900, seed=0):
  """SFT examples whose first token is their index, of random lengths."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(4, max_len))
    tokens = rng.integers(100, 4000, length).astype(np.int32)
    tokens[0] = i
    mask = (rng.random(length) < 0.5).astype(np.int32)
    out.append({"tokens": tokens, "loss_mask": mask, "example_id": f"ex{i}",
                "user_id": f"u{i % 3}"})
  return out


def _ids(batches):
  return [b["example_id"].tolist() for b in batches]


def test_every_batch_has_a_bucket_length(pair_examples):
  buckets = (128, 256, 512, 1024)
  shapes = collections.Counter()
  for batch in inputs.make_batches(_synthetic(64), per_host_batch_size=4, pad_id=0,
                                   bucket_lengths=buckets, num_epochs=2):
    length = batch["tokens"].shape[1]
    assert length in buckets
    longest = batch["segment_ids"].sum(axis=1).max()
    assert longest <= length and (length == buckets[0] or
                                  longest > buckets[buckets.index(length) - 1])
    shapes[batch["tokens"].shape] += 1
  assert len(shapes) <= len(buckets) and sum(shapes.values()) == 32
  for batch in inputs.make_batches(pair_examples, per_host_batch_size=4, pad_id=0,
                                   num_epochs=1):
    assert batch["chosen_tokens"].shape == batch["rejected_tokens"].shape
    assert batch["chosen_tokens"].shape[1] in inputs.DEFAULT_BUCKETS


def test_shuffle_is_deterministic_per_epoch():
  examples = _synthetic(24, max_len=20)
  make = lambda seed: _ids(inputs.make_batches(  # pylint: disable=g-long-lambda
      examples, per_host_batch_size=24, pad_id=0, seed=seed, num_epochs=3,
      with_metadata=True))
  a, b, c = make(0), make(0), make(1)
  assert a == b
  assert a != c
  assert len({tuple(epoch) for epoch in a}) == 3  # each epoch in its own order
  assert all(sorted(epoch) == sorted(e["example_id"] for e in examples) for epoch in a)
  unshuffled = _ids(inputs.make_batches(examples, per_host_batch_size=24, pad_id=0,
                                        shuffle=False, num_epochs=1, with_metadata=True))
  assert unshuffled == [[f"ex{i}" for i in range(24)]]


def test_hosts_see_disjoint_slices_that_cover_the_epoch():
  examples = _synthetic(40, max_len=20)
  seen = []
  for host in range(2):
    batches = list(inputs.make_batches(
        examples, per_host_batch_size=5, pad_id=0, seed=3, num_epochs=1,
        process_index=host, process_count=2, with_metadata=True))
    assert len(batches) == 4
    seen.append([i for b in _ids(batches) for i in b])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(e["example_id"] for e in examples)
  # With an odd count every host still gets the same number of batches.
  counts = {len(inputs.make_batches(examples[:39], per_host_batch_size=5, pad_id=0,
                                    num_epochs=1, process_index=h, process_count=2))
            for h in range(2)}
  assert counts == {3}


def test_resume_from_saved_state_equals_an_uninterrupted_run():
  examples = _synthetic(30, max_len=250)
  options = dict(per_host_batch_size=4, pad_id=0, seed=5, bucket_lengths=(64, 128, 256),
                 with_metadata=True)
  uninterrupted = inputs.make_iterator(examples, **options)
  expected = [next(uninterrupted) for _ in range(20)]  # runs across 2+ epochs

  first = inputs.make_iterator(examples, num_threads=2, **options)
  for _ in range(9):
    next(first)
  saved = json.dumps(first.get_state())
  resumed = inputs.make_iterator(examples, num_threads=2, **options)
  resumed.set_state(json.loads(saved))
  for want in expected[9:]:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])

  other = inputs.make_iterator(examples, **(options | {"per_host_batch_size": 8}))
  with pytest.raises(ValueError, match="different pipeline"):
    other.set_state(json.loads(saved))


# ----------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------


def test_hf_and_tfds_array_record_sources_agree(fmt, workdir, pair_examples, tmp_path):
  # HF: straight from the JSONL, then through save_to_disk / load_from_disk.
  hf, stats = inputs.pairs_source(str(workdir / "pairs_rewrites.train.jsonl"), fmt,
                                  with_persona=True, max_length=512,
                                  max_response_length=192)
  assert stats.kept == len(pair_examples)
  hf.save_to_disk(str(tmp_path / "hf"))
  hf = inputs.hf_source(datasets.load_from_disk(str(tmp_path / "hf")))
  path = inputs.write_array_record_dataset(
      {"train": pair_examples, "val": pair_examples[:5]}, str(tmp_path),
      name="rlhi_pairs", num_shards=3)
  assert path == str(tmp_path / "rlhi_pairs" / "1.0.0")
  tfds = inputs.tfds_source("rlhi_pairs", "train", str(tmp_path))
  assert len(tfds) == len(hf) == len(pair_examples)
  assert len(inputs.tfds_source("rlhi_pairs", "val", str(tmp_path))) == 5
  options = dict(per_host_batch_size=4, pad_id=0, seed=1, num_epochs=2,
                 with_metadata=True, process_index=1, process_count=2)
  from_hf = list(inputs.make_batches(hf, **options))
  from_tfds = list(inputs.make_batches(tfds, **options))
  from_list = list(inputs.make_batches(pair_examples, **options))
  assert len(from_hf) == len(from_tfds) == len(from_list) > 0
  for a, b, c in zip(from_hf, from_tfds, from_list):
    assert a.keys() == b.keys() == c.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
      np.testing.assert_array_equal(a[k], c[k])
