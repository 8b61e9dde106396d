"""UserEval report: usereval.md (tables), usereval.json (every number) and usereval.png.

The report always says which system is A and which is B, that the win rate is B's, which
judge was used and which dimensions it covers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from rlhi import fileio
from rlhi import reports
from rlhi.eval import stats

JSON_FILE = "usereval.json"
MD_FILE = "usereval.md"
PNG_FILE = "usereval.png"
_GROUP_NAMES = {"initial": "initial turns", "follow_up": "follow-up turns",
                "all": "all turns"}


def _pct(x: float) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _both_orders(report: Mapping[str, Any]) -> bool:
  return report["judge"].get("orders", list(stats.ORDERS)) != [stats.ANY_ORDER]


def markdown(report: Mapping[str, Any]) -> str:
  a, b = report["systems"]["a"], report["systems"]["b"]
  judge = report["judge"]
  dims = judge["dimensions"]
  lines = [
      "# WildChat UserEval", "",
      (f"- **System A** (baseline): {a['label']} (`{a['kind']}`"
       f"{', persona in the system slot' if a['with_persona'] else ''})"),
      (f"- **System B**: {b['label']} (`{b['kind']}`"
       f"{', persona in the system slot' if b['with_persona'] else ''})"),
      (f"- **Judge**: {judge['description']}; dimensions judged: "
       f"{', '.join(d.replace('_', ' ') for d in dims)}."), "",
      ("Win rate of **B over A**: the share of pairs in which the judge preferred B's "
       "answer, ties counting half; "
       + ("each pair was judged in both orders (A shown first, then B shown first) and "
          "an item's score is the mean of the two. " if _both_orders(report) else
          "the judge scores each answer alone, so each pair was judged once. ")
       + f"50% means no difference. 95% interval: percentile bootstrap over items "
       f"(n_boot={report['settings']['n_boot']}, seed {report['settings']['seed']})."),
      "",
  ]
  rows = []
  for d in dims:
    for g in stats.GROUPS:
      c = report["win_rates"][d][g]
      rows.append([d.replace("_", " "), _GROUP_NAMES[g], c["n_items"],
                   f"**{_pct(c['win_rate'])}**",
                   f"[{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]",
                   f"{c['wins']} / {c['ties']} / {c['losses']}", c["excluded"]])
  lines += [_table(["dimension", "turns", "items", "B win rate", "95% CI",
                    "B wins / ties / losses (judgements)", "items excluded"], rows), "",
            f"![win rates]({PNG_FILE})", ""]

  ln = report.get("length")
  if ln and ln["n_items"]:
    lines += [
        (f"**Length check** ({ln['dimension']}, {ln['n_items']} items): median answer "
         f"length A {ln['median_chars']['a']:.0f}, B {ln['median_chars']['b']:.0f} "
         f"characters; the longer answer won {_pct(ln['longer_won'])} of items with "
         f"different lengths; **length-controlled win rate of B: "
         f"{_pct(ln['win_rate_lc'])}** (logistic fit of the item scores on "
         f"tanh(length difference / sd), AlpacaEval 2's LC idea: B's win rate at equal "
         f"length; length coefficient {ln['length_coef']:+.2f}). A win rate that falls "
         f"to ~50% here was a length effect."), ""]
  it = report["items"]
  lines += [
      "## Items", "",
      (f"Held-out ({it['split']}) users: {it['users']} ({it['users_without_persona']} "
       f"without a persona); target turns available: {it['turns_available']}; items "
       f"used: {it['items']} (initial {it['items_by_turn_type']['initial']}, follow-up "
       f"{it['items_by_turn_type']['follow_up']}) from {it['users_with_items']} users. "
       f"Personas come from history conversations only; every item is from a target "
       f"conversation (checked)."), ""]
  if it["skipped"]:
    lines += [_table(["skipped turns", "count"], [[k, v] for k, v in
                                                  it["skipped"].items()]), ""]
  gen = report["generation"]
  lines += ["## Answers", "",
            _table(["system", "answers", "reused from an earlier run", "failed"],
                   [[f"{k.upper()}: {report['systems'][k]['label']}", g["answered"],
                     g["reused"], g["failed"]] for k, g in gen["systems"].items()]), "",
            (f"Items answered by both systems and judged: {report['pairs']}; left out "
             f"because a system could not answer: {gen['items_without_both_answers']}."),
            ""]
  failures = {k: v for g in gen["systems"].values() for k, v in
              g["failures_by_reason"].items()}
  if failures:
    lines += [_table(["answer failure", "count"], [[k, v] for k, v in
                                                   sorted(failures.items())]), ""]
  jf = report["judge_failures"]
  lines += ["## Judge", "",
            (f"Judgements: {jf['judgements']} ({report['pairs']} pairs"
             f"{' x 2 orders' if _both_orders(report) else ', judged once'}); "
             f"failed: {jf['failed']} ("
             f"{'after one re-ask; ' if judge['kind'] == 'llm' else ''}counted, never "
             f"guessed; their items are left out of the win rates)."), ""]
  if jf["by_reason"]:
    lines += [_table(["judge failure", "count"], [[k, v] for k, v in
                                                  sorted(jf["by_reason"].items())]), ""]
  pos = report.get("first_position_rate")
  if pos is not None and judge["kind"] == "llm":
    lines += [(f"Position check: the answer shown first won {_pct(pos)} of the "
              f"'overall' judgements (50% = no position bias; swapping orders cancels "
              f"it in the win rates)."), ""]
  if report.get("requests"):
    s = report["requests"]
    lines += [_table(["requests", "HTTP sent", "from cache", "failed", "retries",
                      "prompt tokens", "completion tokens"],
                     [[s["requests"], s["sent"], s["cached"], s["failed"], s["retries"],
                       s["prompt_tokens"], s["completion_tokens"]]]), ""]
  lines += ["## Files", "",
            "\n".join(f"- `{name}`: {what}" for name, what in report["files"].items()),
            ""]
  return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str) -> None:
  """Bar chart: B's win rate per dimension and turn type, 95% intervals, 50% line."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (heavy)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  dims = report["judge"]["dimensions"]
  fig, ax = plt.subplots(figsize=(max(6.0, 2.2 + 2.4 * len(dims)), 4.6))
  width = 0.8 / len(stats.GROUPS)
  for k, g in enumerate(stats.GROUPS):
    cells = [report["win_rates"][d][g] for d in dims]
    xs = [i + (k - (len(stats.GROUPS) - 1) / 2) * width for i in range(len(dims))]
    ys = [100 * c["win_rate"] if c["win_rate"] is not None else 0 for c in cells]
    err = [[max(0.0, y - 100 * c["ci_low"]) if c["ci_low"] is not None else 0
            for y, c in zip(ys, cells)],
           [max(0.0, 100 * c["ci_high"] - y) if c["ci_high"] is not None else 0
            for y, c in zip(ys, cells)]]
    ax.bar(xs, ys, width, yerr=err, capsize=3,
           label=f"{_GROUP_NAMES[g]} (n={cells[0]['n_items']})")
  ax.axhline(50, color="gray", linestyle="--", linewidth=1)
  ax.set_xticks(range(len(dims)))
  ax.set_xticklabels([d.replace("_", " ") for d in dims])
  ax.set_ylim(0, 100)
  ax.set_ylabel("win rate of B over A (%)")
  a, b = report["systems"]["a"]["label"], report["systems"]["b"]["label"]
  ax.set_title(f"UserEval: B = {b}\nvs A = {a}; judge: {report['judge']['kind']}",
               fontsize=9)
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1),
            ncol=len(stats.GROUPS), frameon=False)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  try:
    with fileio.local_output(path) as local:  # remote: drawn here, then uploaded
      fig.savefig(local, dpi=110)
  finally:
    plt.close(fig)


def write(workdir: str, report: Mapping[str, Any]) -> str:
  """Writes usereval.{json,md,png}; returns the markdown."""
  reports.write_json(os.path.join(workdir, JSON_FILE), report)
  md = markdown(report)
  with fileio.open(os.path.join(workdir, MD_FILE), "w") as f:
    f.write(md)
  plot(report, os.path.join(workdir, PNG_FILE))
  return md
