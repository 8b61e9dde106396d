"""experiments/simulate.py end to end on the tiny model (slow: ~8 min on 2 cores).

The quick variant, smaller still (12 users, a few steps per stage, 8 held-out items):
every stage runs, sim_report.md has every row of the table with its interval, the data
came through the pipeline without loss, and a second run of the same command skips
every stage (resumable) while another config in the same work directory is refused.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import simulate

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.users.n=12", "--config.steps.base=2", "--config.steps.reward=6",
         "--config.steps.sft=2", "--config.steps.dpo=2", "--config.steps.online=1",
         "--config.online.prompts_per_round=4", "--config.online.new_tokens=16",
         "--config.eval.max_items=8", "--config.eval.new_tokens=16",
         "--config.logs.answer_tokens=24", "--config.logs.follow_up_tokens=12",
         "--config.rewrite_tokens=24", "--config.pairs.prompts_per_user=4",
         "--config.pairs.pairs_per_prompt=2", "--config.pairs.heldout_prompts_per_user=1"]


def _simulate(work, *extra):
  env = dict(os.environ, RLHI_QUIET="1",
             JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(work), "jax_cache"))
  return subprocess.run(
      [sys.executable, "-m", "experiments.simulate", "--config=configs/sim.py:quick",
       f"--workdir={work}", *SMALL, *extra], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=1500)


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
  work = str(tmp_path_factory.mktemp("simulate") / "work")
  r = _simulate(work)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return work


def test_every_row_of_the_table_is_reported(sim_run):
  with open(os.path.join(sim_run, "sim_report.md"), encoding="utf-8") as f:
    md = f.read()
  for label, *_ in simulate.SYSTEMS.values():
    assert f"| {label} |" in md
  for row in ("persona RM", "persona-blind RM", "oracle", "majority"):
    assert f"| {row} |" in md
  assert "FLR-style baseline" in md  # what is not run is said
  with open(os.path.join(sim_run, "sim_report.json"), encoding="utf-8") as f:
    report = json.load(f)
  acc = report["rm"]["accuracy"]
  assert report["rm"]["pairs"]["unseen"] > 0 and report["rm"]["pairs"]["seen"] > 0
  # No label noise: the true weights agree with every label.
  assert acc["oracle/unseen"][0] == pytest.approx(1.0, abs=0.06)
  for system in ("base", *simulate.SYSTEMS):
    if system == "base":
      continue
    mean, lo, hi = report["policies"][system]["reward"]
    assert lo <= mean <= hi
    assert report["policies"][system]["win"]["n_items"] > 0
  for png in ("sim_rm.png", "sim_policies.png"):
    assert os.path.getsize(os.path.join(sim_run, png)) > 1000
  with open(os.path.join(sim_run, "sim_headline.md"), encoding="utf-8") as f:
    assert "persona RM" in f.read()


def test_the_logs_came_through_the_pipeline_without_loss(sim_run):
  with open(os.path.join(sim_run, "data", "ingest_report.json")) as f:
    ingest = json.load(f)
  with open(os.path.join(sim_run, "logs", "sim_logs_report.json")) as f:
    logs = json.load(f)
  assert ingest["rows_read"] == logs["conversations"] == ingest["kept"]
  assert sum(ingest["rejected"].values()) == 0
  assert logs["conversations"] + sum(logs["dropped"].values()) == logs[
      "conversations_asked"]
  for d in ("data", "data_scratch"):
    with open(os.path.join(sim_run, d, "rewrites_report.json")) as f:
      r = json.load(f)
    assert r["actionable_targets"] > 0
    assert r["pairs"] + sum(r["rejected"].values()) == r["actionable_targets"]


def test_the_online_rounds_score_one_sampling(sim_run):
  """ubr samples; ubr_agnostic and flr score its answers (user_rewards.samples_from)."""
  def round_file(name, f):
    path = os.path.join(sim_run, name, "round_00", f)
    with open(path, encoding="utf-8") as fh:
      return json.load(fh) if f.endswith(".json") else [json.loads(l) for l in fh]
  ubr = round_file("ubr", "prompts_and_candidates.jsonl")
  assert round_file("ubr", "sampling.json")["samples"]["from"] is None
  for name in ("ubr_agnostic", "flr"):
    assert round_file(name, "sampling.json")["samples"]["from"] == os.path.join(
        sim_run, "ubr", "round_00")
    got = round_file(name, "prompts_and_candidates.jsonl")
    assert [r["candidates"] for r in got] == [r["candidates"] for r in ubr]
    assert [r["scores"] for r in got] != [r["scores"] for r in ubr]


def test_rerun_resumes_and_another_config_is_refused(sim_run):
  r = _simulate(sim_run)
  assert r.returncode == 0, r.stderr[-3000:]
  for stage in ("users", "base", "logs", "prep", "pairs", "reward", "dpo", "ubr",
                "flr", "rm_eval", "eval_dpo", "eval_flr"):
    assert f"== {stage}: done earlier, skipped" in r.stdout
  # Systems may change in a finished run: here fewer, and the judge's agreement is
  # measured again over them.
  r = _simulate(sim_run, "--config.systems=('dpo', 'flr')")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "== eval_dpo: done earlier, skipped" in r.stdout
  assert "== judge_agreement: done earlier" not in r.stdout
  r = _simulate(sim_run, "--config.users.n=13")
  assert r.returncode != 0
  assert "another config" in r.stderr
