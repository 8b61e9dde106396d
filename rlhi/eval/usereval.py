"""WildChat UserEval: two systems answer held-out users' target turns; a judge compares.

    report = usereval.run_usereval(cfg, workdir)     # cfg: configs/eval.py
    report["win_rates"]["overall"]["all"]["win_rate"]  # B over A, in [0, 1]

Steps (RLHI.md, "Evaluation: WildChat UserEval"):
  1. items     test users' target turns with their history-only personas
               (rlhi/data/items.py)
  2. answers   system A and system B answer every item (systems.py)
  3. judge     the judge config.judge names (judges.make_judge): each pair in both
               orders by an LLM through the inference client, or once by the reward
               model offline (judges.py)
  4. stats     B's win rate over A per turn type and dimension, bootstrap 95% interval
               (stats.py)
  5. report    usereval.{md,json,png} (report.py)

Files in `workdir` (a run is auditable and resumable; re-running the same command
reuses answers and cached judge calls):

  usereval_items.jsonl         the items (context, persona, original answer)
  usereval_generations.jsonl   every answer of both systems, with failures
  usereval_judgements.jsonl    every judgement (both orders for the LLM), with failures
  usereval_rejects.jsonl       what could not be used, with the reason
  usereval_cache.sqlite        the LLM judge's request cache
  usereval.{md,json,png}       the report
  usereval.html                every judged item in a self-contained page (browser.py)

`workdir` and config.data.dir may be local or remote (gs://bucket/dir; see rlhi.fileio).
With a remote workdir the judge's SQLite cache is a local copy, merged with the
workdir's and uploaded back when the judge is done, as the data stages' request cache
is (rlhi.data.pipeline.make_client).

Multi-host: every process answers (the models are sharded over all devices) and runs
the reward-model judge; only process 0 asks the LLM judge and writes files; other
processes return {}.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any

from rlhi import fileio
from rlhi import local_backend  # pylint: disable=unused-import  (backend='local')
from rlhi.data import pipeline
from rlhi.data import items as items_lib
from rlhi.data import prompting
from rlhi.data import schema
from rlhi.eval import browser
from rlhi.eval import judges
from rlhi.eval import report as report_lib
from rlhi.eval import stats
from rlhi.eval import systems as systems_lib

ITEMS_FILE = "usereval_items.jsonl"
GENERATIONS_FILE = "usereval_generations.jsonl"
JUDGEMENTS_FILE = "usereval_judgements.jsonl"
REJECTS_FILE = "usereval_rejects.jsonl"
CACHE_FILE = "usereval_cache.sqlite"


def _processes() -> tuple[bool, int]:
  """(is this process 0, number of processes)."""
  import jax  # pylint: disable=g-import-not-at-top  (heavy: imported when run)
  from rlhi import sharding  # pylint: disable=g-import-not-at-top
  return sharding.is_main_process(), jax.process_count()


def _length_check(judgements, pairs, dimensions) -> dict[str, Any]:
  """stats.length_controlled on the items scored on 'overall' (or the first dimension)."""
  dim = "overall" if "overall" in dimensions else dimensions[0]
  scores, _ = stats.item_scores(judgements, [dim])
  scored = [(scores[p.item.item_id][dim], len(p.answer_a), len(p.answer_b))
            for p in pairs if dim in scores.get(p.item.item_id, {})]
  return {"dimension": dim, **stats.length_controlled(
      [x[0] for x in scored], [x[1] for x in scored], [x[2] for x in scored])}


def run_usereval(cfg, workdir: str) -> dict[str, Any]:
  """Runs UserEval with config `cfg` (configs/eval.py) into `workdir`.

  Returns:
    The report (also written to usereval.json) on process 0, {} on other processes:
      systems: {'a': {...}, 'b': {...}} (label, kind, path, with_persona)
      judge: kind, description, dimensions (the LLM judges personalization,
        instruction_following and overall; the reward model overall only)
      win_rates: {dimension: {'initial' | 'follow_up' | 'all': {n_items, win_rate,
        ci_low, ci_high, wins, ties, losses, excluded}}}; win_rate is B's over A in
        [0, 1] (None when no item could be scored)
      items, generation, judge_failures, pairs, first_position_rate, requests,
      settings, files.
  """
  judges.check_kind(cfg.judge.kind)
  main, n_proc = _processes()
  if main:
    fileio.makedirs(workdir)
  path = lambda name: os.path.join(workdir, name)

  # ---- Items -------------------------------------------------------------------------
  itemset = items_lib.load_items(cfg.data.dir, max_items=cfg.max_items,
                                 max_turns_per_user=cfg.max_turns_per_user,
                                 require_persona=cfg.require_persona,
                                 split=cfg.data.split)
  items = itemset.items
  if not items:
    raise ValueError(f"usereval: no items: {itemset.counts['users']} {cfg.data.split} "
                     f"users in {cfg.data.dir}, skipped {itemset.counts['skipped']}; "
                     f"check config.data.dir and config.require_persona")
  if main:
    schema.write_jsonl(path(ITEMS_FILE), [items_lib.to_record(i) for i in items])

  # ---- Answers -----------------------------------------------------------------------
  gen = systems_lib.GenerationSettings.from_config(cfg.generation, cfg.system_template)
  systems = {k: systems_lib.System.from_config(k, cfg.systems[k]) for k in ("a", "b")}
  rejects: list[schema.Reject] = []
  previous: list[dict[str, Any]] = []
  if n_proc == 1:  # Resuming needs every process to see the same file; one does.
    # This run's own answers first, then other runs' (config.reuse_answers_from): a
    # system whose fingerprint matches is not generated again.
    for source in (workdir, *cfg.get("reuse_answers_from", ())):
      records, bad = systems_lib.read_records(
          os.path.join(source, GENERATIONS_FILE) if fileio.isdir(source) else source)
      previous += records
      rejects += bad
  answerer = systems_lib.Answerer(gen, dict(cfg.mesh))
  answers, gen_report = {}, {}
  for k, system in systems.items():
    fp = systems_lib.fingerprint(system, gen)
    reused = {r["item_id"] for r in previous
              if r.get("fingerprint") == fp and isinstance(r.get("text"), str)}
    answers[k], bad = answerer.answer(system, items, previous,
                                      append_to=path(GENERATIONS_FILE) if main else None)
    rejects += bad
    failed = {i: r["error"] for i, r in answers[k].items() if r["text"] is None}
    rejects += pipeline.rejects_of(f"generation/{k}", failed, numbered=False)
    gen_report[k] = {
        "answered": sum(r["text"] is not None for r in answers[k].values()),
        "reused": sum(i in reused and answers[k][i]["text"] is not None
                      for i in answers[k]),
        "failed": len(failed),
        "failures_by_reason": dict(collections.Counter(
            pipeline.reason_code(e) for e in failed.values())),
    }
  if main:
    schema.write_jsonl(path(GENERATIONS_FILE),
                       [answers[k][i.item_id] for k in systems for i in items])
  text = lambda k, i: answers[k][i.item_id]["text"]
  pairs = [judges.Pair(i, text("a", i), text("b", i)) for i in items
           if text("a", i) is not None and text("b", i) is not None]

  # ---- Judge -------------------------------------------------------------------------
  judge = judges.make_judge(cfg.judge, workdir=workdir, cache_name=CACHE_FILE,
                            mesh_axes=dict(cfg.mesh))
  if not (main or judge.collective):
    return {}
  judgements = judge.judge(pairs)
  if not main:
    return {}
  dimensions = judge.dimensions

  # ---- Stats and report --------------------------------------------------------------
  failed = {f"{j['item_id']}/{j['order']}":
            prompting.Failure(j["error"], j.get("answers") or ())
            for j in judgements if j["winners"] is None}
  rejects += pipeline.rejects_of("judge", failed, numbered=False)
  schema.write_jsonl(path(JUDGEMENTS_FILE), judgements)
  schema.write_jsonl(path(REJECTS_FILE), rejects)
  report = {
      "systems": {k: s.describe() for k, s in systems.items()},
      "win_rate_of": "b over a",
      "judge": {"kind": judge.kind, "description": judge.description,
                "dimensions": list(dimensions), "orders": list(judge.orders)},
      "win_rates": stats.win_rates(judgements, dimensions, n_boot=cfg.n_boot,
                                   seed=cfg.seed),
      "first_position_rate": stats.first_position_rate(judgements, "overall"),
      "length": _length_check(judgements, pairs, dimensions),
      "items": itemset.counts,
      "pairs": len(pairs),
      "generation": {"systems": gen_report,
                     "items_without_both_answers": len(items) - len(pairs)},
      "judge_failures": {"judgements": len(judgements), "failed": len(failed),
                         "by_reason": dict(collections.Counter(
                             pipeline.reason_code(e) for e in failed.values()))},
      "requests": judge.requests,
      "settings": {"n_boot": cfg.n_boot, "seed": cfg.seed, "data_dir": cfg.data.dir,
                   "generation": dataclasses.asdict(gen)},
      "files": {
          ITEMS_FILE: "the items: context, persona, original answer",
          GENERATIONS_FILE: "every answer of both systems, with failures",
          JUDGEMENTS_FILE: "every judgement (LLM: both orders), with failures",
          REJECTS_FILE: "what could not be used, with the reason",
          report_lib.PNG_FILE: "the win-rate chart",
          browser.HTML_FILE: "every judged item, with filters and search (open in a "
                             "browser)",
      },
  }
  report_lib.write(workdir, report)
  browser.write_for_workdir(workdir)
  # Answers and judgements that failed are in the rejects; too many of them and the win
  # rates mean little, so the run ends non-zero after writing what it has.
  gen_failed = [r for r in rejects if r.source.startswith("generation/")]
  judge_failed = [r for r in rejects if r.source == "judge"]
  for what, asked, failures in (("usereval generation", 2 * len(items), gen_failed),
                                ("usereval judge", len(judgements), judge_failed)):
    pipeline.check_failures(
        what, asked, failures, cfg.max_failure_fraction,
        where=f"{path(report_lib.MD_FILE)} and {path(REJECTS_FILE)}",
        rerun="Fix the system or the judge (config.systems, config.judge) and re-run: "
        "answers and verdicts that succeeded are reused (or raise "
        "--config.max_failure_fraction).")
  return report
