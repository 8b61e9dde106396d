"""The ground-truth judge: simulated users' true rewards decide UserEval pairs.

Hand-built items and answers, and simulated users from rlhi.sim.users; the expected
winners are recomputed here from the users' weights and rlhi.sim.features, not with
SimUser.reward. The end-to-end test runs UserEval on the bundled sample with an
`answers` system (no model), its test users given simulated preferences.
"""

import dataclasses
import json

import pytest

from configs import eval as eval_config
from rlhi.data import items as items_lib
from rlhi.data import schema
from rlhi.eval import judges
from rlhi.eval import stats
from rlhi.eval import usereval
from rlhi.sim import features
from rlhi.sim import users as sim_users

SHORT_CODE = "```\nls -la\n```"
LONG_PROSE = " ".join(
    ["It depends on your setup, so it might help to look at a few options first."]
    + ["Generally you can list the files in a folder with a file manager, and you may "
       "also want to check hidden files, which are typically not shown by default."] * 8
    + ["In some cases you will probably need extra permissions, so consult the docs."])


def _true_reward(user, text):
  """w . f, from the user's weights and the features, computed here."""
  f = features.of(text)
  return sum(w * f[k] for k, w in zip(features.FEATURES, user.weights))


def _item(item_id, user_id, question="How do I list the files in a folder?"):
  return items_lib.EvalItem(
      item_id=item_id, user_id=user_id, conversation_hash=item_id.split("/")[0],
      message_index=0, turn_type="initial",
      context=(schema.Message(role="user", content=question),), original=None,
      persona="A persona.")


@pytest.fixture
def users_file(tmp_path):
  users = sim_users.make_users(4)
  path = str(tmp_path / "sim_users.jsonl")
  sim_users.save_users(path, users)
  return path, users


def test_the_answer_with_the_higher_true_reward_wins(users_file):
  path, users = users_file
  judge = judges.GroundTruthJudge(path)
  assert (judge.kind, judge.dimensions, judge.orders, judge.collective,
          judge.requests) == ("ground_truth", ("overall",), (stats.ANY_ORDER,), False,
                              None)
  pairs = []
  for u in users:  # both orders of the two answers, for every user
    pairs.append(judges.Pair(_item(f"c{u.index}/0", u.user_id), SHORT_CODE, LONG_PROSE))
    pairs.append(judges.Pair(_item(f"c{u.index}/2", u.user_id), LONG_PROSE, SHORT_CODE))
  records = judge.judge(pairs)
  scores = judge.score_answers(pairs)
  assert len(records) == len(scores) == len(pairs)
  by_id = {u.user_id: u for u in users}
  for pair, record, (ra, rb) in zip(pairs, records, scores):
    user = by_id[pair.item.user_id]
    want_a, want_b = (_true_reward(user, pair.answer_a),
                      _true_reward(user, pair.answer_b))
    assert (ra, rb) == (pytest.approx(want_a, abs=1e-9), pytest.approx(want_b,
                                                                       abs=1e-9))
    assert abs(want_a - want_b) > 1e-3  # the answers differ in what users weigh
    assert record == {
        "item_id": pair.item.item_id, "turn_type": "initial", "order": "any",
        "shown_first": None, "scores": {"a": ra, "b": rb},
        "winners": {"overall": "a" if want_a > want_b else "b"}, "error": None}
  # The clusters disagree: the terse engineer wants the snippet, the thorough learner
  # the long explanation.
  terse, thorough = users[0], users[1]
  assert (terse.cluster, thorough.cluster) == ("terse_engineer", "thorough_learner")
  assert records[0]["winners"] == {"overall": "a"}  # terse: SHORT_CODE as A
  assert records[1]["winners"] == {"overall": "b"}  # terse: SHORT_CODE as B
  assert records[2]["winners"] == {"overall": "b"}  # thorough: LONG_PROSE as B
  assert records[3]["winners"] == {"overall": "a"}  # thorough: LONG_PROSE as A
  assert "only 'overall'" in judge.description and path in judge.description


def test_identical_answers_tie(users_file):
  path, users = users_file
  judge = judges.GroundTruthJudge(path)
  pairs = [judges.Pair(_item(f"c{u.index}/0", u.user_id), text, text)
           for u in users for text in (SHORT_CODE, LONG_PROSE, "")]
  for record in judge.judge(pairs):
    assert record["winners"] == {"overall": "tie"} and record["error"] is None
    assert record["scores"]["a"] == record["scores"]["b"]


def test_an_unknown_user_is_a_failure_not_a_guess(users_file):
  path, users = users_file
  judge = judges.GroundTruthJudge(path)
  pairs = [judges.Pair(_item("c0/0", users[0].user_id), SHORT_CODE, LONG_PROSE),
           judges.Pair(_item("c9/0", "not-a-simulated-user"), SHORT_CODE, LONG_PROSE)]
  known, unknown = judge.judge(pairs)
  assert known["error"] is None and known["winners"] is not None
  assert unknown["winners"] is None and unknown["scores"] is None
  assert "'not-a-simulated-user'" in unknown["error"] and path in unknown["error"]
  assert unknown["error"].startswith("unknown user")
  assert isinstance(judge.score_answers(pairs)[1], str)


def test_make_judge_builds_it_from_the_config(users_file, tmp_path):
  path, users = users_file
  cfg = eval_config.get_config("judge=ground_truth")
  assert cfg.judge.kind == "ground_truth" and cfg.judge.ground_truth.users == ""
  # Without the users file the error names the setting.
  with pytest.raises(ValueError, match=r"config\.judge\.ground_truth\.users"):
    judges.make_judge(cfg.judge, workdir=str(tmp_path), cache_name="c.sqlite")
  cfg.judge.ground_truth.users = str(tmp_path / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match=r"config\.judge\.ground_truth\.users"):
    judges.make_judge(cfg.judge, workdir=str(tmp_path), cache_name="c.sqlite")
  cfg.judge.ground_truth.users = path
  judge = judges.make_judge(cfg.judge, workdir=str(tmp_path), cache_name="c.sqlite")
  assert isinstance(judge, judges.GroundTruthJudge)
  assert set(judge.users) == {u.user_id for u in users}
  with pytest.raises(ValueError, match="ground_truth"):
    eval_config.get_config("judge=oracle")


def test_usereval_with_the_ground_truth_judge(data_dir, tmp_path):
  its = items_lib.load_items(data_dir, max_items=6).items
  # The sample's test users, with simulated preferences.
  ids = sorted({it.user_id for it in its})
  users = [dataclasses.replace(u, user_id=i)
           for u, i in zip(sim_users.make_users(len(ids)), ids)]
  users_path = str(tmp_path / "sim_users.jsonl")
  sim_users.save_users(users_path, users)
  answers = str(tmp_path / "answers.jsonl")
  with open(answers, "w", encoding="utf-8") as f:
    for k, it in enumerate(its):
      f.write(json.dumps({"item_id": it.item_id,
                          "text": SHORT_CODE if k % 2 else LONG_PROSE}) + "\n")

  cfg = eval_config.get_config("judge=ground_truth,b=answers,max_items=6")
  cfg.data.dir, cfg.systems.b.path, cfg.n_boot = data_dir, answers, 200
  cfg.judge.ground_truth.users = users_path
  report = usereval.run_usereval(cfg, str(tmp_path / "run"))
  assert report["judge"]["kind"] == "ground_truth"
  assert report["judge"]["dimensions"] == ["overall"]
  assert report["judge"]["orders"] == ["any"] and report["requests"] is None
  assert report["judge_failures"]["failed"] == 0

  by_id = {u.user_id: u for u in users}
  texts = {}
  with open(tmp_path / "run" / usereval.GENERATIONS_FILE, encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      texts[r["system"], r["item_id"]] = r["text"]
  with open(tmp_path / "run" / usereval.JUDGEMENTS_FILE, encoding="utf-8") as f:
    judgements = [json.loads(line) for line in f]
  assert len(judgements) == len(its) == 6
  item_user = {it.item_id: it.user_id for it in its}
  wins = ties = 0
  for j in judgements:
    user = by_id[item_user[j["item_id"]]]
    ra = _true_reward(user, texts["a", j["item_id"]])
    rb = _true_reward(user, texts["b", j["item_id"]])
    want = "tie" if abs(ra - rb) <= 1e-12 else "b" if rb > ra else "a"
    assert j["winners"] == {"overall": want}
    wins += want == "b"
    ties += want == "tie"
  cell = report["win_rates"]["overall"]["all"]
  assert cell["win_rate"] == pytest.approx((wins + 0.5 * ties) / 6)
