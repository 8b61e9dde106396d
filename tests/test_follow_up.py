"""The FLR baseline's reward (rlhi/train/follow_up.py) against an independent
computation: full logits of the whole conversation, log-softmax in NumPy, summed over
the follow-up's tokens; and a User-Based Rewards round that uses it (slow)."""

import json
import os

import jax
import numpy as np
import pytest

from rlhi.data import schema
from rlhi.generate import ChatGenerator
from rlhi.models import builder
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.models import scorer as scorer_lib
from rlhi.models import tokenizer as tok_lib
from rlhi.train import follow_up
from rlhi.train import user_rewards

import test_training as tt
import test_user_rewards as tur
from test_user_rewards import setup  # pylint: disable=unused-import  (fixture)

POSITIVE = ("Thanks, that's exactly what I needed.", "Perfect!")
NEGATIVE = ("That's not what I asked for.", "No, wrong again.")
CONTEXT = (schema.Message("user", "How do I list files?"),
           schema.Message("assistant", "Use ls."),
           schema.Message("user", "And hidden ones?"))


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
  config = llama.get_config("tiny", **builder.parse_overrides(tt.SMALL))
  path = str(tmp_path_factory.mktemp("flr") / "policy")
  hf_io.save_checkpoint(llama.init_params(config, jax.random.PRNGKey(0)), config, path)
  tok_lib.load_tokenizer("bundled").save_pretrained(path)
  return path


_logits = jax.jit(llama.forward_logits, static_argnums=1)


def _full_text_logp(gen, messages, answer, follow_up_text, persona):
  """log p(the follow-up's user turn | everything before it), from full logits."""
  fmt = gen.fmt
  msgs = fmt.messages(messages, persona) + [{"role": "assistant", "content": answer}]
  before = fmt.tok(fmt.tok.apply_chat_template(msgs, tokenize=False),
                   add_special_tokens=False)["input_ids"]
  whole = fmt.tok(fmt.tok.apply_chat_template(
      msgs + [{"role": "user", "content": follow_up_text}], tokenize=False),
                  add_special_tokens=False)["input_ids"]
  assert whole[:len(before)] == before
  end = whole.index(fmt.eot_id, len(before)) + 1  # through the follow-up's end-of-turn
  tokens = np.asarray([whole[:end]], np.int32)
  logits = np.asarray(_logits(gen.params, gen.config, tokens), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  logp = logits[0, np.arange(end - 1), tokens[0, 1:]] - logz[0, :end - 1]
  return logp[len(before) - 1:].sum()  # targets from the first token after `before`


def test_rewards_equal_full_logit_follow_up_likelihoods(policy):
  gen = ChatGenerator(policy, batch_size=4)
  persona = "A terse engineer who wants commands, not prose."
  scorer = follow_up.FollowUpScorer.from_generator(
      gen, positive=POSITIVE, negative=NEGATIVE, batch_size=4, max_length=256,
      bucket_lengths=(128, 256))
  answers = ("Use ls -a.", "There are many ways to see hidden files; one is ls -a, and "
             "another is a file manager with hidden files shown.", "ls -la")
  rows = [scorer_lib.Row(CONTEXT, persona, answers[:2]),
          scorer_lib.Row(CONTEXT, None, answers[2:])]
  got = scorer.score(rows)
  chat = [m.to_chat() for m in CONTEXT]
  for row, scores in zip(rows, got):
    assert len(scores) == len(row.answers)
    for answer, score in zip(row.answers, scores):
      want = np.mean([
          _full_text_logp(gen, chat, answer, p, row.persona) -
          _full_text_logp(gen, chat, answer, n, row.persona)
          for p, n in zip(POSITIVE, NEGATIVE)])
      np.testing.assert_allclose(score, want, rtol=1e-4, atol=1e-3)
  # Without the persona, the first row scores as the second row's kind does.
  blind = follow_up.FollowUpScorer.from_generator(
      gen, positive=POSITIVE, negative=NEGATIVE, with_persona=False, batch_size=4,
      max_length=256, bucket_lengths=(256,))
  (s,) = blind.score([scorer_lib.Row(CONTEXT, persona, answers[:1])])
  want = np.mean([_full_text_logp(gen, chat, answers[0], p, None) -
                  _full_text_logp(gen, chat, answers[0], n, None)
                  for p, n in zip(POSITIVE, NEGATIVE)])
  np.testing.assert_allclose(s[0], want, rtol=1e-4, atol=1e-3)


def test_too_long_rows_are_reported_and_bad_follow_ups_refused(policy):
  gen = ChatGenerator(policy, batch_size=4)
  scorer = follow_up.FollowUpScorer.from_generator(
      gen, positive=POSITIVE[:1], negative=NEGATIVE[:1], batch_size=4, max_length=64,
      bucket_lengths=(64,))
  short = scorer_lib.Row((schema.Message("user", "hi"),), None, ("hello",))
  long = scorer_lib.Row((schema.Message("user", "word " * 200),), None, ("a", "b"))
  got = scorer.score([short, long])
  assert isinstance(got[0], tuple) and len(got[0]) == 1
  assert isinstance(got[1], str) and "max_length 64" in got[1]
  with pytest.raises(ValueError, match="paired"):
    follow_up.FollowUpScorer.from_generator(gen, positive=POSITIVE, negative=NEGATIVE[:1])


def test_encode_follow_ups_splits_the_whole_rendering(policy):
  fmt = tok_lib.ChatFormatter(tok_lib.load_tokenizer(policy))
  chat = [m.to_chat() for m in CONTEXT]
  prefix, rests = fmt.encode_follow_ups(chat, "Use ls -a.", POSITIVE, persona="P")
  for text, rest in zip(POSITIVE, rests):
    whole = fmt.tok(fmt.tok.apply_chat_template(
        fmt.messages(chat, "P") + [{"role": "assistant", "content": "Use ls -a."},
                                   {"role": "user", "content": text}], tokenize=False),
                    add_special_tokens=False)["input_ids"]
    assert whole[:len(prefix) + len(rest)] == prefix + rest
    assert rest[-1] == fmt.eot_id and fmt.eot_id not in rest[:-1]
    assert text in fmt.decode(rest)


@pytest.mark.slow  # ~1 min on 2 cores; CI runs it
def test_a_follow_up_round_scores_with_the_policys_follow_up_likelihood(setup, tmp_path):
  data, policy_dir, _ = setup
  cfg = tur._config(data, policy_dir, "")
  cfg.user_rewards.reward = "follow_up"
  cfg.user_rewards.reward_model = ""
  # A random policy's follow-up likelihoods barely depend on the answer.
  cfg.user_rewards.margin_threshold = 0.0
  (stats,) = user_rewards.run(cfg, str(tmp_path / "run"))
  assert stats["prompts"] == 8 and stats["candidates"] == 32
  assert stats["scores_failed"] == 0 and stats["pairs"] >= 1, stats["skipped"]
  assert stats["reward"]["kind"] == "follow_up"  # recorded: the report names it
  assert stats["reward"]["positive"] == list(cfg.user_rewards.follow_ups.positive)
  with open(tmp_path / "run" / "round_00" / "prompts_and_candidates.jsonl") as f:
    records = [json.loads(line) for line in f]
  # The rewards are the policy's follow-up likelihoods: recomputed for one prompt.
  gen = ChatGenerator(policy_dir, batch_size=4,
                      system_template=cfg.data.system_template)
  items = {i.item_id: i for i in user_rewards.items_lib.load_items(
      data, split="train", require_persona=False).items}
  rec = records[0]
  item = items[rec["item_id"]]
  pos, neg = cfg.user_rewards.follow_ups.positive, cfg.user_rewards.follow_ups.negative
  for text, score in zip(rec["candidates"][:2], rec["scores"][:2]):
    want = np.mean([_full_text_logp(gen, item.chat(), text, p, item.persona) -
                    _full_text_logp(gen, item.chat(), text, n, item.persona)
                    for p, n in zip(pos, neg)])
    np.testing.assert_allclose(score, want, rtol=1e-4, atol=1e-3)
  assert os.path.exists(tmp_path / "run" / "user_rewards_report.md")
  with open(tmp_path / "run" / "user_rewards_report.md") as f:
    assert "follow-up likelihood" in f.read()


def test_generate_advances_a_progress_bar_per_batch_without_changing_answers(policy):
  """ChatGenerator.generate(progress=...): one update per batch, of its real rows."""
  class Counter:
    def __init__(self):
      self.updates = []

    def update(self, n):
      self.updates.append(n)

  gen = ChatGenerator(policy, batch_size=4)
  chats = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]
  bar = Counter()
  with_bar = gen.generate(chats, max_new_tokens=4, temperature=0.7, seed=3,
                          progress=bar)
  assert bar.updates == [4, 2]
  assert with_bar == gen.generate(chats, max_new_tokens=4, temperature=0.7, seed=3)
