"""sim_report.md and its figures, from a finished experiments/simulate.py work directory.

Reward models: pairwise accuracy against the users' labels on held-out pairs, for seen
users (training users' held-out requests) and unseen users (held-out users), with 95%
bootstrap intervals over pairs; the persona-blind model's gap to the persona model is
bootstrapped on the same pairs (paired). Policies: the mean true reward of each
system's answers to held-out users' target turns, and its win rate over the base
policy judged by the ground truth (UserEval, ties half), both with 95% intervals.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Sequence

import numpy as np

from rlhi.eval import stats
from rlhi.sim import users as users_lib

RM_ROWS = ("persona RM", "persona-blind RM", "oracle", "majority")
RM_NOTES = {
    "persona RM": "trained and scored with the persona card in the system slot",
    "persona-blind RM": "the same training without the persona",
    "oracle": "the users' true weights (below 100% only through label noise)",
    "majority": "what most training users prefer: the best a persona-blind judge can do",
}


def _ci(values: Sequence[float], n_boot: int, seed: int = 0) -> tuple[float, float, float]:
  return stats.bootstrap([float(v) for v in values], n_boot, seed)


def _pct(m: tuple[float, float, float]) -> str:
  mean, lo, hi = m
  if np.isnan(mean):
    return "n/a"
  return f"{100 * mean:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def rm_table(work: str, n_boot: int) -> tuple[list[str], dict[str, Any]]:
  with open(os.path.join(work, "rm_eval.json"), encoding="utf-8") as f:
    every = json.load(f)["pairs"]
  # Every row on the same pairs: those both reward models could score (a pair longer
  # than their max_length is counted below and left out of all four rows).
  pairs = [p for p in every if all(p[k] is not None for k in RM_ROWS[:2])]
  failed = len(every) - len(pairs)
  out = {}
  lines = ["| judge | seen users | unseen users | what it is |", "|---|---|---|---|"]
  for name in RM_ROWS:
    cells = []
    for group in ("seen", "unseen"):
      v = [p[name] for p in pairs if p["group"] == group]
      out[name, group] = _ci(v, n_boot)
      cells.append(_pct(out[name, group]))
    lines.append(f"| {name} | {cells[0]} | {cells[1]} | {RM_NOTES[name]} |")
  n = {g: sum(p["group"] == g for p in pairs) for g in ("seen", "unseen")}
  users = {g: len({p["user_id"] for p in pairs if p["group"] == g})
           for g in ("seen", "unseen")}
  # The persona's effect on the same pairs: a paired bootstrap of the difference.
  gaps = {}
  for group in ("seen", "unseen"):
    d = [float(p["persona RM"]) - float(p["persona-blind RM"]) for p in pairs
         if p["group"] == group]
    gaps[group] = _ci(d, n_boot, seed=1)
  lines += ["", f"Pairs: {n['seen']} from {users['seen']} seen users, {n['unseen']} "
            f"from {users['unseen']} unseen users, in every row; left out: {failed} "
            f"pairs that a reward model could not score (longer than its max_length).",
            ""]
  for group in ("seen", "unseen"):
    m, lo, hi = gaps[group]
    inside = "inside" if lo <= 0 <= hi else "outside"
    lines.append(f"- Persona RM minus persona-blind RM, {group} users: "
                 f"{100 * m:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]: zero is "
                 f"{inside} the interval.")
  return lines, {"accuracy": {f"{k[0]}/{k[1]}": v for k, v in out.items()},
                 "gap": gaps, "pairs": n, "users": users}


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a JSONL file (a UserEval run's items or generations)."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def policy_table(work: str, systems: Sequence[str], labels: dict[str, str],
                 users: dict[str, users_lib.SimUser], n_boot: int
                 ) -> tuple[list[str], dict[str, Any]]:
  rewards: dict[str, list[float]] = {}
  wins: dict[str, dict[str, Any]] = {}
  failed: dict[str, int] = {}
  items = None
  for system in systems:
    run = os.path.join(work, f"eval_{system}")
    report = _json(os.path.join(run, "usereval.json"))
    if items is None:
      items = {it["item_id"]: it for it in read_jsonl(os.path.join(run,
                                                               "usereval_items.jsonl"))}
    wins[system] = report["win_rates"]["overall"]["all"]
    for g in read_jsonl(os.path.join(run, "usereval_generations.jsonl")):
      label = "base" if g["system"] == "a" else system
      if label == "base" and "base" in rewards and system != systems[0]:
        continue
      it = items[g["item_id"]]
      if g.get("text") is None:
        failed[label] = failed.get(label, 0) + 1
        continue
      rewards.setdefault(label, []).append(users[it["user_id"]].reward(g["text"]))
  lines = ["| system | mean true reward | win rate vs base (ground truth) | items |",
           "|---|---|---|---|"]
  summary = {}
  for system in ("base", *systems):
    mean, lo, hi = _ci(rewards.get(system, []), n_boot)
    w = wins.get(system)
    win = (f"{100 * w['win_rate']:.1f}% [{100 * w['ci_low']:.1f}, "
           f"{100 * w['ci_high']:.1f}]" if w and w["win_rate"] is not None else "-")
    if w and w["win_rate"] is not None:
      win += " (50% inside)" if w["ci_low"] <= 0.5 <= w["ci_high"] else " (50% outside)"
    lines.append(f"| {labels[system]} | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] | {win} | "
                 f"{len(rewards.get(system, []))} |")
    summary[system] = {"reward": (mean, lo, hi), "win": w,
                       "failed": failed.get(system, 0)}
  n_users = len({it["user_id"] for it in (items or {}).values()})
  lines += ["", f"Held-out users: {n_users}; items (target turns): {len(items or {})}; "
            f"answers that failed: {sum(failed.values())}."]
  return lines, summary


def plot(work: str, rm: dict[str, Any], policies: dict[str, Any],
         labels: dict[str, str]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for k, group in enumerate(("seen", "unseen")):
    for i, name in enumerate(RM_ROWS):
      m, lo, hi = rm["accuracy"][f"{name}/{group}"]
      if np.isnan(m):
        continue
      ax.bar(i + (k - 0.5) * 0.4, 100 * m, 0.4, yerr=[[100 * (m - lo)], [100 * (hi - m)]],
             capsize=3, color=f"C{k}", label=f"{group} users" if i == 0 else None)
  ax.axhline(50, color="gray", linestyle="--", linewidth=1)
  ax.set_xticks(range(len(RM_ROWS)), RM_ROWS)
  ax.set_ylabel("pairwise accuracy vs the users' labels (%)")
  ax.set_ylim(0, 100)
  ax.legend(fontsize=8)
  ax.set_title("Reward models on held-out pairs (95% bootstrap CIs)", fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(work, "sim_rm.png"), dpi=110)
  plt.close(fig)

  names = list(policies)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, s in enumerate(names):
    m, lo, hi = policies[s]["reward"]
    if not np.isnan(m):
      axes[0].bar(i, m, yerr=[[m - lo], [hi - m]], capsize=3, color="C0")
    w = policies[s]["win"]
    if w and w["win_rate"] is not None:
      axes[1].bar(i, 100 * w["win_rate"], capsize=3, color="C1", yerr=[
          [100 * (w["win_rate"] - w["ci_low"])], [100 * (w["ci_high"] - w["win_rate"])]])
  for ax in axes:
    ax.set_xticks(range(len(names)), [labels[s] for s in names], rotation=35,
                  ha="right", fontsize=7)
  axes[0].set_ylabel("mean true reward per answer")
  axes[1].set_ylabel("win rate vs base, ground truth (%)")
  axes[1].axhline(50, color="gray", linestyle="--", linewidth=1)
  axes[1].set_ylim(0, 100)
  fig.suptitle("Policies on held-out users (95% bootstrap CIs)", fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(work, "sim_policies.png"), dpi=110)
  plt.close(fig)


def _json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def write(sim, labels: dict[str, str]) -> str:
  """Writes <workdir>/sim_report.md (+ sim_report.json, sim_headline.md, sim_rm.png,
  sim_policies.png) for the experiments.simulate.Sim `sim`; `labels` names each
  system in the tables. Returns the markdown's path."""
  cfg, work = sim.cfg, sim.work
  users = users_lib.load_users(os.path.join(work, "data", "sim_users.jsonl"))
  rm_lines, rm = rm_table(work, cfg.n_boot)
  pol_lines, pol = policy_table(work, tuple(cfg.systems), labels, users, cfg.n_boot)
  plot(work, rm, pol, labels)
  logs = _json(os.path.join(work, "logs", "sim_logs_report.json"))
  ingest = _json(os.path.join(work, "data", "ingest_report.json"))
  pairs = {d: _json(os.path.join(work, d, "rewrites_report.json"))
           for d in ("data", "data_scratch")}
  clusters = collections.Counter(u.cluster for u in users.values())
  seconds = ", ".join(f"{k} {v:.0f} s" for k, v in sim.seconds.items())
  headline = headline_rows(rm, pol, labels, caption=(
      f"Policy {cfg.model}, reward models {cfg.reward_size}; {len(users)} simulated "
      f"users ({rm['users']['unseen']} held out); steps: "
      + ", ".join(f"{k} {v}" for k, v in cfg.steps.items()) + "."))
  md = [
      "# Simulated users: RLHI variants against ground truth", "",
      f"Model {cfg.model}; {len(users)} simulated users in {len(clusters)} preference "
      f"clusters ({', '.join(f'{k} {v}' for k, v in sorted(clusters.items()))}); "
      f"persona: {cfg.persona}; requests from "
      f"`{cfg.prompts.source or 'the bundled WildChat sample'}`. Stage times: {seconds}.",
      "", "## Headline", "", *headline, "",
      "## Reward models (held-out pairs, labels by the users' true rewards)", "",
      *rm_lines, "", "![reward models](sim_rm.png)", "",
      "## Policies (held-out users' target turns, judged by the true rewards)", "",
      *pol_lines, "",
      *agreement_lines(work, cfg.n_boot), "",
      *flr_lines(work, cfg.systems), "",
      "![policies](sim_policies.png)", "",
      "## Data", "",
      f"Logs: {logs['conversations']} conversations of {logs['conversations_asked']} "
      f"asked (dropped: {logs['dropped'] or 'none'}); follow-ups: "
      f"{logs['follow_up_labels']}; complaints by feature: "
      f"{logs['complaints_by_feature']}.", "",
      f"Ingest: {ingest['rows_read']} rows, {ingest['kept']} kept, rejected "
      f"{sum(ingest['rejected'].values())} ({ingest['rejected'] or 'none'}).", "",
      *(f"Rewrite pairs ({'from the feedback' if d == 'data' else 'from scratch'}): "
        f"{pairs[d]['pairs']} of {pairs[d]['actionable_targets']}; set aside: "
        f"{json.dumps(pairs[d].get('rejected', {}))}." for d in pairs), "",
  ]
  md.append(_read(os.path.join(work, "logs", "sim_logs_report.md")))
  path = os.path.join(work, "sim_report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(md))
  with open(os.path.join(work, "sim_report.json"), "w", encoding="utf-8") as f:
    json.dump({"rm": {"accuracy": rm["accuracy"], "gap": rm["gap"],
                      "pairs": rm["pairs"], "users": rm["users"]},
               "policies": pol, "headline": headline, "seconds": sim.seconds}, f,
              indent=2, sort_keys=True, default=float)
  with open(os.path.join(work, "sim_headline.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(headline) + "\n")
  return path


def flr_lines(work: str, systems: Sequence[str]) -> list[str]:
  """What the FLR row is (the follow-ups its round recorded), or that it was not run."""
  if "flr" not in systems:
    return ["Not run: the FLR-style baseline (reward = the policy's likelihood of a "
            "positive vs a negative follow-up): 'flr' is not in config.systems."]
  f = _json(os.path.join(work, "flr", "round_00", "round.json"))["reward"]
  return [f"FLR-style baseline: one round as User-Based Rewards, but each answer's "
          f"reward is the base policy's log-likelihood of a positive minus a negative "
          f"user follow-up after it (rlhi/train/follow_up.py; positive "
          f"{f['positive']}, negative {f['negative']}; no reward model)."]


def agreement_lines(work: str, n_boot: int) -> list[str]:
  """The persona reward model's agreement with the ground truth as UserEval's judge."""
  with open(os.path.join(work, "judge_agreement.json"), encoding="utf-8") as f:
    a = json.load(f)
  m = _ci([float(x) for x in a["agree"]], n_boot)
  return [f"Judges: the persona reward model, used as UserEval's judge on the same "
          f"{len(a['agree'])} pairs of answers (ground-truth ties left out; "
          f"{a['failed']} it could not score), agrees with the ground truth on "
          f"{_pct(m)}. No LLM judge runs offline here (SmolLM2 gives no parseable "
          f"verdicts: docs/data.md); `configs/eval.py:judge=llm` against a server "
          f"measures one on the same items."]


def headline_rows(rm: dict[str, Any], pol: dict[str, Any], labels: dict[str, str],
                  caption: str) -> list[str]:
  """The rows the demo report shows: the reward models' accuracy on unseen users, and
  a few policies' mean true reward and win rate over the base policy."""
  rows = [caption, "", "| measure | value (95% CI) |", "|---|---|"]
  for name in ("persona RM", "persona-blind RM", "majority"):
    rows.append(f"| {name}, accuracy on unseen users | "
                f"{_pct(rm['accuracy'][f'{name}/unseen'])} |")
  for s in ("base", "dpo", "dpo_no_persona", "ubr"):
    if s in pol:
      m, lo, hi = pol[s]["reward"]
      w = pol[s]["win"]
      win = (f"; wins {100 * w['win_rate']:.1f}% vs base" if w and w["win_rate"]
             is not None else "")
      rows.append(f"| {labels[s]}: mean true reward | {m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                  f"{win} |")
  return rows
