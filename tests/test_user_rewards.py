"""User-Based Rewards: one online round on a small model, and resuming a round.

A random policy and a random reward model (its head made non-zero so that answers get
different scores) on the bundled sample: the round must produce pairs whose chosen score
beats the rejected one by more than the threshold, change the policy, and give the same
result when interrupted in the middle of its DPO steps and resumed.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from configs import dpo as dpo_config
from rlhi.data import files
from rlhi.data import schema
from rlhi.models import builder
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.models import reward
from rlhi.models import reward_io
from rlhi.models import tokenizer as tok_lib
from rlhi.train import checkpoint as ckpt_lib
from rlhi.train import user_rewards

import test_training as tt


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("ubr")
  data = data_dir
  config = llama.get_config("tiny", **builder.parse_overrides(tt.SMALL))
  tok = tok_lib.load_tokenizer("bundled")
  policy = str(root / "policy")
  hf_io.save_checkpoint(llama.init_params(config, jax.random.PRNGKey(0)), config, policy)
  tok.save_pretrained(policy)
  rm_params = reward.init_params(config, jax.random.PRNGKey(1))
  rm_params["score"]["kernel"] = jax.random.normal(
      jax.random.PRNGKey(2), rm_params["score"]["kernel"].shape) * 2.0
  rm = str(root / "rm")
  reward_io.save(rm_params, config, rm, tokenizer=tok)
  return data, policy, rm


def _config(data, policy, rm, steps=4):
  cfg = dpo_config.get_config(f"user_rewards,rounds=1,steps={steps}")
  cfg.data.dir = data
  cfg.model.init = policy
  cfg.model.overrides = tt.SMALL
  cfg.data.max_length = 512
  cfg.data.max_response_length = 256
  cfg.data.bucket_lengths = (512,)
  cfg.batch_size = 4
  cfg.mesh = dict(data=1, fsdp=-1, tensor=1)
  cfg.checkpoint.every = 2
  cfg.log_every = 1
  cfg.optimizer.lr = 1e-3
  cfg.eval_splits = ("val",)
  cfg.user_rewards.reward_model = rm
  cfg.user_rewards.prompts_per_round = 8
  cfg.user_rewards.max_new_tokens = 16
  cfg.user_rewards.generation_batch_size = 16
  return cfg


def _hf_params(path):
  return safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.slow  # 20-90 s on 2 cores; CI runs it
def test_one_round_makes_margin_pairs_and_changes_the_policy(setup, tmp_path):
  data, policy, rm = setup
  cfg = _config(data, policy, rm)
  work = str(tmp_path / "run")
  (stats,) = user_rewards.run(cfg, work)
  threshold = cfg.user_rewards.margin_threshold
  assert stats["prompts"] == 8 and stats["candidates"] == 32
  assert stats["pairs"] >= 2
  with open(os.path.join(work, "round_00", "prompts_and_candidates.jsonl")) as f:
    records = [json.loads(line) for line in f]
  pairs = schema.read_jsonl(os.path.join(work, "round_00", "pairs.train.jsonl"),
                            schema.PreferencePair)
  assert len(pairs) == stats["pairs"]
  kept = [r for r in records if "pair" in r]
  assert len(kept) == len(pairs)
  for r, p in zip(kept, pairs):
    assert r["pair"]["chosen"] - r["pair"]["rejected"] > threshold
    assert r["pair"]["chosen"] == max(r["scores"]) and r["pair"]["rejected"] == min(
        r["scores"])
    assert p.chosen == r["candidates"][r["scores"].index(max(r["scores"]))]
    assert p.user_id in {u.user_id for u in schema.read_jsonl(
        os.path.join(data, files.USERS), schema.User) if u.split == "train"}
  before, after = _hf_params(policy), _hf_params(stats["policy_after"])
  assert any(not np.array_equal(before[k], after[k]) for k in before)
  assert os.path.exists(os.path.join(work, "user_rewards_report.md"))
  assert stats["dpo"]["train/loss"] > 0
  # A second run finds the round done and does nothing new.
  (again,) = user_rewards.run(cfg, work)
  assert again == json.loads(json.dumps(stats))


class _PreemptAfter(ckpt_lib.SigtermFlag):
  """Reports a preemption request at the loop's 3rd check (after step 3 of 4)."""
  checks = 0

  @property
  def requested(self):
    type(self).checks += 1
    return type(self).checks >= 3


@pytest.mark.slow
def test_a_resumed_round_equals_an_uninterrupted_one(setup, tmp_path, monkeypatch):
  data, policy, rm = setup
  cfg = _config(data, policy, rm)
  whole = str(tmp_path / "whole")
  (want,) = user_rewards.run(cfg, whole)

  work = str(tmp_path / "resumed")
  with monkeypatch.context() as m:
    m.setattr(ckpt_lib, "SigtermFlag", _PreemptAfter)
    assert user_rewards.run(cfg, work) == []  # preempted inside the round's DPO
  assert not os.path.exists(os.path.join(work, "round_00", "round.json"))
  saved = os.listdir(os.path.join(work, "round_00", "dpo", "checkpoints"))
  assert "3" in saved and "4" not in saved
  (got,) = user_rewards.run(cfg, work)
  assert got["pairs"] == want["pairs"]
  a, b = _hf_params(want["policy_after"]), _hf_params(got["policy_after"])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _round_cmd(data, policy, rm, workdir):
  """experiments/user_rewards.py with _config's settings, as flags (2 DPO steps)."""
  return [sys.executable, "-m", "experiments.user_rewards",
          "--config=configs/dpo.py:user_rewards,rounds=1,steps=2",
          f"--workdir={workdir}", f"--config.data.dir={data}",
          f"--config.model.init={policy}", f"--config.model.overrides={tt.SMALL}",
          "--config.data.max_length=512", "--config.data.max_response_length=256",
          "--config.data.bucket_lengths=(512,)", "--config.batch_size=4",
          "--config.checkpoint.every=2", "--config.log_every=1",
          "--config.optimizer.lr=1e-3", "--config.eval_splits=('val',)",
          f"--config.user_rewards.reward_model={rm}",
          "--config.user_rewards.prompts_per_round=8",
          "--config.user_rewards.max_new_tokens=16",
          "--config.user_rewards.generation_batch_size=16"]


def _records(workdir):
  with open(os.path.join(workdir, "round_00", "prompts_and_candidates.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_sample_score_and_train_as_one(setup, tmp_path):
  """The round as the TPU launch runs it, on 2 processes x 1 device (jax.distributed
  on 127.0.0.1), against 1 process x 2 devices: the same candidates, scores, pairs and
  updated policy; process 1 writes nothing of its own."""
  data, policy, rm = setup
  one = str(tmp_path / "one")
  subprocess.run(_round_cmd(data, policy, rm, one), cwd=tt.REPO, env=tt._env(2),
                 check=True, capture_output=True)
  two = str(tmp_path / "two")
  tt.run_on_two_processes(_round_cmd(data, policy, rm, two), timeout=420)
  r1, r2 = _records(one), _records(two)
  assert len(r1) == len(r2) == 8  # written once, by process 0
  for a, b in zip(r1, r2):
    assert a["candidates"] == b["candidates"]
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-5)
  s1, s2 = (json.load(open(os.path.join(w, "round_00", "round.json")))
            for w in (one, two))
  assert s1["pairs"] == s2["pairs"] >= 1
  a, b = _hf_params(s1["policy_after"]), _hf_params(s2["policy_after"])
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow  # ~30-60 s on 2 cores (three samplings of 32 answers)
def test_rounds_share_samples_only_when_they_sampled_alike(setup, tmp_path,
                                                           monkeypatch):
  """samples_from: a user-agnostic round scores the persona round's answers without
  sampling; those are the answers it would have sampled itself; a round with another
  temperature samples anew and says why."""
  data, policy, rm = setup
  cfg = _config(data, policy, rm)
  first = str(tmp_path / "persona" / "round_00")
  stats = user_rewards.sample_and_score(cfg, 0, policy, first)
  assert stats["samples"] == {"from": None, "why_not": None}

  agnostic = _config(data, policy, rm)
  agnostic.user_rewards.with_persona = False
  agnostic.user_rewards.samples_from = str(tmp_path / "persona")
  with monkeypatch.context() as m:
    m.setattr(user_rewards.ChatGenerator, "generate",
              lambda *a, **k: pytest.fail("sampled although the samples were shared"))
    shared = user_rewards.sample_and_score(agnostic, 0, policy,
                                           str(tmp_path / "agnostic" / "round_00"))
  assert shared["samples"]["from"] == first
  a, b = (_records(str(tmp_path / w)) for w in ("persona", "agnostic"))
  assert [r["candidates"] for r in a] == [r["candidates"] for r in b]
  assert [r["scores"] for r in a] != [r["scores"] for r in b]  # the RM without persona
  assert {k: shared[k] for k in ("prompts", "candidates", "completion_tokens",
                                 "finished_fraction")} == {
      k: stats[k] for k in ("prompts", "candidates", "completion_tokens",
                            "finished_fraction")}

  alone = user_rewards.sample_and_score(_config(data, policy, rm), 0, policy,
                                        str(tmp_path / "alone" / "round_00"))
  assert alone["sampling_key"] == stats["sampling_key"]
  assert ([r["candidates"] for r in _records(str(tmp_path / "alone"))]
          == [r["candidates"] for r in a])  # what sharing assumes

  hotter = _config(data, policy, rm)
  hotter.user_rewards.temperature = 1.0
  hotter.user_rewards.samples_from = str(tmp_path / "persona")
  anew = user_rewards.sample_and_score(hotter, 0, policy,
                                       str(tmp_path / "hotter" / "round_00"))
  assert anew["samples"]["from"] is None
  assert "['temperature']" in anew["samples"]["why_not"]
