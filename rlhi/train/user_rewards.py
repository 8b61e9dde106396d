"""User-Based Rewards: online, iterative DPO with a persona-conditioned reward model.

Each round (configs/dpo.py:user_rewards, section `user_rewards`):

  1. prompts: `prompts_per_round` user turns of training users (persona + context),
     drawn afresh each round (seeded by (seed, round));
  2. sample `num_samples` answers per prompt from the current policy (temperature,
     top-p from the config), persona in the system slot when data.with_persona; or
     take them from another run that sampled the same way (`samples_from`: ablations
     that differ only in the reward score the same answers, sampled once);
  3. score every answer with the reward model (rlhi.models.scorer), which sees the
     persona (with_persona=False: the user-agnostic baseline); or, with
     reward='follow_up', by the policy's own likelihood of a positive vs a negative
     user follow-up after the answer (rlhi/train/follow_up.py: the FLR baseline, no
     reward model);
  4. best vs worst answer as a pair when their score gap exceeds `margin_threshold`;
  5. DPO (rlhi/train/dpo.py) on those pairs for `total_steps` steps from the current
     policy; the reference is the initial policy or the previous round's
     (`reference`), its log-probs computed once per round for the new pairs.

Work directory: round_<r>/{prompts_and_candidates.jsonl, pairs.train.jsonl,
sampling.json, dpo/ (checkpoints, metrics, hf/), round.json} and
user_rewards_report.{md,json}. A round is resumable at every point: finished rounds
(round.json) are skipped, a sampled round reuses its pairs, and DPO resumes from its
checkpoints, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import tqdm

from rlhi import fileio
from rlhi import reports
from rlhi import sharding
from rlhi.data import items as items_lib
from rlhi.data import schema
from rlhi.generate import ChatGenerator
from rlhi.generate import Generation
from rlhi.models import scorer as scorer_lib
from rlhi.models import sources
from rlhi.models import tokenizer as tok_lib
from rlhi.train import dpo
from rlhi.train import follow_up

PAIRS = "pairs.{split}.jsonl"
CANDIDATES = "prompts_and_candidates.jsonl"
REWARDS = ("model", "follow_up")
# Tokens beyond data.max_length for two follow-ups after an answer (reward=follow_up).
FOLLOW_UP_ROOM = 128


def _round_dir(workdir: str, r: int) -> str:
  return os.path.join(workdir, f"round_{r:02d}")


def _read_json(path: str) -> Any:
  with fileio.open(path) as f:
    return json.load(f)


def sampling_key(cfg, r: int, policy: str) -> dict[str, Any]:
  """The settings round r's prompts and sampled answers depend on (the policy's weight
  files by name, size and modification time; the data; the sampling config): two runs
  on the same machines with the same key draw the same prompts and the same answers
  (config.user_rewards.samples_from). The mesh is left out: it can change the last
  bits of a logit, not what the answers are a sample of."""
  ur = cfg.user_rewards
  path, weights = sources.weights_stamp(policy)
  # Through JSON: tuples become lists, so the key compares equal to a recorded one.
  return json.loads(json.dumps({
      "policy": path, "weights": weights, "tokenizer": model_tokenizer(cfg, policy),
      "data_dir": sources.absolute(cfg.data.dir), "round": r, "seed": cfg.seed,
      "with_persona": cfg.data.with_persona,
      "system_template": cfg.data.system_template, "max_length": cfg.data.max_length,
      **{k: ur[k] for k in ("prompts_per_round", "num_samples", "max_new_tokens",
                            "temperature", "top_p", "generation_batch_size")}}))


def _select_prompts(cfg, r: int, fmt: tok_lib.ChatFormatter, item_set
                    ) -> tuple[list[tuple[items_lib.EvalItem, list[dict[str, str]]]], int]:
  """Round r's prompts (seeded by (seed, r)) and how many were set aside because they
  leave no room for an answer within data.max_length."""
  ur = cfg.user_rewards
  order = np.random.default_rng([cfg.seed, r]).permutation(len(item_set.items))
  prompts, too_long = [], 0
  for i in order:
    item = item_set.items[i]
    persona = item.persona if cfg.data.with_persona else None
    messages = fmt.messages(item.chat(), persona=persona)
    if len(fmt.encode(messages).prompt_ids) + ur.max_new_tokens > cfg.data.max_length:
      too_long += 1
      continue
    prompts.append((item, messages))
    if len(prompts) == ur.prompts_per_round:
      break
  return prompts, too_long


def _shared_samples(source: str, r: int, key: dict[str, Any], item_ids: list[str]
                    ) -> tuple[list[Generation] | None, str]:
  """The answers another run (config.user_rewards.samples_from) sampled in round r, if
  it sampled with the same key and prompts; else (None, why not)."""
  rdir = _round_dir(source, r)
  stats_path = os.path.join(rdir, "sampling.json")
  if not fileio.exists(stats_path):
    return None, f"{stats_path} does not exist (that round has not sampled yet)"
  theirs = _read_json(stats_path).get("sampling_key")
  if theirs != key:
    differ = sorted(k for k in set(key) | set(theirs or {})
                    if (theirs or {}).get(k) != key.get(k))
    return None, f"{stats_path} sampled with other settings: {differ}"
  with fileio.open(os.path.join(rdir, CANDIDATES)) as f:
    records = [json.loads(line) for line in f]
  if [rec["item_id"] for rec in records] != item_ids:
    return None, f"{os.path.join(rdir, CANDIDATES)} holds other prompts"
  fields = ("candidates", "prompt_tokens", "completion_tokens", "finished")
  if any(len(rec.get(f, ())) != key["num_samples"] for rec in records for f in fields):
    return None, f"{os.path.join(rdir, CANDIDATES)} lacks some of {fields}"
  return [Generation(text=t, prompt_tokens=p, completion_tokens=c, finished=d)
          for rec in records for t, p, c, d in zip(*(rec[f] for f in fields))], ""


def sample_and_score(cfg, r: int, policy: str, rdir: str) -> dict[str, Any]:
  """Steps 1-4 of a round: writes the round's pairs; returns its statistics."""
  ur = cfg.user_rewards
  item_set = items_lib.load_items(cfg.data.dir, split="train", require_persona=False)
  t0 = time.perf_counter()
  key = sampling_key(cfg, r, policy)
  fmt = tok_lib.ChatFormatter(tok_lib.load_tokenizer(model_tokenizer(cfg, policy)),
                              cfg.data.system_template)
  prompts, too_long = _select_prompts(cfg, r, fmt, item_set)
  n = ur.num_samples
  outs, why_not = None, None
  if ur.samples_from:
    outs, why_not = _shared_samples(ur.samples_from, r, key,
                                    [item.item_id for item, _ in prompts])
    # Sampling is a collective: every process reuses, or every one samples.
    if not sharding.on_all_processes(outs is not None) and outs is not None:
      outs, why_not = None, "another process could not reuse them"
    if outs is None:
      logging.warning("user rewards round %d: sampling anew: %s", r, why_not)
  gen = None
  if outs is None or ur.reward == "follow_up":  # FLR scores with the policy itself
    gen = ChatGenerator(policy, model_tokenizer(cfg, policy),
                        batch_size=ur.generation_batch_size, mesh_axes=dict(cfg.mesh),
                        system_template=cfg.data.system_template)
  if outs is None:
    with tqdm.tqdm(total=len(prompts) * n, desc=f"round {r}: samples", unit="answer",
                   disable=not sharding.is_main_process()) as bar:
      outs = gen.generate([m for _, m in prompts for _ in range(n)],
                          max_new_tokens=ur.max_new_tokens, temperature=ur.temperature,
                          top_p=ur.top_p, seed=cfg.seed * 1_000 + r, progress=bar)
    samples = {"from": None, "why_not": why_not}
  else:
    samples = {"from": _round_dir(sources.absolute(ur.samples_from), r),
               "why_not": None}
  t1 = time.perf_counter()
  if ur.reward == "follow_up":  # the policy itself scores: no second model
    scorer = follow_up.FollowUpScorer.from_generator(
        gen, positive=tuple(ur.follow_ups.positive),
        negative=tuple(ur.follow_ups.negative), with_persona=ur.with_persona,
        batch_size=cfg.batch_size, max_length=cfg.data.max_length + FOLLOW_UP_ROOM,
        bucket_lengths=cfg.data.bucket_lengths, settings="config.data")
  else:
    gen = None  # free the policy before the reward model loads
    scorer = scorer_lib.Scorer(
        ur.reward_model, tokenizer=model_tokenizer(cfg, ur.reward_model),
        with_persona=ur.with_persona, batch_size=cfg.batch_size,
        max_length=cfg.data.max_length,
        max_response_length=cfg.data.max_response_length,
        bucket_lengths=cfg.data.bucket_lengths, mesh_axes=dict(cfg.mesh),
        settings="config.data")
  scores = score_candidates(scorer, [item for item, _ in prompts],
                            [o.text for o in outs], n)
  del scorer, gen
  t2 = time.perf_counter()

  pairs, records, skipped = [], [], {"below_threshold": 0, "identical": 0,
                                     "too_few_scored": 0}
  failed = sum(isinstance(s, str) for s in scores)
  for k, (item, _) in enumerate(prompts):
    group = outs[k * n:(k + 1) * n]
    texts = [o.text for o in group]
    got = scores[k * n:(k + 1) * n]
    records.append({"item_id": item.item_id, "user_id": item.user_id,
                    "candidates": texts, "scores": got,
                    # What a run reusing these samples (samples_from) needs.
                    "prompt_tokens": [o.prompt_tokens for o in group],
                    "completion_tokens": [o.completion_tokens for o in group],
                    "finished": [o.finished for o in group]})
    ok = [(s, t) for s, t in zip(got, texts) if not isinstance(s, str)]
    if len(ok) < 2:
      skipped["too_few_scored"] += 1
      continue
    (best_s, best), (worst_s, worst) = max(ok), min(ok)
    if best == worst:
      skipped["identical"] += 1
    elif best_s - worst_s <= ur.margin_threshold:
      skipped["below_threshold"] += 1
    else:
      pairs.append(schema.PreferencePair(
          pair_id=f"ubr{r}/{item.item_id}", user_id=item.user_id, split="train",
          prompt=item.context, chosen=best, rejected=worst, persona=item.persona,
          source="user_reward", conversation_hash=item.conversation_hash,
          message_index=item.message_index))
      records[-1]["pair"] = {"chosen": best_s, "rejected": worst_s}
  valid = np.array([s for s in scores if not isinstance(s, str)], np.float64)
  spreads = [max(s for s in r_["scores"] if not isinstance(s, str)) -
             min(s for s in r_["scores"] if not isinstance(s, str))
             for r_ in records if sum(not isinstance(s, str) for s in r_["scores"]) >= 2]
  gaps = [r_["pair"]["chosen"] - r_["pair"]["rejected"] for r_ in records if "pair" in r_]
  stats = {
      "round": r, "policy": policy, "reward": reward_source(cfg),
      "sampling_key": key, "samples": samples,
      "prompts": len(prompts),
      "prompts_too_long": too_long, "candidates": len(outs), "scores_failed": failed,
      "pairs": len(pairs), "skipped": skipped,
      "score_mean": float(valid.mean()) if valid.size else float("nan"),
      "score_std": float(valid.std()) if valid.size else float("nan"),
      "spread_mean": float(np.mean(spreads)) if spreads else float("nan"),
      "pair_gap_mean": float(np.mean(gaps)) if gaps else float("nan"),
      "finished_fraction": float(np.mean([o.finished for o in outs])) if outs else 0.0,
      "completion_tokens": int(sum(o.completion_tokens for o in outs)),
      # Wall time of each phase, model loading and compilation included.
      "seconds": {"sampling": t1 - t0, "scoring": t2 - t1},
  }
  if sharding.is_main_process():
    fileio.makedirs(rdir)
    with fileio.open(os.path.join(rdir, CANDIDATES), "w") as f:
      for rec in records:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    schema.write_jsonl(os.path.join(rdir, PAIRS.format(split="train")), pairs)
    reports.write_json(os.path.join(rdir, "sampling.json"), stats)
  return stats


def score_candidates(scorer: scorer_lib.Scorer, prompts: list[items_lib.EvalItem],
                     texts: list[str], n: int) -> list[float | str]:
  """The reward model's score of each of the n answers to each prompt (or why not).

  Scored two at a time (scorer rows of two answers, fitted after the same context);
  prompts were chosen to leave room for any sampled answer, so every candidate of a
  prompt sees the same, untruncated context.
  """
  rows = []
  for k, item in enumerate(prompts):
    group = texts[k * n:(k + 1) * n]
    group = group + group[-1:] * (len(group) % 2)  # an odd n: the last one twice
    rows += [scorer_lib.Row(item.context, item.persona, (group[j], group[j + 1]))
             for j in range(0, len(group), 2)]
  flat = []
  for scored in scorer.score(rows):
    flat += [scored, scored] if isinstance(scored, str) else list(scored)
  return [s for k in range(len(prompts)) for s in flat[k * (n + n % 2):][:n]]


def reward_source(cfg) -> dict[str, Any]:
  """What scored the round's answers, as recorded in its statistics."""
  ur = cfg.user_rewards
  if ur.reward == "follow_up":
    return {"kind": "follow_up", "positive": list(ur.follow_ups.positive),
            "negative": list(ur.follow_ups.negative), "with_persona": ur.with_persona}
  return {"kind": "model", "reward_model": ur.reward_model,
          "with_persona": ur.with_persona}


def model_tokenizer(cfg, checkpoint: str) -> str:
  """config.tokenizer, or the tokenizer saved with `checkpoint`."""
  return cfg.tokenizer or checkpoint


def round_config(cfg, r: int, policy: str, rdir: str):
  """The DPO config of round r: from `policy`, on the round's pairs."""
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    c.seed = cfg.seed + r
    c.model.init = policy
    c.reference.init = (cfg.model.init if cfg.user_rewards.reference == "initial"
                        else policy)
    rdir = rdir if fileio.is_remote(rdir) else os.path.abspath(rdir)
    c.data.pairs = os.path.join(rdir, PAIRS)
    # Reference log-probs of the (fixed) eval pairs are shared by all rounds.
    c.reference.cache_dir = cfg.reference.cache_dir or os.path.join(
        os.path.dirname(rdir), "reference_logps")
  return c


def run(cfg, workdir: str) -> list[dict[str, Any]]:
  """All rounds (skipping finished ones); returns each round's statistics."""
  ur = cfg.user_rewards
  if not cfg.model.init:
    raise ValueError("user_rewards samples from a checkpoint: set config.model.init to "
                     "the starting policy (an HF dir, e.g. <train_dpo workdir>/hf)")
  if ur.reference not in ("initial", "previous"):
    raise ValueError(f"config.user_rewards.reference={ur.reference!r}; expected "
                     f"'initial' or 'previous'")
  if ur.reward not in REWARDS:
    raise ValueError(f"config.user_rewards.reward={ur.reward!r}; expected one of "
                     f"{REWARDS}")
  if ur.reward == "model" and not ur.reward_model:
    raise ValueError("config.user_rewards.reward_model is empty: set it to a "
                     "reward-model directory (e.g. <train_reward workdir>/reward_model)")
  if ur.num_samples < 2:
    raise ValueError(f"config.user_rewards.num_samples={ur.num_samples}: best vs worst "
                     f"needs at least 2")
  mesh = sharding.make_mesh(dict(cfg.mesh))
  policy, rounds = cfg.model.init, []
  for r in range(ur.rounds):
    rdir = _round_dir(workdir, r)
    done = os.path.join(rdir, "round.json")
    if fileio.exists(done):
      rounds.append(_read_json(done))
      policy = rounds[-1]["policy_after"]
      logging.info("user rewards: round %d already done", r)
      continue
    sampled = os.path.join(rdir, "sampling.json")
    if fileio.exists(sampled):
      stats = _read_json(sampled)
    else:
      stats = sample_and_score(cfg, r, policy, rdir)
    logging.info("user rewards round %d: %d pairs from %d prompts", r, stats["pairs"],
                 stats["prompts"])
    after, dpo_metrics, t0 = policy, {}, time.perf_counter()
    if stats["pairs"]:
      dpo_dir = os.path.join(rdir, "dpo")
      result = dpo.run(round_config(cfg, r, policy, rdir), dpo_dir, mesh)
      if result.preempted:
        logging.warning("user rewards: preempted in round %d; re-run to resume", r)
        return rounds
      after = os.path.join(dpo_dir, "hf")
      dpo_metrics = _last_train_metrics(dpo_dir) | {
          f"eval/{k}": v for k, v in result.final_eval.items()}
    stats = dict(stats) | {"policy_after": after, "dpo": dpo_metrics}
    stats["seconds"] = dict(stats["seconds"]) | {"training": time.perf_counter() - t0}
    if sharding.is_main_process():
      reports.write_json(done, stats)
    rounds.append(stats)
    policy = after
  if sharding.is_main_process():
    write_report(workdir, cfg, rounds)
  return rounds


def _last_train_metrics(workdir: str) -> dict[str, float]:
  path = os.path.join(workdir, "metrics.jsonl")
  last = {}
  if jax.process_index() == 0 and fileio.exists(path):
    with fileio.open(path) as f:
      for line in f:
        m = json.loads(line)
        if "train/loss" in m:
          last = m
  return last


def write_report(workdir: str, cfg, rounds: list[dict[str, Any]]) -> None:
  ur = cfg.user_rewards
  rows = []
  for s in rounds:
    d = s.get("dpo", {})
    f = lambda k, d=d: f"{d[k]:.3f}" if k in d else "-"
    rows.append(f"| {s['round']} | {s['prompts']} | {s['candidates']} | {s['pairs']} | "
                f"{s['score_mean']:.3f} | {s['spread_mean']:.3f} | "
                f"{s['pair_gap_mean']:.3f} | {f('train/loss')} | "
                f"{f('train/rewards/accuracies')} | {f('train/rewards/margins')} |")
  src = reward_source(cfg)
  source = (f"reward model {src['reward_model']}" if src["kind"] == "model" else
            f"the policy's follow-up likelihood (positive: {src['positive']}; "
            f"negative: {src['negative']})")
  md = "\n".join([
      "# User-Based Rewards", "",
      f"Start: {cfg.model.init}; rewards: {source} "
      f"({'persona-aware' if ur.with_persona else 'user-agnostic: no persona'}); "
      f"{ur.num_samples} samples per prompt (temperature {ur.temperature}, top-p "
      f"{ur.top_p}); pairs when best - worst > {ur.margin_threshold}; reference: "
      f"{ur.reference} policy; {cfg.total_steps} DPO steps per round.", "",
      "Score columns are the rewards of the sampled answers (mean, mean "
      "best-worst spread per prompt, mean gap of the kept pairs); DPO columns are the "
      "last logged training step of the round.", "",
      "| round | prompts | samples | pairs | score mean | spread | pair gap | DPO loss | "
      "reward acc | margin |",
      "|---|---|---|---|---|---|---|---|---|---|", *rows, ""])
  reports.write_report(workdir, "user_rewards", {"rounds": rounds}, md)
