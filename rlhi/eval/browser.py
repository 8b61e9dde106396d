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
from rlhi.data import schema
from rlhi.eval import report as report_lib
from rlhi.eval import stats

HTML_FILE = "usereval.html"
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
  with fileio.atomic_write(path) as f:
    f.write(_PAGE.replace("__DATA__", data))


def write_for_workdir(workdir: str) -> str:
  """usereval.html for the UserEval run in `workdir`; returns its path."""
  path = os.path.join(workdir, HTML_FILE)
  write_html(path, [load_run(workdir)])
  return path


_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>UserEval browser</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1b1b1b; background: #f6f6f4; }
header { background: #fff; border-bottom: 1px solid #ddd; padding: 12px 20px; position: sticky; top: 0; z-index: 1; }
h1 { font-size: 18px; margin: 0 0 6px; }
table.rates { border-collapse: collapse; margin: 4px 0 8px; font-size: 13px; }
table.rates td, table.rates th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
.controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; }
.controls label { font-size: 13px; }
main { padding: 12px 20px; }
.item { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: 0 0 14px; padding: 10px 14px; }
.item[hidden] { display: none; }
.meta { font-size: 12px; color: #555; }
.persona { background: #f0f4fa; border-left: 3px solid #6c8ebf; padding: 6px 10px; margin: 6px 0; white-space: pre-wrap; }
.msg { white-space: pre-wrap; margin: 4px 0; padding: 4px 8px; border-radius: 4px; }
.msg.user { background: #f7f3e8; } .msg.assistant { background: #eef6ee; } .msg.system { background: #eee; }
.role { font-weight: 600; font-size: 12px; color: #444; }
.answers { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; margin-top: 8px; }
.answer { border: 1px solid #ccc; border-radius: 4px; padding: 6px 8px; white-space: pre-wrap; overflow-wrap: anywhere; }
.answer.won { border: 2px solid #2a8a3a; } .answer h3 { margin: 0 0 4px; font-size: 13px; }
.verdict-b { color: #2a8a3a; } .verdict-a { color: #b3412f; } .verdict-tie { color: #777; } .verdict-failed { color: #b07000; }
.judgement { font-size: 12px; margin-top: 6px; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; background: #eee; margin-right: 4px; font-size: 12px; }
</style>
</head>
<body>
<header>
<h1>UserEval browser</h1>
<div id="summary"></div>
<div class="controls">
<label>run <select id="f-run"></select></label>
<label>turn <select id="f-turn"><option value="">all</option><option value="initial">initial</option><option value="follow_up">follow-up</option></select></label>
<label>verdict <select id="f-verdict"><option value="">all</option><option value="b">B wins</option><option value="a">A wins</option><option value="tie">tie</option><option value="failed">judge failed</option></select></label>
<label><input type="checkbox" id="f-disagree"> orders disagree</label>
<label>search <input type="search" id="f-q" size="28"></label>
<span id="count" class="meta"></span>
</div>
</header>
<main id="items"></main>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const VERDICT = {b: "B wins", a: "A wins", tie: "tie", failed: "judge failed"};
const GROUPS = {initial: "initial turns", follow_up: "follow-up turns", all: "all turns"};
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(typeof c === "string" ? document.createTextNode(c) : c);  // text, never HTML
  }
  return e;
}
const pct = x => (x === null || x === undefined) ? "n/a" : (100 * x).toFixed(1) + "%";
function summary() {
  const box = document.getElementById("summary");
  DATA.runs.forEach((run, r) => {
    const t = el("table", {class: "rates"},
      el("tr", {}, el("th", {}, "run " + r + ": B = " + run.b + " vs A = " + run.a),
         el("th", {}, "turns"), el("th", {}, "items"), el("th", {}, "B win rate (" + run.dimension + ")"),
         el("th", {}, "95% CI")));
    for (const g of Object.keys(GROUPS)) {
      const c = (run.win_rates[run.dimension] || {})[g] || {};
      t.append(el("tr", {}, el("td", {}, run.name), el("td", {}, GROUPS[g]),
        el("td", {}, String(c.n_items)), el("td", {}, pct(c.win_rate)),
        el("td", {}, "[" + pct(c.ci_low) + ", " + pct(c.ci_high) + "]")));
    }
    box.append(t);
    document.getElementById("f-run").append(el("option", {value: String(r)}, "run " + r + ": " + run.name));
  });
  document.getElementById("f-run").prepend(el("option", {value: ""}, "all runs"));
  document.getElementById("f-run").value = "";
}
function judgementLine(j, run) {
  const parts = ["order " + j.order + ": "];
  if (j.error) parts.push("failed: " + j.error);
  else parts.push(Object.entries(j.winners || {}).map(([d, w]) => d + " \u2192 " + (w === "tie" ? "tie" : w.toUpperCase() + " (" + run[w] + ")")).join("; "));
  if (j.scores) parts.push("; reward-model scores A " + j.scores.a.toFixed(4) + ", B " + j.scores.b.toFixed(4));
  const line = el("div", {class: "judgement"}, parts.join(""));
  if (j.rationale) line.append(el("div", {class: "meta"}, "rationale: " + j.rationale));
  return line;
}
function render() {
  const main = document.getElementById("items");
  DATA.runs.forEach((run, r) => run.items.forEach(it => {
    const text = [it.persona || "", ...it.context.map(m => m.content),
                  it.answers.a.text || "", it.answers.b.text || "",
                  ...it.judgements.map(j => j.rationale || "")].join("\n").toLowerCase();
    const sec = el("section", {class: "item", "data-run": String(r), "data-turn": it.turn,
                               "data-verdict": it.verdict, "data-disagree": it.disagree ? "1" : "0",
                               "data-item": it.id});
    sec._text = text;
    sec.append(el("div", {class: "meta"},
      el("span", {class: "badge"}, "run " + r + ": " + run.name),
      el("span", {class: "badge"}, GROUPS[it.turn] || it.turn),
      el("span", {class: "badge verdict-" + it.verdict}, VERDICT[it.verdict]),
      it.disagree ? el("span", {class: "badge"}, "orders disagree") : null,
      "item " + it.id + " \u00b7 user " + it.user));
    sec.append(el("div", {class: "persona"}, it.persona ? "Persona: " + it.persona : "No persona."));
    for (const m of it.context) {
      sec.append(el("div", {class: "msg " + m.role}, el("div", {class: "role"}, m.role), m.content));
    }
    const answers = el("div", {class: "answers"});
    for (const k of ["a", "b"]) {
      const ans = it.answers[k];
      answers.append(el("div", {class: "answer answer-" + k + (it.verdict === k ? " won" : "")},
        el("h3", {}, k.toUpperCase() + ": " + run[k]),
        ans.text == null ? el("em", {}, "no answer: " + (ans.error || "?")) : ans.text));
    }
    sec.append(answers);
    for (const j of it.judgements) sec.append(judgementLine(j, run));
    if (it.ground_truth !== null && it.ground_truth !== undefined) {
      sec.append(el("div", {class: "judgement"}, "ground truth: " + JSON.stringify(it.ground_truth)));
    }
    main.append(sec);
  }));
}
function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  document.getElementById("f-run").value = p.get("run") || "";
  document.getElementById("f-turn").value = p.get("turn") || "";
  document.getElementById("f-verdict").value = p.get("verdict") || "";
  document.getElementById("f-disagree").checked = p.get("disagree") === "1";
  document.getElementById("f-q").value = p.get("q") || "";
}
function writeHash() {
  const p = new URLSearchParams();
  const v = id => document.getElementById(id).value;
  if (v("f-run")) p.set("run", v("f-run"));
  if (v("f-turn")) p.set("turn", v("f-turn"));
  if (v("f-verdict")) p.set("verdict", v("f-verdict"));
  if (document.getElementById("f-disagree").checked) p.set("disagree", "1");
  if (v("f-q")) p.set("q", v("f-q"));
  history.replaceState(null, "", "#" + p.toString());
}
function applyFilters() {
  const run = document.getElementById("f-run").value, turn = document.getElementById("f-turn").value;
  const verdict = document.getElementById("f-verdict").value;
  const disagree = document.getElementById("f-disagree").checked;
  const q = document.getElementById("f-q").value.trim().toLowerCase();
  let shown = 0, total = 0;
  for (const sec of document.querySelectorAll("section.item")) {
    total++;
    const ok = (!run || sec.dataset.run === run) && (!turn || sec.dataset.turn === turn) &&
      (!verdict || sec.dataset.verdict === verdict) && (!disagree || sec.dataset.disagree === "1") &&
      (!q || sec._text.includes(q));
    sec.hidden = !ok;
    if (ok) shown++;
  }
  document.getElementById("count").textContent = "showing " + shown + " of " + total + " items";
  document.body.dataset.shown = String(shown);
}
summary();
render();
readHash();
applyFilters();
for (const id of ["f-run", "f-turn", "f-verdict", "f-disagree", "f-q"]) {
  document.getElementById(id).addEventListener("input", () => { writeHash(); applyFilters(); });
}
window.addEventListener("hashchange", () => { readHash(); applyFilters(); });
document.body.dataset.ready = "1";
</script>
</body>
</html>
"""
