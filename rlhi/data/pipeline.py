"""Data-preparation stages over a work directory, each resumable and fully accounted.

    ingest    WildChat rows -> conversations.jsonl, users.jsonl, splits.json

Each stage reads the files of the stages before it from `workdir`, writes its outputs
and a `<stage>_rejects.jsonl`, and a report as `<stage>_report.json` and `.md`. Every
input ends in an output or in the rejects file with a reason. Outputs are written in a
canonical order with sorted keys, so re-running a stage on the same input gives
byte-identical files; reports hold no wall-clock times for the same reason.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import tqdm

from rlhi.data import schema
from rlhi.data import wildchat

CONVERSATIONS = "conversations.jsonl"
USERS = "users.jsonl"
SPLITS = "splits.json"


def write_json(path: str, data: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8", newline="\n") as f:
    json.dump(data, f, ensure_ascii=False, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def write_report(workdir: str, stage: str, report: Mapping[str, Any], markdown: str
                 ) -> None:
  write_json(os.path.join(workdir, f"{stage}_report.json"), report)
  with open(os.path.join(workdir, f"{stage}_report.md"), "w", encoding="utf-8") as f:
    f.write(markdown)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# ingest
# ----------------------------------------------------------------------------------------


def run_ingest(cfg, workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """WildChat rows -> conversations, users and splits in `workdir`; returns the report.

  `cfg` is the `ingest` section of the data-prep config: `source`, `hf_split`,
  `streaming`, and the fields of `wildchat.IngestConfig`.
  """
  cfg = dict(cfg)
  source = cfg.pop("source")
  hf_split = cfg.pop("hf_split", "train")
  streaming = cfg.pop("streaming", False)
  icfg = wildchat.IngestConfig.from_config(cfg)
  os.makedirs(workdir, exist_ok=True)

  rows = wildchat.iter_rows(source, hf_split=hf_split, streaming=streaming)
  if progress:
    rows = tqdm.tqdm(rows, desc="ingest", unit=" rows", mininterval=0.5)
  result = wildchat.ingest(rows, icfg)

  schema.write_jsonl(os.path.join(workdir, CONVERSATIONS), result.conversations)
  schema.write_jsonl(os.path.join(workdir, USERS), result.users)
  schema.write_jsonl(os.path.join(workdir, "ingest_rejects.jsonl"), result.rejects)
  write_json(os.path.join(workdir, SPLITS), {
      "salt": icfg.split_salt,
      "fractions": dict(icfg.split_fractions),
      "user_key": list(icfg.user_key),
      "users": {s: [u.user_id for u in result.users if u.split == s]
                for s in schema.SPLITS},
  })
  report = {"source": source, **result.counts}
  write_report(workdir, "ingest", report, ingest_markdown(report))
  return report


def ingest_markdown(report: Mapping[str, Any]) -> str:
  rejected = report["rejected"]
  lines = [
      "# Ingest report", "",
      f"Source: `{report['source']}`", "",
      f"Rows read: {report['rows_read']}; kept: {report['kept']}; "
      f"rejected: {sum(rejected.values())}; users: {report['users']}.", "",
      "## Rejected rows by reason", "",
      _md_table(["reason", "rows"], [[r, n] for r, n in rejected.items()])
      if rejected else "None.", "",
      "## Users and conversations per split", "",
  ]
  cols = ["users", "users_with_enough_history", "history_conversations",
          "target_conversations", "history_follow_ups", "target_follow_ups"]
  lines.append(_md_table(["split"] + cols, [
      [s] + [report["splits"][s].get(c, 0) for c in cols] for s in schema.SPLITS]))
  lines += ["", "## User turns per kept conversation", "",
            _md_table(["user turns", "conversations"],
                      [[k, v] for k, v in report["user_turns_histogram"].items()]), ""]
  return "\n".join(lines)


STAGES = {"ingest": run_ingest}


def run_stage(stage: str, cfg, workdir: str) -> dict[str, Any]:
  """Runs one stage with its section of the data-prep config."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
  if stage == "ingest":
    return run_ingest(cfg.ingest, workdir)
  return STAGES[stage](cfg, workdir)
