"""usereval.html: every judged item of one or more UserEval runs, in one page.

    browser.write_html("<workdir>/usereval.html", [browser.load_run(workdir)])

The page is self-contained (no server, no CDN: it works opened from disk and in a
colab): the runs' data are embedded as JSON, and a short script builds the page from
them. All text goes into the page with `textContent`, never as HTML, so answers holding
markup or `<script>` show as text; inside the embedded JSON every `<` is written
`\\u003c`, so no data can close the script element that holds it.

Per item: the user's persona, the conversation so far, the two systems' answers side by
side, each judgement (order, winner per dimension, the LLM judge's rationale or the
reward model's scores), and ground truth where the item has it. A header shows each
run's win rates with their 95% intervals. Filters: run (system pair), turn type,
verdict (B wins, A wins, tie, judge failed), disagreement (the two orders gave
different winners), and a search over all text. The filter state lives in the URL's
fragment (`usereval.html#run=0&turn=follow_up&verdict=b&disagree=1&q=python`), so a
view can be linked, and a headless browser can open a filtered page without clicks.

This module never imports jax.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from rlhi import fileio
from rlhi.eval import report as report_lib
from rlhi.eval import stats

HTML_FILE = "usereval.html"
# The page: HTML, CSS and the script that renders the data (its `__DATA__` is replaced).
_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "usereval_page.html")
# Written by rlhi/eval/usereval.py; repeated here to avoid importing it (and its judges).
_ITEMS_FILE = "usereval_items.jsonl"
_GENERATIONS_FILE = "usereval_generations.jsonl"
_JUDGEMENTS_FILE = "usereval_judgements.jsonl"


def _jsonl(path: str) -> list[dict[str, Any]]:
  with fileio.open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _verdict(judgements: Sequence[Mapping[str, Any]], dimension: str) -> str:
  """'b', 'a', 'tie' (the item's score on `dimension`), or 'failed'."""
  scores, _ = stats.item_scores(judgements, [dimension])
  score = next(iter(scores.values()), {}).get(dimension)
  if score is None:
    return "failed"
  return "b" if score > 0.5 else "a" if score < 0.5 else "tie"


def _disagree(judgements: Sequence[Mapping[str, Any]]) -> bool:
  """The two orders gave different winners on some dimension (a position effect)."""
  by_order = {j["order"]: j.get("winners") or {} for j in judgements}
  if not all(o in by_order for o in stats.ORDERS):
    return False
  ab, ba = (by_order[o] for o in stats.ORDERS)
  return any(ab.get(d) != ba.get(d) for d in set(ab) | set(ba))


def load_run(workdir: str, name: str = "") -> dict[str, Any]:
  """One UserEval run's items, answers, judgements and report, as the page shows them."""
  with fileio.open(os.path.join(workdir, report_lib.JSON_FILE)) as f:
    report = json.load(f)
  answers: dict[str, dict[str, Any]] = {}
  for g in _jsonl(os.path.join(workdir, _GENERATIONS_FILE)):
    answers.setdefault(g["item_id"], {})[g["system"]] = {"text": g.get("text"),
                                                         "error": g.get("error")}
  judged: dict[str, list[dict[str, Any]]] = {}
  for j in _jsonl(os.path.join(workdir, _JUDGEMENTS_FILE)):
    judged.setdefault(j["item_id"], []).append(j)
  dimension = ("overall" if "overall" in report["judge"]["dimensions"]
               else report["judge"]["dimensions"][0])
  items = []
  for it in _jsonl(os.path.join(workdir, _ITEMS_FILE)):
    js = sorted(judged.get(it["item_id"], []), key=lambda j: j["order"])
    items.append({
        "id": it["item_id"], "user": it["user_id"], "turn": it["turn_type"],
        "persona": it.get("persona"),
        "context": [{"role": m["role"], "content": m["content"]} for m in it["context"]],
        "answers": {k: answers.get(it["item_id"], {}).get(k, {"text": None,
                                                               "error": "no answer"})
                    for k in ("a", "b")},
        "judgements": [{k: j.get(k) for k in ("order", "winners", "rationale", "scores",
                                              "error")} for j in js],
        "verdict": _verdict(js, dimension) if js else "failed",
        "disagree": _disagree(js),
        "ground_truth": it.get("ground_truth"),
    })
  return {
      "name": name or os.path.basename(os.path.normpath(workdir)),
      "a": report["systems"]["a"]["label"], "b": report["systems"]["b"]["label"],
      "judge": report["judge"]["description"], "dimension": dimension,
      "win_rates": report["win_rates"], "items": items,
  }


def write_html(path: str, runs: Sequence[Mapping[str, Any]]) -> None:
  """Writes the page for `runs` (from `load_run`) to `path`, atomically."""
  data = json.dumps({"runs": list(runs)}, ensure_ascii=False, sort_keys=True)
  # '<' occurs in JSON only inside strings, where \u003c means the same character: the
  # parser can then never see '</script' or '<!--' in the data.
  data = data.replace("<", "\\u003c")
  with open(_PAGE, encoding="utf-8") as f:
    page = f.read()
  with fileio.atomic_write(path) as f:
    f.write(page.replace("__DATA__", data))


def write_for_workdir(workdir: str) -> str:
  """usereval.html for the UserEval run in `workdir`; returns its path."""
  path = os.path.join(workdir, HTML_FILE)
  write_html(path, [load_run(workdir)])
  return path
