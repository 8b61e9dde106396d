r"""Simulated users with known preferences: every RLHI variant measured against truth.

  python -m experiments.simulate --config configs/sim.py --workdir /tmp/rlhi_sim
  python -m experiments.simulate --config configs/sim.py:quick --workdir /tmp/rlhi_simq

Stages (configs/sim.py; docs/sim.md), each resumable: a stage that finished left
`<workdir>/done/<stage>.json` and is skipped when the command is run again with the
same config (a different config is refused: use another --workdir; only
`systems` and `n_boot` may change, e.g. to add a system to a finished run); a trainer
resumes from its last checkpoint.

  users     simulated users (rlhi/sim/users.py)                  data/sim_users.jsonl
  base      tiny only: SFT warm start on the bundled sample       base/hf
  logs      the base policy answers the users' requests, they
            react, the policy answers the follow-ups (local
            backend, request cache)                                logs/
  prep      the pipeline on the logs: ingest, classify (the
            simulator's labels), persona (oracle card, or the
            persona stage through a model), rewrites by the policy
            from the feedback; and rewrites from scratch           data/, data_scratch/
  pairs     users label pairs of candidate answers                 rm_data/
  reward, reward_blind   reward models with / without persona      reward*/
  sft, dpo, dpo_no_persona, dpo_scratch   on the rewrite pairs     sft/, dpo*/
  ubr, ubr_agnostic   one round of User-Based Rewards from the
            base policy, persona RM vs the same RM without persona  ubr*/
  flr       the same round rewarded by the policy's likelihood of a
            positive vs a negative follow-up (no reward model)    flr/
            (the first of the three samples; the others score its
            answers: user_rewards.samples_from)
  rm_eval   both reward models on held-out pairs vs ground truth   rm_eval.json
  eval      UserEval of each system vs the base policy, judged by
            the users' true rewards (judge=ground_truth), in this
            process (one load of the sampler's compiled code)      eval_<system>/
  report    sim_report.md, sim_rm.png, sim_policies.png

Only evaluation labels and the oracle baselines use the ground truth; rewrites are made
by a model from the users' written feedback.
"""

import json
import os
import shutil
import sys
import time
from typing import Any

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from experiments import sim_report
from experiments import stages
from rlhi import cli
from rlhi import local_backend  # pylint: disable=unused-import (backend='local')
from rlhi import reports
from rlhi import workdir_lock
from rlhi.data import files
from rlhi.data import pipeline
from rlhi.data import schema
from rlhi.data import wildchat
from rlhi.sim import candidates
from rlhi.sim import logs as logs_lib
from rlhi.sim import users as users_lib

SYSTEMS = {
    # name: (label, checkpoint stage or 'base', persona-guided inference)
    "base": ("base", "base", False),
    "base_persona": ("base + persona", "base", True),
    "sft": ("SFT on rewrites + persona", "sft", True),
    "dpo": ("DPO on rewrites, persona", "dpo", True),
    "dpo_no_persona": ("DPO on rewrites, no persona", "dpo_no_persona", False),
    "dpo_scratch": ("DPO on rewrites from scratch, persona", "dpo_scratch", True),
    "ubr": ("User-Based Rewards, persona RM", "ubr", True),
    "ubr_agnostic": ("User-Based Rewards, RM without persona", "ubr_agnostic", True),
    "flr": ("follow-up likelihood rewards (FLR)", "flr", True),
}


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/sim.py, with its variant (e.g. configs/sim.py:quick).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage's outputs.")
flags.mark_flags_as_required(["config", "workdir"])


class Sim:
  """One simulation's work directory and config; a method per stage."""

  def __init__(self, cfg, work: str):
    self.cfg, self.work = cfg, work
    self.d = lambda *p: os.path.join(work, *p)
    self.seconds: dict[str, float] = {}

  # ---- bookkeeping -----------------------------------------------------------------

  def stage(self, name: str, fn) -> None:
    marker = self.d("done", f"{name}.json")
    if os.path.exists(marker):
      with open(marker, encoding="utf-8") as f:
        self.seconds[name] = json.load(f)["seconds"]
      sys.stdout.write(f"== {name}: done earlier, skipped\n")
      return
    t0 = time.perf_counter()
    fn()
    self.seconds[name] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    reports.write_json(marker, {"seconds": self.seconds[name]})

  @property
  def base(self) -> str:
    return self.d("base", "hf") if self.cfg.model == "tiny" else self.cfg.model

  def ingest_config(self) -> wildchat.IngestConfig:
    """The ingest stage's own settings (its user splits: the order of the fractions
    matters)."""
    return wildchat.IngestConfig.from_config({
        k: v for k, v in self.data_config().ingest.items()
        if k not in ("source", "hf_split", "streaming")})

  def users(self) -> list[users_lib.SimUser]:
    return list(users_lib.load_users(self.d("data", "sim_users.jsonl")).values())

  def policy_client(self, which) -> Any:
    """The client config `which` (config.policy_client or persona_client), or, where
    its backend is '', the base policy through the local backend."""
    cfg = ml_collections.ConfigDict(dict(which))
    if not cfg.backend:
      cfg.backend, cfg.checkpoint = "local", self.base
      cfg.local_batch_size = self.cfg.local_batch_size
    return cfg

  # ---- stages ----------------------------------------------------------------------

  def make_users(self) -> None:
    u = self.cfg.users
    users = users_lib.make_users(u.n, self.cfg.seed, clusters=tuple(u.clusters),
                                 spread=u.spread, noise=u.noise, tolerance=u.tolerance)
    os.makedirs(self.d("data"), exist_ok=True)
    users_lib.save_users(self.d("data", "sim_users.jsonl"), users)

  def make_base(self) -> None:
    """tiny: a warm start on the bundled sample's conversations (a random model's
    answers are noise even for a simulator)."""
    from configs import data_prep  # pylint: disable=g-import-not-at-top
    sample = self.d("base", "sample_data")
    for stage in pipeline.STAGES:  # the reference annotations: seconds, no model
      pipeline.run_stage(stage, data_prep.get_config("sample"), sample)
    self.train("base", "experiments.train_sft", "configs/sft.py:tiny", sample,
               self.cfg.steps.base)

  def make_logs(self) -> None:
    prompts = self.prompts()
    cfg = logs_lib.LogConfig.from_config({**self.cfg.logs.to_dict(),
                                          "seed": self.cfg.seed})
    os.makedirs(self.d("logs"), exist_ok=True)
    with pipeline.make_client(self.policy_client(self.cfg.policy_client),
                              self.d("logs")) as client:
      result = logs_lib.simulate(self.users(), prompts, client, cfg)
    logs_lib.write(self.d("logs"), result)
    if result.counts["conversations"] < 0.5 * result.counts["conversations_asked"]:
      raise RuntimeError(f"sim logs: only {result.counts['conversations']} of "
                         f"{result.counts['conversations_asked']} conversations; see "
                         f"{self.d('logs', 'sim_logs_report.md')}")

  def prompts(self) -> list[logs_lib.Prompt]:
    p = self.cfg.prompts
    return logs_lib.load_prompts(p.source or wildchat.SAMPLE_ROWS, tuple(p.languages),
                                 p.max_chars)

  def data_config(self, client_cfg=None, mode: str = "feedback"):
    from configs import data_prep  # pylint: disable=g-import-not-at-top
    cfg = data_prep.get_config()
    cfg.ingest.source = self.d("logs", logs_lib.ROWS)
    cfg.ingest.split_fractions = dict(self.cfg.ingest.split_fractions)
    cfg.ingest.split_salt = self.cfg.ingest.split_salt
    cfg.ingest.num_targets = self.cfg.ingest.num_targets
    cfg.client.backend = "reference"
    cfg.client.reference_path = self.d("logs", logs_lib.ANNOTATIONS)
    if client_cfg is not None:
      cfg.client = client_cfg
    cfg.rewrites.mode = mode
    cfg.rewrites.max_tokens = self.cfg.rewrite_tokens
    # A small model's rewrites quote the feedback or fail the quality filter more
    # often than a large one's: those are set aside and counted; more than half
    # failing stops the run (pipeline.StageFailedError).
    cfg.max_failure_fraction = 0.5
    return cfg

  def prep(self) -> None:
    data = self.d("data")
    reference = self.data_config()
    pipeline.run_stage("ingest", reference, data)
    pipeline.run_stage("classify", reference, data)
    if self.cfg.persona == "oracle":
      pipeline.run_stage("persona", reference, data)
    else:
      pipeline.run_stage("persona", self.data_config(
          self.policy_client(self.cfg.persona_client)), data)
    rewriter = self.policy_client(self.cfg.policy_client)
    pipeline.run_stage("rewrites", self.data_config(rewriter), data)
    scratch = self.d("data_scratch")
    os.makedirs(scratch, exist_ok=True)
    for name in (files.CONVERSATIONS, files.USERS, files.SPLITS, files.FOLLOW_UPS,
                 files.PERSONAS, files.LLM_CACHE):
      shutil.copyfile(os.path.join(data, name), os.path.join(scratch, name))
    pipeline.run_stage("rewrites", self.data_config(rewriter, mode="scratch"), scratch)

  def make_pairs(self) -> None:
    icfg = self.ingest_config()
    pcfg = candidates.PairConfig.from_config({**self.cfg.pairs.to_dict(),
                                              "seed": self.cfg.seed})
    labelled = candidates.labelled_pairs(self.users(), self.prompts(),
                                         lambda u: wildchat.split_of(u, icfg), pcfg)
    out = self.d("rm_data")
    os.makedirs(out, exist_ok=True)
    for split in schema.SPLITS:
      schema.write_jsonl(os.path.join(out, files.PAIRS.format(split=split)),
                         [lp.pair for lp in labelled if lp.pair.split == split])
    with open(os.path.join(out, "sim_pairs.jsonl"), "w", encoding="utf-8") as f:
      for lp in labelled:
        f.write(json.dumps({"pair_id": lp.pair.pair_id, "group": lp.group,
                            "reward_chosen": lp.reward_chosen,
                            "reward_rejected": lp.reward_rejected}) + "\n")

  def train(self, name: str, module: str, config: str, data_dir: str, steps: int,
            *extra: str, reward: bool = False) -> None:
    l = self.cfg.reward_lengths if reward else self.cfg.lengths
    batch = self.cfg.reward_batch_size if reward else self.cfg.batch_size
    stages.run(name, [
        sys.executable, "-m", module, f"--config={config},steps={steps}",
        f"--workdir={self.d(name)}", f"--config.data.dir={data_dir}",
        f"--config.log_every={max(1, steps // 10)}", "--config.eval_every=0",
        f"--config.checkpoint.every={steps}", f"--config.batch_size={batch}",
        f"--config.data.max_length={l.max_length}",
        f"--config.data.max_response_length={l.max_response_length}",
        f"--config.data.bucket_lengths={tuple(l.bucket_lengths)!r}", *extra])

  def start(self) -> list[str]:
    return [] if self.cfg.model != "tiny" else [f"--config.model.init={self.base}"]

  def train_all(self) -> None:
    m, s = self.cfg.model, self.cfg.steps
    no_eval = "--config.eval_splits=()"
    # The reward models start from their size's default (random for tiny, the released
    # weights for smollm2), resized by config.reward_overrides.
    rm_flags = [f"--config.model.overrides={self.cfg.reward_overrides}",
                f"--config.optimizer.lr={self.cfg.reward_lr}",
                "--config.eval_splits=('test',)"]
    for name, persona in (("reward", ""), ("reward_blind", ",no_persona")):
      self.stage(name, lambda name=name, persona=persona: self.train(
          name, "experiments.train_reward",
          f"configs/reward_model.py:{self.cfg.reward_size}{persona}", self.d("rm_data"),
          s.reward, *rm_flags, reward=True))
    self.stage("sft", lambda: self.train(
        "sft", "experiments.train_sft", f"configs/sft.py:{m},rewrites", self.d("data"),
        s.sft, *self.start()))
    for name, data, persona in (("dpo", "data", True), ("dpo_no_persona", "data", False),
                                ("dpo_scratch", "data_scratch", True)):
      self.stage(name, lambda name=name, data=data, persona=persona: self.train(
          name, "experiments.train_dpo", f"configs/dpo.py:rewrites,{m}", self.d(data),
          s.dpo, *self.start(), no_eval, f"--config.data.with_persona={persona}",
          "--config.reference.mode=live"))
    o = self.cfg.online
    rm = f"--config.user_rewards.reward_model={self.d('reward', 'reward_model')}"
    # The three rounds start from the same policy with the same prompts and seed: the
    # first to run samples, the others score its answers (user_rewards.samples_from).
    sampled = ""
    for name, persona, reward in (("ubr", True, rm), ("ubr_agnostic", False, rm),
                                  ("flr", True, "--config.user_rewards.reward="
                                                "follow_up")):
      if name not in self.cfg.systems:
        continue
      self.stage(name, lambda name=name, persona=persona, reward=reward,
                 sampled=sampled: self.train(
          name, "experiments.user_rewards", f"configs/dpo.py:user_rewards,{m},rounds=1",
          self.d("data"), s.online, *self.start(), no_eval, reward,
          # The policy sees the persona in all three; only the rewards differ.
          f"--config.user_rewards.samples_from={sampled}",
          f"--config.user_rewards.with_persona={persona}",
          f"--config.user_rewards.prompts_per_round={o.prompts_per_round}",
          f"--config.user_rewards.num_samples={o.samples}",
          f"--config.user_rewards.max_new_tokens={o.new_tokens}",
          "--config.user_rewards.margin_threshold=0.0",
          "--config.reference.mode=live"))
      sampled = sampled or self.d(name)

  def checkpoint(self, stage: str) -> str:
    if stage == "base":
      return self.base
    if stage in ("ubr", "ubr_agnostic", "flr"):
      with open(self.d(stage, "round_00", "round.json"), encoding="utf-8") as f:
        return json.load(f)["policy_after"]
    return self.d(stage, "hf")

  def rm_eval(self) -> None:
    """Both reward models on the held-out labelled pairs (seen users' held-out
    requests, unseen users), against the users' labels; the oracle and the majority
    preference on the same pairs."""
    from rlhi.models import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
    groups = {}
    with open(self.d("rm_data", "sim_pairs.jsonl"), encoding="utf-8") as f:
      for line in f:
        r = json.loads(line)
        groups[r["pair_id"]] = r
    pairs = [p for split in ("val", "test") for p in schema.read_jsonl(
        self.d("rm_data", files.PAIRS.format(split=split)), schema.PreferencePair)]
    users = self.users()
    icfg = self.ingest_config()
    train_users = [u for u in users if wildchat.split_of(u.user_id, icfg) == "train"]
    by_id = {u.user_id: u for u in users}
    out = {"pairs": []}
    rows = [scorer_lib.Row(p.prompt, p.persona, (p.chosen, p.rejected)) for p in pairs]
    scores = {}
    l = self.cfg.reward_lengths
    for name, path, persona in (
        ("persona RM", self.d("reward", "reward_model"), True),
        ("persona-blind RM", self.d("reward_blind", "reward_model"), False)):
      sc = scorer_lib.Scorer(path, with_persona=persona,
                             batch_size=self.cfg.reward_batch_size,
                             max_length=l.max_length,
                             max_response_length=l.max_response_length,
                             bucket_lengths=tuple(l.bucket_lengths))
      scores[name] = sc.score(rows)
    majority = candidates.majority_labels(pairs, train_users)
    for p, maj, *s in zip(pairs, majority, *scores.values()):
      u = by_id[p.user_id]
      rec = {"pair_id": p.pair_id, "user_id": p.user_id,
             "group": groups[p.pair_id]["group"],
             "oracle": u.reward(p.chosen) >= u.reward(p.rejected),
             "majority": bool(maj)}
      for name, v in zip(scores, s):
        rec[name] = None if isinstance(v, str) else bool(v[0] > v[1])
      out["pairs"].append(rec)
    reports.write_json(self.d("rm_eval.json"), out)

  def evaluate(self) -> None:
    """UserEval of each system vs the base policy, in this process: each run loads one
    checkpoint (the base policy's answers are generated once and reused) and reuses the
    compiled sampler of the run before it."""
    done: list[str] = []
    for system in self.cfg.systems:
      workdir = self.d(f"eval_{system}")
      self.stage(f"eval_{system}", lambda system=system, workdir=workdir,
                 done=tuple(done): self.usereval(system, workdir, done))
      done.append(workdir)

  def usereval(self, system: str, workdir: str, reuse: tuple[str, ...]) -> None:
    from rlhi.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    e, l = self.cfg.eval, self.cfg.lengths
    label, stage, persona = SYSTEMS[system]
    b_label, b_stage, b_persona = SYSTEMS["base"]
    stages.run_in_process(
        f"eval {system}", "experiments.evaluate",
        f"configs/eval.py:judge=ground_truth,a=checkpoint,max_items={e.max_items}", {
            "data.dir": self.d("data"),
            "judge.ground_truth.users": self.d("data", "sim_users.jsonl"),
            "systems.a.path": self.checkpoint(b_stage),
            "systems.b.path": self.checkpoint(stage),
            "systems.a.with_persona": b_persona, "systems.b.with_persona": persona,
            "systems.a.name": b_label, "systems.b.name": label,
            "generation.max_new_tokens": e.new_tokens,
            "generation.batch_size": e.batch_size,
            "generation.temperature": e.temperature, "generation.top_p": 0.9,
            "n_boot": self.cfg.n_boot, "reuse_answers_from": reuse,
            "generation.max_prompt_tokens": l.max_length},
        workdir, evaluate_lib.run)

  def judge_agreement(self) -> None:
    """How often the persona reward model, as UserEval's judge, picks the answer the
    ground truth picks, on every compared pair of answers of the eval runs (pairs the
    truth calls a tie are left out)."""
    from rlhi.models import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
    users = {u.user_id: u for u in self.users()}
    rows, truth = [], []
    for system in self.cfg.systems:
      run = self.d(f"eval_{system}")
      items = {it["item_id"]: it for it in sim_report.read_jsonl(os.path.join(
          run, "usereval_items.jsonl"))}
      texts: dict[str, dict[str, str]] = {}
      for g in sim_report.read_jsonl(os.path.join(run, "usereval_generations.jsonl")):
        if g.get("text") is not None:
          texts.setdefault(g["item_id"], {})[g["system"]] = g["text"]
      for item_id, t in sorted(texts.items()):
        if len(t) != 2:
          continue
        it, u = items[item_id], users[items[item_id]["user_id"]]
        ra, rb = u.reward(t["a"]), u.reward(t["b"])
        if abs(ra - rb) <= 1e-12:
          continue
        rows.append(scorer_lib.Row(
            tuple(schema.Message(role=m["role"], content=m["content"])
                  for m in it["context"]), it.get("persona"), (t["a"], t["b"])))
        truth.append(rb > ra)
    l = self.cfg.reward_lengths
    scores = scorer_lib.Scorer(
        self.d("reward", "reward_model"), with_persona=True,
        batch_size=self.cfg.reward_batch_size, max_length=l.max_length,
        max_response_length=l.max_response_length,
        bucket_lengths=tuple(l.bucket_lengths)).score(rows)
    agree = [bool((s[1] > s[0]) == t) for s, t in zip(scores, truth)
             if not isinstance(s, str)]
    reports.write_json(self.d("judge_agreement.json"), {
        "judge": "persona reward model", "agree": agree,
        "failed": sum(isinstance(s, str) for s in scores)})


REPORT_ONLY = ("systems", "n_boot")  # config fields a finished run may change


def _without(config: dict[str, Any], keys) -> dict[str, Any]:
  return {k: v for k, v in config.items() if k not in keys}


def main(argv):
  del argv
  cfg, work = _CONFIG.value, _WORKDIR.value
  with workdir_lock.hold(work, "simulate"):
    os.makedirs(work, exist_ok=True)
    config_path = os.path.join(work, "sim_config.json")
    current = json.loads(cfg.to_json())
    if os.path.exists(config_path):
      with open(config_path, encoding="utf-8") as f:
        saved = json.load(f)
      # Systems and the report's resampling may change: each system's stages are its
      # own, so systems added to a finished run are trained and evaluated on the same
      # data, and the judge's agreement is measured again over the new set.
      if _without(saved, REPORT_ONLY) != _without(current, REPORT_ONLY):
        raise ValueError(f"{work} holds a simulation with another config "
                         f"({config_path}); use another --workdir, or delete it")
      if saved["systems"] != current["systems"]:
        marker = os.path.join(work, "done", "judge_agreement.json")
        if os.path.exists(marker):
          os.remove(marker)
    if not os.path.exists(config_path) or saved != current:
      reports.write_json(config_path, current)
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
      os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
      os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # stages in-process
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(work, "jax_cache"))
    run(cfg, work)


def run(cfg, work: str) -> str:
  """All stages (skipping those done), then the report; returns its path."""
  sim = Sim(cfg, work)
  sim.stage("users", sim.make_users)
  if cfg.model == "tiny":
    sim.stage("base", sim.make_base)
  sim.stage("logs", sim.make_logs)
  sim.stage("prep", sim.prep)
  sim.stage("pairs", sim.make_pairs)
  sim.train_all()
  sim.stage("rm_eval", sim.rm_eval)
  sim.evaluate()
  sim.stage("judge_agreement", sim.judge_agreement)
  path = sim_report.write(sim, {k: v[0] for k, v in SYSTEMS.items()})
  sys.stdout.write(f"\nReport: {path}\n")
  return path


if __name__ == "__main__":
  cli.run(main)
