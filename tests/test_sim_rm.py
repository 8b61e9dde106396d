"""The mechanism RLHI rests on, on simulated users with known preferences (slow).

Users of two preference clusters that disagree (terse code vs thorough lists) label
pairs of candidate answers (rlhi/sim/candidates.py). A persona-conditioned reward
model trained on the training users' labels must beat the same model trained without
the persona on held-out users by a clear margin, and the persona-blind model must stay
near the majority-preference rate: without the persona, one verdict per pair is the
best there is. The tiny model at half width and depth: ~2.5 minutes per model on 2 CPU
cores (configs/sim.py trains its reward models the same way).
"""

import json
import os

import numpy as np
import pytest

from configs import reward_model
from rlhi.data import files
from rlhi.data import schema
from rlhi.data import wildchat
from rlhi.sim import candidates
from rlhi.sim import logs
from rlhi.sim import users as users_lib

pytestmark = pytest.mark.slow

STEPS = int(os.environ.get("SIM_RM_STEPS", 150))
LR = float(os.environ.get("SIM_RM_LR", 5e-4))
OVERRIDES = os.environ.get(
    "SIM_RM_OVERRIDES", "num_layers=2,hidden_size=128,intermediate_size=384,"
    "num_heads=2,num_kv_heads=1,head_dim=64")


def _train(data_dir: str, workdir: str, no_persona: bool) -> dict:
  from rlhi.train import reward  # pylint: disable=g-import-not-at-top
  cfg = reward_model.get_config(f"tiny,steps={STEPS}" + (",no_persona" if no_persona
                                                           else ""))
  cfg.data.dir = data_dir
  # Half the tiny model's width and depth: the same mechanism, 4x less compute.
  cfg.model.overrides = OVERRIDES
  cfg.optimizer.lr = LR
  cfg.data.max_length, cfg.data.max_response_length = 512, 384
  cfg.data.bucket_lengths = (512,)
  cfg.eval_splits = ("test",)
  cfg.eval_every = 0
  cfg.log_every = STEPS
  cfg.checkpoint.every = STEPS
  cfg.checkpoint.use_async = False
  reward.run(cfg, workdir)
  with open(os.path.join(workdir, "eval_report.json"), encoding="utf-8") as f:
    return json.load(f)  # the held-out evaluation at the end


def test_persona_reward_model_beats_persona_blind_on_held_out_users(tmp_path):
  # Many users, few pairs each: the model must read the persona card (varied
  # phrasings), not remember its training users.
  users = users_lib.make_users(60, seed=0, clusters=("terse_engineer",
                                                     "thorough_learner"))
  icfg = wildchat.IngestConfig.from_config(dict(split_fractions=dict(
      train=0.6, val=0.1, test=0.3)))
  pairs = candidates.labelled_pairs(
      users, logs.load_prompts(), lambda u: wildchat.split_of(u, icfg),
      candidates.PairConfig(prompts_per_user=6, pairs_per_prompt=2,
                            heldout_prompts_per_user=0, max_answer_words=80))
  data = tmp_path / "rm_data"
  os.makedirs(data)
  for split in schema.SPLITS:
    schema.write_jsonl(data / files.PAIRS.format(split=split),
                       [lp.pair for lp in pairs if lp.pair.split == split])
  test = [lp for lp in pairs if lp.pair.split == "test"]
  train_users = [u for u in users if wildchat.split_of(u.user_id, icfg) == "train"]
  majority = float(np.mean(candidates.majority_labels(
      [lp.pair for lp in test], train_users)))
  assert len(test) >= 100 and 0.5 <= majority < 0.8

  persona = _train(str(data), str(tmp_path / "persona"), no_persona=False)
  blind = _train(str(data), str(tmp_path / "blind"), no_persona=True)
  acc_persona = persona["test_persona/accuracy"]
  acc_blind = blind["test_no_persona/accuracy"]
  print(f"held-out users: persona RM {acc_persona:.3f}, persona-blind RM "
        f"{acc_blind:.3f}, majority {majority:.3f} ({len(test)} pairs)")
  # Measured here: persona 0.685, persona-blind 0.571, majority 0.571 (252 pairs).
  assert acc_persona >= acc_blind + 0.08
  assert abs(acc_blind - majority) <= 0.08
