"""A simulation whose policy mostly fails stops with a non-zero exit, and says why; the
reward-model rows of its report share one set of pairs.

experiments/simulate.py's logs and prep stages on a stand-in policy (tests/
test_sim_logs.py StylePolicy, no model) in place of the local backend: fewer than half
of the asked conversations surviving the logs stage, or more than half of the rewrites
failing, raise; every failure is counted in the stage's report first.
"""

import json
import os

import pytest

from configs import sim as sim_config
from experiments import sim_report
from experiments import simulate
from rlhi.data import client as client_lib
from rlhi.data import pipeline

import test_sim_logs


def _policy_fails_every(monkeypatch, n: int) -> None:
  """The base policy (backend 'local') is a StylePolicy failing every n-th request."""
  original = client_lib.make_client

  def make(cfg, **kwargs):
    if cfg.backend == "local":
      return test_sim_logs.StylePolicy(fail_every=n)
    return original(cfg, **kwargs)

  monkeypatch.setattr(client_lib, "make_client", make)


def _sim(tmp_path):
  sim = simulate.Sim(sim_config.get_config("quick,users=6"), str(tmp_path))
  sim.make_users()
  return sim


def test_logs_that_mostly_failed_stop_the_run(tmp_path, monkeypatch):
  sim = _sim(tmp_path)
  _policy_fails_every(monkeypatch, 2)  # half the answers, then half the follow-ups
  with pytest.raises(RuntimeError, match=r"only \d+ of 30 conversations"):
    sim.make_logs()
  with open(tmp_path / "logs" / "sim_logs_report.json") as f:
    counts = json.load(f)
  assert counts["conversations"] < 15
  assert counts["conversations"] + sum(counts["dropped"].values()) == 30


def test_rewrites_that_mostly_failed_stop_the_run(tmp_path, monkeypatch):
  sim = _sim(tmp_path)
  _policy_fails_every(monkeypatch, 0)
  sim.make_logs()
  _policy_fails_every(monkeypatch, 1)  # every rewrite fails
  with pytest.raises(pipeline.StageFailedError, match="rewrites"):
    sim.prep()
  with open(tmp_path / "data" / "rewrites_report.json") as f:
    report = json.load(f)
  assert report["pairs"] == 0 and report["actionable_targets"] > 0
  assert sum(report["rejected"].values()) == report["actionable_targets"]
  assert os.path.exists(tmp_path / "data" / "rewrites_rejects.jsonl")


def test_reward_model_rows_are_measured_on_the_same_pairs(tmp_path):
  """A pair a reward model could not score leaves every row (sim_report.rm_table), so
  that the oracle and majority rates share the reward models' denominator."""
  pairs = [{"pair_id": f"p{i}", "user_id": f"u{i % 3}", "group": group,
            "oracle": True, "majority": i % 2 == 0, "persona RM": True,
            "persona-blind RM": i % 3 == 0}
           for group in ("seen", "unseen") for i in range(6)]
  pairs[6]["persona RM"] = None  # unseen p0: majority True, not scored
  with open(tmp_path / "rm_eval.json", "w") as f:
    json.dump({"pairs": pairs}, f)
  lines, rm = sim_report.rm_table(str(tmp_path), n_boot=20)
  assert rm["pairs"] == {"seen": 6, "unseen": 5}
  assert rm["accuracy"]["majority/unseen"][0] == pytest.approx(2 / 5)  # p2, p4
  assert rm["accuracy"]["majority/seen"][0] == pytest.approx(3 / 6)
  assert rm["accuracy"]["persona-blind RM/unseen"][0] == pytest.approx(1 / 5)  # p3
  assert "left out: 1 pairs" in "\n".join(lines)
