"""Simulated interaction logs go through the pipeline unchanged (no jax).

  - every generated row ingests with zero rejects; users are the simulated users, and
    the split is by user (each user's conversations in one split, history before
    targets);
  - the simulator's annotations answer the classify and persona stages through the
    reference backend, and the labels are the users' reactions;
  - a model's rewrites from the feedback become preference pairs (rewrites stage);
  - the candidate pairs' labels are the argmax of the user's true reward, and
    seen/unseen groups follow the users' splits.
"""

import collections
import json
import os

import numpy as np
import pytest

from configs import data_prep
from rlhi.data import client as client_lib
from rlhi.data import files
from rlhi.data import pipeline
from rlhi.data import rewrites
from rlhi.data import schema
from rlhi.data import wildchat
from rlhi.sim import candidates
from rlhi.sim import features
from rlhi.sim import logs
from rlhi.sim import users as users_lib


class StylePolicy(client_lib.InferenceClient):
  """A stand-in policy: answers with a style variant of a canned answer, chosen by the
  request key's hash, so that the users' reactions differ; rewrites are a short
  different text. Counts the requests it got."""

  kind = name = "style-policy (test)"

  def __init__(self, fail_every: int = 0):
    super().__init__()
    self.asked = []
    self.fail_every = fail_every
    base = ("To list files, run the command below. It shows hidden files too. You may "
            "want to add -h for sizes.\n\n```bash\nls -la\n```")
    self.answers = list(candidates.variants(base).values())

  def cache_identity(self):
    return {"backend": self.kind}

  def _answer(self, requests, on_result):
    for i, r in enumerate(requests):
      self.asked.append(r.key)
      if self.fail_every and len(self.asked) % self.fail_every == 0:
        on_result(i, client_lib.ChatResult(key=r.key, text=None, error="boom"))
        continue
      if r.key.startswith("rewrite"):
        text = "Run ls with the long-format flag to see every file in the folder."
      else:
        h = int.from_bytes(r.key.encode()[-4:], "big")
        text = self.answers[h % len(self.answers)]
      on_result(i, client_lib.ChatResult(key=r.key, text=text))


@pytest.fixture(scope="module")
def sim_logs(tmp_path_factory):
  work = tmp_path_factory.mktemp("sim")
  users = users_lib.make_users(12, seed=3)
  prompts = logs.load_prompts()
  policy = StylePolicy()
  result = logs.simulate(users, prompts, policy, logs.LogConfig(conversations_per_user=4))
  logs.write(str(work), result)
  cfg = data_prep.get_config()
  cfg.ingest.source = os.path.join(work, logs.ROWS)
  cfg.ingest.split_fractions = dict(train=0.5, val=0.25, test=0.25)
  cfg.client.backend = "reference"
  cfg.client.reference_path = os.path.join(work, logs.ANNOTATIONS)
  data = os.path.join(work, "data")
  reports = {s: pipeline.run_stage(s, cfg, data) for s in ("ingest", "classify",
                                                           "persona")}
  return work, data, users, result, reports, policy, cfg


def test_every_row_ingests_with_zero_rejects(sim_logs):
  work, data, users, result, reports, policy, _ = sim_logs
  assert result.counts["conversations"] == 12 * 4 == len(result.rows)
  assert result.counts["dropped"] == {}
  # Two policy answers per conversation: the request, then the follow-up.
  assert len(policy.asked) == 2 * 48
  ingest = reports["ingest"]
  assert ingest["rows_read"] == 48 and ingest["kept"] == 48
  assert sum(ingest["rejected"].values()) == 0
  with open(os.path.join(data, files.REJECTS.format(stage="ingest"))) as f:
    assert f.read() == ""


def test_users_are_the_simulated_users_and_split_by_user(sim_logs):
  work, data, users, *_, cfg = sim_logs
  ingested = schema.read_jsonl(os.path.join(data, files.USERS), schema.User)
  assert {u.user_id for u in ingested} == {u.user_id for u in users}
  convs = {c.conversation_hash: c for c in schema.read_jsonl(
      os.path.join(data, files.CONVERSATIONS), schema.Conversation)}
  # The split the pipeline's own config gives (the fractions' order matters).
  icfg = wildchat.IngestConfig.from_config({
      k: v for k, v in cfg.ingest.items() if k not in ("source", "hf_split",
                                                        "streaming")})
  for u in ingested:
    assert u.split == wildchat.split_of(u.user_id, icfg)
    assert len(u.history) == 2 and len(u.targets) == 2  # num_targets=2 of 4
    for h in (*u.history, *u.targets):
      assert convs[h].user_id == u.user_id
    # History strictly before targets.
    assert max(convs[h].timestamp for h in u.history) < min(
        convs[h].timestamp for h in u.targets)
  splits = json.load(open(os.path.join(data, files.SPLITS)))["users"]
  all_ids = [i for s in splits.values() for i in s]
  assert len(all_ids) == len(set(all_ids)) == 12


def test_labels_and_personas_are_the_simulators(sim_logs):
  work, data, users, result, reports, *_ = sim_logs
  assert reports["classify"]["rejected"] == {} if "rejected" in reports["classify"] \
      else True
  follow_ups = schema.read_jsonl(os.path.join(data, files.FOLLOW_UPS), schema.FollowUp)
  truth = {t["conversation_hash"]: t["reaction"] for t in result.truth}
  assert len(follow_ups) == 48
  for f in follow_ups:
    assert f.message_index == 2
    assert f.label == truth[f.conversation_hash]["label"]
    assert f.actionable == truth[f.conversation_hash]["actionable"]
  # The reaction is what the user's preferences say about the first answer.
  by_id = {u.user_id: u for u in users}
  convs = {c.conversation_hash: c for c in schema.read_jsonl(
      os.path.join(data, files.CONVERSATIONS), schema.Conversation)}
  for h, r in truth.items():
    u = by_id[convs[h].user_id]
    d = u.deficits(convs[h].messages[1].content)
    assert r["actionable"] == (max(d.values()) > u.tolerance)
    if r["actionable"]:
      assert r["feature"] == max(d, key=lambda k: (d[k], k))
  assert collections.Counter(f.actionable for f in follow_ups)[True] > 0
  personas = schema.read_jsonl(os.path.join(data, files.PERSONAS), schema.Persona)
  cards = {u.user_id: u.card for u in users}
  assert len(personas) == 12
  for p in personas:
    assert list(p.preferences) == cards[p.user_id]["preferences"]


def test_rewrites_from_the_feedback_become_pairs(sim_logs):
  work, data, users, *_ = sim_logs
  follow_ups = schema.read_jsonl(os.path.join(data, files.FOLLOW_UPS), schema.FollowUp)
  convs = schema.read_jsonl(os.path.join(data, files.CONVERSATIONS), schema.Conversation)
  personas = {p.user_id: p for p in schema.read_jsonl(
      os.path.join(data, files.PERSONAS), schema.Persona)}
  rewriter = StylePolicy()
  pairs, failed = rewrites.make_pairs(rewriter, follow_ups, convs, personas,
                                      rewrites.RewriteConfig())
  wanted = [f for f in follow_ups if f.actionable and f.part == "target"]
  assert len(pairs) + len(failed) == len(wanted) > 0
  assert not failed
  # The rewriter was shown the user's follow-up (the feedback), not the truth.
  assert all(k.startswith("rewrite/") for k in rewriter.asked)
  for p in pairs:
    assert p.rejected == {c.conversation_hash: c for c in convs}[
        p.conversation_hash].messages[1].content
    assert p.persona and "Preferences:" in p.persona


def test_failed_policy_answers_are_counted_not_lost():
  users = users_lib.make_users(4, seed=1)
  result = logs.simulate(users, logs.load_prompts(), StylePolicy(fail_every=5),
                         logs.LogConfig(conversations_per_user=5))
  asked = result.counts["conversations_asked"]
  assert asked == 20
  assert result.counts["conversations"] + sum(result.counts["dropped"].values()) == asked
  assert result.counts["dropped"]["policy_failed"] > 0


def test_candidate_labels_are_the_argmax_of_the_true_reward():
  users = users_lib.make_users(10, seed=2)
  cfg = wildchat.IngestConfig.from_config(dict(split_fractions=dict(
      train=0.6, val=0.1, test=0.3)))
  split = lambda u: wildchat.split_of(u, cfg)
  pairs = candidates.labelled_pairs(users, logs.load_prompts(), split,
                                    candidates.PairConfig(prompts_per_user=4))
  by_id = {u.user_id: u for u in users}
  assert len(pairs) == 10 * 4 * 2
  for lp in pairs:
    u = by_id[lp.pair.user_id]
    w = np.array(u.weights)
    rc = float(w @ np.array([features.of(lp.pair.chosen)[k] for k in features.FEATURES]))
    rr = float(w @ np.array([features.of(lp.pair.rejected)[k]
                             for k in features.FEATURES]))
    assert rc >= rr  # noise 0: the chosen answer has the higher true reward
    assert lp.reward_chosen == pytest.approx(rc)
    assert lp.pair.chosen != lp.pair.rejected
    assert lp.group == ("unseen" if split(u.user_id) != "train" else lp.group)
    assert lp.group in (("train", "seen") if split(u.user_id) == "train" else
                        ("unseen",))
  # Seen users' held-out requests are not among their training requests.
  for u in users:
    mine = [lp for lp in pairs if lp.pair.user_id == u.user_id]
    train = {lp.pair.conversation_hash for lp in mine if lp.group == "train"}
    seen = {lp.pair.conversation_hash for lp in mine if lp.group == "seen"}
    assert not train & seen


def test_majority_label_is_the_vote_of_the_training_users():
  users = users_lib.make_users(9, seed=4)
  train, rest = users[:5], users[5:]
  pairs = [lp.pair for lp in candidates.labelled_pairs(
      rest, logs.load_prompts(), lambda u: "test", candidates.PairConfig(
          prompts_per_user=3))]
  got = candidates.majority_labels(pairs, train)
  for p, g in zip(pairs, got):
    # Counted one user at a time with SimUser.reward (no vector maths).
    votes = sum(u.reward(p.chosen) >= u.reward(p.rejected) for u in train)
    assert g == (votes >= 3)
  assert len(got) == len(pairs) == 4 * 3 * 2
