"""Evaluation: UserEval items, judges, statistics and reports; reward-model save/load.

The LLM judge is a scripted responder on the loopback OpenAI-compatible server; the
models are tiny and random (2 layers of width 64), so the numbers they produce mean
nothing, but every path runs as in a real evaluation.
"""

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import eval as eval_config
from rlhi import sharding
from rlhi.data import items as items_lib
from rlhi.data import pipeline
from rlhi.data import schema
from rlhi.eval import judges
from rlhi.eval import report as report_lib
from rlhi.eval import reward_eval
from rlhi.eval import stats
from rlhi.eval import systems
from rlhi.eval import usereval
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.models import reward
from rlhi.models import reward_io
from rlhi.models import tokenizer as tok_lib
from rlhi.testing.openai_server import OpenAIServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
             num_kv_heads=1, head_dim=32)
B_MARK = "SYSTEM-B-ANSWER"


# ----------------------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny random policy exported like train_sft's <workdir>/hf."""
  path = str(tmp_path_factory.mktemp("policy_hf"))
  config = llama.get_config("tiny", **SMALL)
  hf_io.save_checkpoint(llama.init_params(config, jax.random.PRNGKey(0)), config, path)
  tok_lib.load_tokenizer("bundled").save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
  """A tiny random reward model (random head: a zero head would tie everything)."""
  path = str(tmp_path_factory.mktemp("reward_model"))
  config = llama.get_config("tiny", **SMALL)
  params = reward.init_params(config, jax.random.PRNGKey(1))
  params["score"] = {"kernel": jax.random.normal(jax.random.PRNGKey(2), (64,)),
                     "bias": jnp.asarray(0.25, jnp.float32)}
  reward_io.save(params, config, path, tokenizer=tok_lib.load_tokenizer("bundled"),
                 system_template="Persona of the user:\n{persona}")
  return path, config, params


def _answers_file(path, data_dir, max_items):
  """System B's answers, each with a marker and its index, for the first items."""
  its = items_lib.load_items(data_dir, max_items=max_items).items
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"item_id": it.item_id,
                             "text": f"{B_MARK} {k}: a short answer."}) + "\n"
                 for k, it in enumerate(its))
  return its


def _llm_cfg(data_dir, server, answers, max_items, n_boot=300):
  cfg = eval_config.get_config(f"b=answers,max_items={max_items}")
  cfg.data.dir = data_dir
  cfg.systems.b.path = answers
  cfg.n_boot = n_boot
  c = cfg.judge.client
  c.base_url, c.model, c.timeout_s, c.max_retries = server.base_url, "judge", 10.0, 1
  c.backoff_base_s = c.backoff_max_s = 0.01
  return cfg


def _jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _between(tag, text):
  return re.search(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.DOTALL).group(1)


def _choice_json(choice):
  return json.dumps({d: choice for d in stats.DIMENSIONS} | {"rationale": "scripted"})


def _prefers_b_mark(body):
  """Picks the shown response that carries system B's marker."""
  prompt = body["messages"][0]["content"]
  return _choice_json("A" if B_MARK in _between("response_a", prompt) else "B")


# ----------------------------------------------------------------------------------------
# Reward-model checkpoints.
# ----------------------------------------------------------------------------------------


def test_reward_io_round_trip(reward_model, checkpoint):
  path, config, params = reward_model
  mesh = sharding.make_mesh({"fsdp": -1})
  loaded_config, loaded = reward_io.load(path, mesh)
  assert loaded_config == config
  flat, tree = jax.tree.flatten(params)
  flat2, tree2 = jax.tree.flatten(loaded)
  assert tree == tree2
  for a, b in zip(flat, flat2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert loaded["score"]["kernel"].sharding.mesh.shape == mesh.shape
  # Scores agree too (the head is read back, not re-initialised).
  tokens = jnp.asarray(np.arange(1, 17, dtype=np.int32)[None])
  seg = jnp.ones_like(tokens)
  pos = jnp.arange(16)[None]
  np.testing.assert_allclose(reward.scores(loaded, config, tokens, pos, seg),
                             reward.scores(params, config, tokens, pos, seg), rtol=1e-6)
  assert reward_io.load_metadata(path)["system_template"] == (
      "Persona of the user:\n{persona}")
  # An unscanned load for inference gives the same scores.
  c3, p3 = reward_io.load(path, scan_layers=False)
  np.testing.assert_allclose(reward.scores(p3, c3, tokens, pos, seg),
                             reward.scores(params, config, tokens, pos, seg), rtol=1e-5)
  with pytest.raises(FileNotFoundError, match="not a reward model"):
    reward_io.load(checkpoint)


# ----------------------------------------------------------------------------------------
# Items and leakage.
# ----------------------------------------------------------------------------------------


def test_items_are_test_users_target_turns(data_dir):
  users = {u.user_id: u for u in schema.read_jsonl(f"{data_dir}/users.jsonl",
                                                   schema.User)}
  convs = {c.conversation_hash: c for c in schema.read_jsonl(
      f"{data_dir}/conversations.jsonl", schema.Conversation)}
  personas = {p.user_id: p for p in schema.read_jsonl(f"{data_dir}/personas.jsonl",
                                                      schema.Persona)}
  got = items_lib.load_items(data_dir)
  test_users = {u for u, x in users.items() if x.split == "test"}
  want = [(h, i) for u in test_users if u in personas for h in users[u].targets
          for i, m in enumerate(convs[h].messages) if m.role == "user"]
  assert sorted((it.conversation_hash, it.message_index) for it in got.items) == sorted(
      want)
  for it in got.items:
    user, conv = users[it.user_id], convs[it.conversation_hash]
    assert user.split == "test" and it.conversation_hash in user.targets
    assert it.conversation_hash not in user.history
    assert it.context == conv.messages[:it.message_index + 1]
    assert it.context[-1].role == "user"
    first_user = min(i for i, m in enumerate(conv.messages) if m.role == "user")
    assert it.turn_type == ("initial" if it.message_index == first_user else "follow_up")
    assert it.original == conv.messages[it.message_index + 1].content
    assert it.persona == personas[it.user_id].to_text()
  assert got.counts["items_by_turn_type"]["follow_up"] > 0
  # Caps: per user, then in all, round-robin over users (first turns first).
  capped = items_lib.load_items(data_dir, max_items=7, max_turns_per_user=2)
  assert len(capped.items) == 7
  assert len({it.user_id for it in capped.items}) == len(test_users)
  assert capped.counts["skipped"]["max_items"] + capped.counts["skipped"][
      "max_turns_per_user"] + 7 == len(want)


def test_a_persona_built_from_a_target_conversation_is_refused(data_dir, tmp_path):
  for name in ("conversations.jsonl", "users.jsonl", "personas.jsonl"):
    shutil.copy(os.path.join(data_dir, name), tmp_path / name)
  users = schema.read_jsonl(tmp_path / "users.jsonl", schema.User)
  victim = next(u for u in users if u.split == "test")
  personas = schema.read_jsonl(tmp_path / "personas.jsonl", schema.Persona)
  personas = [p if p.user_id != victim.user_id else schema.Persona(
      **{**schema.to_dict(p), "source_conversations": (victim.targets[0],),
         "preferences": tuple(p.preferences), "recurring_topics": tuple(
             p.recurring_topics), "dislikes": tuple(p.dislikes)})
      for p in personas]
  schema.write_jsonl(tmp_path / "personas.jsonl", personas)
  with pytest.raises(ValueError, match="inferred from target conversation"):
    items_lib.load_items(str(tmp_path))


def test_no_test_target_text_in_training_data_or_personas(data_dir):
  users = schema.read_jsonl(f"{data_dir}/users.jsonl", schema.User)
  convs = {c.conversation_hash: c for c in schema.read_jsonl(
      f"{data_dir}/conversations.jsonl", schema.Conversation)}
  split_of = {u.user_id: u.split for u in users}
  # Every message of a test user's target conversations (long enough to be unique).
  secret = {m.content for u in users if u.split == "test" for h in u.targets
            for m in convs[h].messages if len(m.content) >= 40}
  assert len(secret) > 20
  training_text = []
  for split in ("train", "val"):
    with open(f"{data_dir}/pairs_rewrites.{split}.jsonl", encoding="utf-8") as f:
      training_text.append(f.read())
  training_text += [m.content for c in convs.values() if split_of[c.user_id] == "train"
                    for m in c.messages]
  with open(f"{data_dir}/personas.jsonl", encoding="utf-8") as f:
    training_text.append(f.read())
  blob = "\n".join(training_text)
  # JSON files escape newlines and quotes: compare the escaped form as well.
  leaked = [s for s in secret if s in blob or json.dumps(s)[1:-1] in blob]
  assert not leaked, leaked[:2]


# ----------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------


def _numpy_win_rate(judgements, dim, group, n_boot, seed):
  """Written apart from rlhi.eval.stats: per-item mean over orders, then a percentile
  bootstrap over items."""
  per_item = {}
  for j in judgements:
    per_item.setdefault(j["item_id"], [j["turn_type"], {}])[1][j["order"]] = (
        None if j["winners"] is None else j["winners"].get(dim))
  points = {"b": 1.0, "tie": 0.5, "a": 0.0}
  vals = []
  for item_id in sorted(per_item):
    turn_type, orders = per_item[item_id]
    if group != "all" and turn_type != group:
      continue
    if orders.get("ab") is None or orders.get("ba") is None:
      continue
    vals.append((points[orders["ab"]] + points[orders["ba"]]) / 2)
  x = np.array(vals)
  draws = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
  boot = x[draws].mean(axis=1)
  return x.mean(), np.percentile(boot, 2.5), np.percentile(boot, 97.5), len(x)


def test_win_rates_and_intervals_match_numpy():
  rng = np.random.default_rng(7)
  judgements = []
  for k in range(40):
    turn_type = "initial" if k % 3 == 0 else "follow_up"
    for order in ("ab", "ba"):
      failed = k in (5, 11) and order == "ba"
      judgements.append({
          "item_id": f"i{k:02d}", "turn_type": turn_type, "order": order,
          "winners": None if failed else {d: str(rng.choice(["a", "b", "tie"]))
                                          for d in stats.DIMENSIONS}})
  got = stats.win_rates(judgements, stats.DIMENSIONS, n_boot=500, seed=3)
  for d in stats.DIMENSIONS:
    for g in stats.GROUPS:
      mean, lo, hi, n = _numpy_win_rate(judgements, d, g, 500, 3)
      cell = got[d][g]
      assert cell["n_items"] == n
      np.testing.assert_allclose([cell["win_rate"], cell["ci_low"], cell["ci_high"]],
                                 [mean, lo, hi], rtol=1e-12)
  assert got["overall"]["all"]["excluded"] == 2
  assert got["overall"]["all"]["n_items"] == 38
  c = got["overall"]["all"]
  assert c["wins"] + c["ties"] + c["losses"] == 2 * 38


# ----------------------------------------------------------------------------------------
# The LLM judge on the loopback server.
# ----------------------------------------------------------------------------------------


def test_parse_choices():
  dims = ("overall", "personalization")
  assert judges.parse_choices({"overall": " a ", "personalization": "TIE"}, dims)[
      "choices"] == {"overall": "A", "personalization": "tie"}
  with pytest.raises(ValueError, match="missing field 'personalization'"):
    judges.parse_choices({"overall": "A"}, dims)
  with pytest.raises(ValueError, match="field 'overall': expected"):
    judges.parse_choices({"overall": "Response A", "personalization": "B"}, dims)


def test_a_judge_that_always_picks_the_first_answer_gives_exactly_half(data_dir,
                                                                       tmp_path):
  answers = str(tmp_path / "answers.jsonl")
  _answers_file(answers, data_dir, 9)
  with open(answers, "a", encoding="utf-8") as f:
    f.write("not json\n")  # set aside with its reason, not fatal
  with OpenAIServer(lambda body: _choice_json("A")) as server:
    cfg = _llm_cfg(data_dir, server, answers, max_items=9)
    report = usereval.run_usereval(cfg, str(tmp_path / "run"))
    assert server.counters()["requests"] == 2 * 9
  for d in stats.DIMENSIONS:
    for g in stats.GROUPS:
      c = report["win_rates"][d][g]
      assert (c["win_rate"], c["ci_low"], c["ci_high"]) == (0.5, 0.5, 0.5), (d, g)
  assert report["win_rates"]["overall"]["all"]["n_items"] == 9
  assert report["first_position_rate"] == 1.0
  assert report["judge"]["dimensions"] == list(stats.DIMENSIONS)
  rejects = schema.read_jsonl(tmp_path / "run" / usereval.REJECTS_FILE, schema.Reject)
  assert [(r.source, r.line, r.reason) for r in rejects] == [
      (answers, 10, "malformed_json")]


def test_a_judge_that_prefers_one_system_gives_all_or_nothing(data_dir, tmp_path):
  answers = str(tmp_path / "answers.jsonl")
  _answers_file(answers, data_dir, 9)
  with OpenAIServer(_prefers_b_mark) as server:
    report = usereval.run_usereval(_llm_cfg(data_dir, server, answers, 9),
                                   str(tmp_path / "b"))
  assert all(report["win_rates"][d][g]["win_rate"] == 1.0
             for d in stats.DIMENSIONS for g in stats.GROUPS)

  def prefers_original(body):
    prompt = body["messages"][0]["content"]
    return _choice_json("B" if B_MARK in _between("response_a", prompt) else "A")

  with OpenAIServer(prefers_original) as server:
    report = usereval.run_usereval(_llm_cfg(data_dir, server, answers, 9),
                                   str(tmp_path / "a"))
  assert all(report["win_rates"][d][g]["win_rate"] == 0.0
             for d in stats.DIMENSIONS for g in stats.GROUPS)


def test_unparseable_judge_answers_are_reasked_once_then_counted(data_dir, tmp_path):
  answers = str(tmp_path / "answers.jsonl")
  its = _answers_file(answers, data_dir, 8)
  always_bad, bad_first = {f"{B_MARK} 0:", f"{B_MARK} 1:"}, {f"{B_MARK} 2:"}

  def responder(body):
    prompt = body["messages"][0]["content"]
    is_reask = len(body["messages"]) > 1
    if any(m in prompt for m in always_bad):
      return "I prefer the first one." if not is_reask else '{"overall": "A"'
    if any(m in prompt for m in bad_first) and not is_reask:
      return json.dumps({"overall": "maybe"})
    return _prefers_b_mark(body)

  with OpenAIServer(responder) as server:
    cfg = _llm_cfg(data_dir, server, answers, 8)
    cfg.max_failure_fraction = 0.25  # 4 of 16 judgements fail: counted, not fatal
    report = usereval.run_usereval(cfg, str(tmp_path / "run"))
    log = server.requests()
  reasks = [r for r in log if len(r.body["messages"]) > 1]
  assert len(log) == 2 * 8 + len(reasks) and len(reasks) == 2 * 3  # one re-ask each
  assert report["judge_failures"]["failed"] == 4  # items 0 and 1, both orders
  assert report["judge_failures"]["by_reason"] == {"invalid_answer": 4}
  for d in stats.DIMENSIONS:
    c = report["win_rates"][d]["all"]
    # Excluded, not guessed: the 6 judged items all go to B.
    assert (c["n_items"], c["excluded"], c["win_rate"]) == (6, 2, 1.0)
  judgements = _jsonl(tmp_path / "run" / usereval.JUDGEMENTS_FILE)
  failed = {j["item_id"] for j in judgements if j["winners"] is None}
  assert failed == {its[0].item_id, its[1].item_id}
  assert all("after re-ask" in j["error"] for j in judgements if j["winners"] is None)
  rejects = schema.read_jsonl(tmp_path / "run" / usereval.REJECTS_FILE, schema.Reject)
  assert sum(r.source == "judge" for r in rejects) == 4
  # What the judge said, both times, is kept with the failure.
  said = ["I prefer the first one.", '{"overall": "A"']
  assert all(j["answers"] == said for j in judgements if j["winners"] is None)
  assert [json.loads(r.raw) for r in rejects if r.source == "judge"] == [said] * 4


def test_answers_a_system_cannot_give_are_counted_and_left_out(data_dir, checkpoint,
                                                                tmp_path):
  with OpenAIServer(lambda body: _choice_json("A")) as server:
    cfg = _llm_cfg(data_dir, server, "", max_items=5)
    cfg.systems.b = eval_config.get_config(f"ckpt={checkpoint}").systems.b
    cfg.generation.max_prompt_tokens = 1  # every prompt is too long: nothing generated
    # A run whose system B answered nothing fails, after writing its report.
    with pytest.raises(pipeline.StageFailedError,
                       match=r"usereval generation: 5 of 10 items failed"):
      usereval.run_usereval(cfg, str(tmp_path / "run"))
    assert server.counters()["requests"] == 0
  with open(tmp_path / "run" / report_lib.JSON_FILE, encoding="utf-8") as f:
    report = json.load(f)
  assert report["generation"]["systems"]["b"] == {
      "answered": 0, "reused": 0, "failed": 5,
      "failures_by_reason": {"prompt_too_long": 5}}
  assert report["pairs"] == 0 and report["generation"]["items_without_both_answers"] == 5
  assert report["win_rates"]["overall"]["all"]["win_rate"] is None
  rejects = schema.read_jsonl(tmp_path / "run" / usereval.REJECTS_FILE, schema.Reject)
  assert [r.source for r in rejects] == ["generation/b"] * 5
  assert "n/a" in (tmp_path / "run" / "usereval.md").read_text()


def test_eval_config_variants():
  cfg = eval_config.get_config("judge=reward_model,a=checkpoint,ckpt=/c,rm=/r")
  assert (cfg.systems.a.kind, cfg.systems.a.path, cfg.systems.a.with_persona) == (
      "checkpoint", "/c", False)
  assert (cfg.systems.b.kind, cfg.systems.b.path, cfg.systems.b.with_persona) == (
      "checkpoint", "/c", True)
  assert cfg.judge.reward_model.path == cfg.reward_eval.path == "/r"
  assert cfg.reward_eval.enabled and cfg.usereval_enabled
  ablation = eval_config.get_config("no_persona,ckpt=/c")
  assert not ablation.systems.b.with_persona
  assert not ablation.judge.reward_model.with_persona
  assert not eval_config.get_config("rm_only,rm=/r").usereval_enabled
  with pytest.raises(ValueError, match="expected llm or reward_model"):
    eval_config.get_config("judge=gpt")
  with pytest.raises(ValueError, match=r"config.systems.b.path is empty"):
    systems.System.from_config("b", eval_config.get_config().systems.b)


# ----------------------------------------------------------------------------------------
# The reward-model judge.
# ----------------------------------------------------------------------------------------


def test_reward_model_judge_scores_with_the_persona_in_the_system_slot(
    data_dir, reward_model):
  path, config, params = reward_model
  judge = judges.RewardModelJudge(path, max_length=4096,
                                  bucket_lengths=(512, 1024, 2048, 4096))
  its = [it for it in items_lib.load_items(data_dir, max_items=8).items
         if it.turn_type == "follow_up"] + items_lib.load_items(data_dir).items[:1]
  pairs = [judges.Pair(it, it.original, "Sure. Here it is, short.") for it in its]
  got = judge.score_pairs(pairs)
  tok = tok_lib.load_tokenizer(path)
  fwd = jax.jit(lambda t: reward.scores(params, config, t, None, jnp.ones_like(t)))
  for pair, scores in zip(pairs, got):
    it = pair.item
    for answer, score in zip((pair.answer_a, pair.answer_b), scores):
      # Independent input: the whole chat rendered by the template, unpadded.
      text = tok.apply_chat_template(
          [{"role": "system", "content": f"Persona of the user:\n{it.persona}"}]
          + it.chat() + [{"role": "assistant", "content": answer}], tokenize=False)
      ids = tok(text, add_special_tokens=False)["input_ids"]
      want = float(fwd(jnp.asarray([ids], jnp.int32))[0])
      assert score == pytest.approx(want, rel=1e-4, abs=1e-4)
  # A context that cannot fit is a failure with its reason, not a score.
  short = judges.RewardModelJudge(path, max_length=64, bucket_lengths=(64,))
  assert "max_length 64" in short.score_pairs(pairs[:1])[0]


def test_usereval_with_the_reward_model_judge(data_dir, reward_model, tmp_path):
  path, *_ = reward_model
  answers = str(tmp_path / "answers.jsonl")
  _answers_file(answers, data_dir, 6)
  cfg = eval_config.get_config(f"judge=reward_model,b=answers,max_items=6,rm={path}")
  cfg.data.dir, cfg.systems.b.path, cfg.n_boot = data_dir, answers, 200
  cfg.judge.reward_model.max_length = 4096
  cfg.judge.reward_model.bucket_lengths = (1024, 4096)
  report = usereval.run_usereval(cfg, str(tmp_path / "run"))
  assert report["judge"]["kind"] == "reward_model"
  assert report["judge"]["dimensions"] == ["overall"]
  assert "only 'overall'" in report["judge"]["description"]
  assert set(report["win_rates"]) == {"overall"}
  judgements = _jsonl(tmp_path / "run" / usereval.JUDGEMENTS_FILE)
  # Scores do not depend on the order: each pair is judged once.
  assert len(judgements) == 6 and {j["order"] for j in judgements} == {"any"}
  assert len({j["item_id"] for j in judgements}) == 6
  for j in judgements:
    sa, sb = j["scores"]["a"], j["scores"]["b"]
    assert j["winners"]["overall"] == ("b" if sb > sa else "a" if sa > sb else "tie")
  wins = sum(j["winners"]["overall"] == "b" for j in judgements)
  ties = sum(j["winners"]["overall"] == "tie" for j in judgements)
  cell = report["win_rates"]["overall"]["all"]
  assert cell["win_rate"] == pytest.approx((wins + 0.5 * ties) / 6)
  assert cell["wins"] + cell["ties"] + cell["losses"] == 6
  assert report["judge"]["orders"] == ["any"]
  assert report["first_position_rate"] is None
  md = (tmp_path / "run" / "usereval.md").read_text(encoding="utf-8")
  assert "reward model" in md and "dimensions judged: overall." in md
  assert "judged once" in md and "judged in both orders" not in md


def test_answers_of_another_run_are_reused_when_the_system_matches(
    data_dir, checkpoint, reward_model, tmp_path):
  path, *_ = reward_model
  answers = str(tmp_path / "answers.jsonl")
  _answers_file(answers, data_dir, 4)

  def run(name, persona, reuse=()):
    cfg = eval_config.get_config(f"judge=reward_model,b=answers,max_items=4,rm={path}")
    cfg.data.dir, cfg.n_boot = data_dir, 200
    cfg.systems.a = cfg.systems.b.copy_and_resolve_references()
    cfg.systems.b.path = answers
    cfg.systems.a.update(kind="checkpoint", path=checkpoint, with_persona=persona)
    cfg.generation.max_new_tokens = 8
    cfg.judge.reward_model.max_length = 4096
    cfg.judge.reward_model.bucket_lengths = (1024, 4096)
    cfg.reuse_answers_from = reuse
    report = usereval.run_usereval(cfg, str(tmp_path / name))
    texts = {r["item_id"]: r["text"] for r in
             _jsonl(tmp_path / name / usereval.GENERATIONS_FILE) if r["system"] == "a"}
    return report["generation"]["systems"]["a"], texts

  first, texts = run("first", True)
  assert first["answered"] == 4 and first["reused"] == 0
  # The same checkpoint, persona and settings: every answer comes from the first run.
  again, texts_again = run("again", True, reuse=(str(tmp_path / "first"),))
  assert again["answered"] == 4 and again["reused"] == 4 and texts_again == texts
  # Without the persona it is another system: nothing to reuse.
  other, _ = run("other", False, reuse=(str(tmp_path / "first"),))
  assert other["answered"] == 4 and other["reused"] == 0


# ----------------------------------------------------------------------------------------
# CI: experiments/evaluate.py as a launch script runs it.
# ----------------------------------------------------------------------------------------


def _hash_choice(body):
  """A deterministic but uninformative judge: A, B or tie per prompt and dimension."""
  prompt = body["messages"][0]["content"]
  out = {}
  for d in stats.DIMENSIONS:
    h = hashlib.sha256((d + prompt).encode()).digest()[0] % 3
    out[d] = ("A", "B", "tie")[h]
  return json.dumps(out)


@pytest.mark.slow  # 20-90 s on 2 cores; CI runs it
def test_evaluate_cli_end_to_end(data_dir, checkpoint, reward_model, tmp_path):
  rm_path, *_ = reward_model
  workdir = tmp_path / "eval"
  key = "sk-test-" + secrets.token_hex(8)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", RLHI_JUDGE_KEY=key)
  with OpenAIServer(_hash_choice) as server:
    cmd = [sys.executable, "-m", "experiments.evaluate",
           f"--config=configs/eval.py:ckpt={checkpoint},rm={rm_path},max_items=7",
           f"--workdir={workdir}", f"--config.data.dir={data_dir}",
           f"--config.judge.client.base_url={server.base_url}",
           "--config.judge.client.model=judge",
           "--config.judge.client.api_key_env=RLHI_JUDGE_KEY",
           "--config.generation.max_new_tokens=16", "--config.n_boot=200",
           "--config.reward_eval.max_length=4096",
           "--config.reward_eval.bucket_lengths=(1024,4096)"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    log = server.requests()
    # Re-running the same command resumes: answers reused, judge calls from the cache.
    server.clear()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert server.counters()["requests"] == 0
  assert len(log) == 2 * 7 and all(
      r.headers["Authorization"] == f"Bearer {key}" for r in log)
  for name in ("usereval.md", "usereval.json", "usereval.png",
               usereval.GENERATIONS_FILE, usereval.JUDGEMENTS_FILE,
               usereval.ITEMS_FILE, "reward_eval_report.md",
               "reward_eval_report.json"):
    assert (workdir / name).stat().st_size > 0, name
  assert (workdir / "usereval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for path in workdir.rglob("*"):
    if path.is_file():
      assert key.encode() not in path.read_bytes(), path

  report = json.loads((workdir / "usereval.json").read_text())
  assert report["systems"]["a"]["kind"] == "original"
  assert report["systems"]["b"]["kind"] == "checkpoint"
  assert report["systems"]["b"]["with_persona"] is True
  assert report["generation"]["systems"]["b"]["answered"] == 7
  rates = report["win_rates"]
  for d in stats.DIMENSIONS:
    cells = rates[d]
    assert cells["initial"]["n_items"] + cells["follow_up"]["n_items"] == cells["all"][
        "n_items"] == 7
    for g in stats.GROUPS:
      c = cells[g]
      assert c["wins"] + c["ties"] + c["losses"] == 2 * c["n_items"]
      assert c["win_rate"] == pytest.approx((c["wins"] + 0.5 * c["ties"]) /
                                            (2 * c["n_items"]))
      assert c["ci_low"] <= c["win_rate"] <= c["ci_high"]
  md = (workdir / "usereval.md").read_text()
  assert "**System B**" in md and "Win rate of **B over A**" in md
  assert f"{100 * rates['overall']['all']['win_rate']:.1f}%" in md
  # Judgements follow the scripted judge, mapped back through the position swap.
  judgements = _jsonl(workdir / usereval.JUDGEMENTS_FILE)
  assert len(judgements) == 14 and all(j["winners"] for j in judgements)

  rm = json.loads((workdir / "reward_eval_report.json").read_text())
  n_pairs = {s: len(_jsonl(os.path.join(data_dir, f"pairs_rewrites.{s}.jsonl")))
             for s in ("val", "test")}
  for s in ("val", "test"):
    for p in ("persona", "no_persona"):
      tag = f"{s}_{p}"
      assert rm["metrics"][f"{tag}/count"] + rm["inputs"][tag]["num_dropped"] == (
          n_pairs[s])
      assert 0.0 <= rm["metrics"][f"{tag}/accuracy"] <= 1.0
  # Accuracy and margin against an independent scoring of the val pairs with persona.
  _, config, params = reward_model
  tok = tok_lib.load_tokenizer(rm_path)
  fwd = jax.jit(lambda t, s: reward.scores(params, config, t, None, s))
  scores = []
  for pair in schema.read_jsonl(os.path.join(data_dir, "pairs_rewrites.val.jsonl"),
                                schema.PreferencePair):
    system = [{"role": "system", "content": f"Persona of the user:\n{pair.persona}"}
              ] if pair.persona else []  # Users without a persona have none.
    for answer in (pair.chosen, pair.rejected):
      text = tok.apply_chat_template(system + [m.to_chat() for m in pair.prompt] + [
          {"role": "assistant", "content": answer}], tokenize=False)
      ids = tok(text, add_special_tokens=False)["input_ids"]
      width = -(-len(ids) // 512) * 512
      padded = np.zeros((1, width), np.int32)
      padded[0, :len(ids)] = ids
      seg = (np.arange(width) < len(ids)).astype(np.int32)[None]
      scores.append(float(fwd(jnp.asarray(padded), jnp.asarray(seg))[0]))
  chosen, rejected = np.array(scores[0::2]), np.array(scores[1::2])
  assert rm["inputs"]["val_persona"]["truncated"] == 0
  assert rm["metrics"]["val_persona/accuracy"] == pytest.approx(
      np.mean(chosen > rejected))
  assert rm["metrics"]["val_persona/margin"] == pytest.approx(
      np.mean(chosen - rejected), rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_evaluate_on_two_processes_equals_one(data_dir, checkpoint, reward_model,
                                              tmp_path):
  """experiments/evaluate.py as the TPU launch runs it, 2 processes x 1 device
  (jax.distributed on 127.0.0.1), against 1 process x 2 devices: the same sampled
  answers, reward-model verdicts, win rates and RM accuracy, each file written once."""
  import test_training as tt  # pylint: disable=g-import-not-at-top
  rm_path, *_ = reward_model

  def cmd(workdir):
    return [sys.executable, "-m", "experiments.evaluate",
            f"--config=configs/eval.py:judge=reward_model,a=checkpoint,ckpt={checkpoint},"
            f"rm={rm_path},max_items=6", f"--workdir={workdir}",
            f"--config.data.dir={data_dir}", "--config.generation.max_new_tokens=16",
            "--config.generation.temperature=0.7", "--config.n_boot=200",
            "--config.judge.reward_model.max_length=4096",
            "--config.judge.reward_model.bucket_lengths=(1024,4096)",
            "--config.reward_eval.max_length=4096",
            "--config.reward_eval.bucket_lengths=(1024,4096)"]

  one, two = tmp_path / "one", tmp_path / "two"
  subprocess.run(cmd(one), cwd=REPO, env=tt._env(2), check=True, capture_output=True)
  tt.run_on_two_processes(cmd(two), timeout=420)
  g1, g2 = (_jsonl(w / usereval.GENERATIONS_FILE) for w in (one, two))
  assert len(g1) == 2 * 6 and g1 == g2  # both systems' answers, once each
  j1, j2 = (_jsonl(w / usereval.JUDGEMENTS_FILE) for w in (one, two))
  assert len(j1) == len(j2) == 6  # the reward model judges each pair once
  for a, b in zip(j1, j2):
    assert a["winners"] == b["winners"]
    for k in ("a", "b"):
      assert a["scores"][k] == pytest.approx(b["scores"][k], rel=1e-5, abs=1e-5)
  r1, r2 = (json.loads((w / "usereval.json").read_text()) for w in (one, two))
  assert r1["win_rates"] == r2["win_rates"]
  m1, m2 = (json.loads((w / "reward_eval_report.json").read_text())["metrics"]
            for w in (one, two))
  assert m1.keys() == m2.keys()
  for k in m1:
    assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-5), k


@pytest.mark.slow  # 20-90 s on 2 cores; CI runs it
def test_train_reward_exports_a_model_that_evaluates_as_in_training(data_dir, tmp_path):
  """train_reward's export, loaded by reward_io, reproduces training's own eval."""
  workdir = tmp_path / "rm"
  small = ",".join(f"{k}={v}" for k, v in SMALL.items())
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  run = subprocess.run(
      [sys.executable, "-m", "experiments.train_reward",
       "--config=configs/reward_model.py:steps=2", f"--workdir={workdir}",
       f"--config.data.dir={data_dir}", f"--config.model.overrides={small}",
       "--config.data.max_length=256", "--config.data.max_response_length=64",
       "--config.data.bucket_lengths=(256,)", "--config.batch_size=8",
       "--config.checkpoint.every=2", "--config.eval_every=0"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  trained = json.loads((workdir / "eval_report.json").read_text())
  export = str(workdir / "reward_model")
  assert reward_io.load_metadata(export)["with_persona"] is True
  got = reward_eval.evaluate_reward_model(
      export, data_dir, splits=("val", "test"), batch_size=8, max_length=256,
      max_response_length=64, bucket_lengths=(256,))
  for tag in ("val_persona", "val_no_persona", "test_persona", "test_no_persona"):
    assert got["metrics"][f"{tag}/count"] == trained[f"{tag}/count"]
    for name in ("accuracy", "margin", "loss"):
      assert got["metrics"][f"{tag}/{name}"] == pytest.approx(
          trained[f"{tag}/{name}"], rel=1e-4, abs=1e-5), (tag, name)


def test_length_controlled_win_rate_recovers_the_generating_model():
  """Item scores drawn from a known logistic model of the length difference: the fit
  recovers its parameters, and the LC win rate is the equal-length win rate."""
  rng = np.random.default_rng(0)
  n = 4000
  len_a = rng.integers(50, 800, n)
  len_b = rng.integers(50, 800, n)
  d = (len_b - len_a).astype(np.float64)
  x = np.tanh(d / d.std())
  t0, t1 = -0.4, 1.5  # B worse at equal length, but longer answers win
  p = 1 / (1 + np.exp(-(t0 + t1 * x)))
  scores = (rng.random(n) < p).astype(np.float64)
  out = stats.length_controlled(scores, len_a, len_b)
  assert out["length_coef"] == pytest.approx(t1, abs=0.15)
  assert out["win_rate_lc"] == pytest.approx(1 / (1 + np.exp(-t0)), abs=0.03)
  longer = np.where(d > 0, scores, 1 - scores)[d != 0].mean()
  assert out["longer_won"] == pytest.approx(longer)
  # No length effect and equal lengths: the LC rate is the raw rate.
  flat = stats.length_controlled([1, 0, 0.5, 1], [10] * 4, [10] * 4)
  assert flat["win_rate_lc"] == pytest.approx(0.625, abs=5e-3)  # the prior's pull
  assert flat["longer_won"] is None
  # Perfect separation (the longer always wins) stays finite.
  sep = stats.length_controlled([1, 1, 0, 0], [10, 20, 90, 80], [50, 60, 30, 40])
  assert 0 < sep["win_rate_lc"] < 1 and sep["longer_won"] == 1.0
