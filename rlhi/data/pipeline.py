"""Data-preparation stages over a work directory, each resumable and fully accounted.

    ingest    WildChat rows -> conversations.jsonl, users.jsonl, splits.json
    classify  every user follow-up -> follow_ups.jsonl (label, actionable, feedback)
    persona   each user's history -> personas.jsonl
    rewrites  actionable target follow-ups -> pairs_rewrites.<split>.jsonl and an HF
              DatasetDict in TRL's conversational format (pairs_rewrites_hf/)

The LLM stages ask the inference client of `config.client` (rlhi/data/client/) through
a request cache in `<workdir>/llm_cache.sqlite`: a re-run, or a run resumed after a
crash, sends no request that already succeeded, so resuming is re-running.

`workdir` may be local or remote (gs://bucket/dir, or any path etils.epath supports):
files go through rlhi.fileio, and the SQLite request cache, which needs a real file, is
kept in a local copy that is merged with the workdir's and uploaded back when the
client closes (`make_client`).

Each stage reads the files of the stages before it from `workdir`, writes its outputs
and a `<stage>_rejects.jsonl`, and a report as `<stage>_report.json` and `.md`. Every
input ends in an output or in the rejects file with a reason. Outputs are written in a
canonical order with sorted keys, so re-running a stage on the same input gives
byte-identical files; reports hold no wall-clock times for the same reason.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import sqlite3
import tempfile
from typing import Any, Mapping

import tqdm

from rlhi import fileio
from rlhi import reports
from rlhi import workdir_lock
from rlhi.data import classify
from rlhi.data import client as client_lib
from rlhi.data import files
from rlhi.data import persona
from rlhi.data import prompting
from rlhi.data import rewrites
from rlhi.data import schema
from rlhi.data import wildchat

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
  fileio.makedirs(workdir)

  rows = wildchat.iter_rows(source, hf_split=hf_split, streaming=streaming)
  if progress:
    rows = tqdm.tqdm(rows, desc="ingest", unit=" rows", mininterval=0.5)
  result = wildchat.ingest(rows, icfg)

  schema.write_jsonl(os.path.join(workdir, files.CONVERSATIONS), result.conversations)
  schema.write_jsonl(os.path.join(workdir, files.USERS), result.users)
  schema.write_jsonl(os.path.join(workdir, files.REJECTS.format(stage="ingest")),
                     result.rejects)
  reports.write_json(os.path.join(workdir, files.SPLITS), {
      "salt": icfg.split_salt,
      "fractions": dict(icfg.split_fractions),
      "user_key": list(icfg.user_key),
      "users": {s: [u.user_id for u in result.users if u.split == s]
                for s in schema.SPLITS},
  })
  report = {"source": source, **result.counts}
  reports.write_report(workdir, "ingest", report, ingest_markdown(report))
  return report


def ingest_markdown(report: Mapping[str, Any]) -> str:
  rejected = report["rejected"]
  lines = [
      "# Ingest report", "",
      f"Source: `{report['source']}`", "",
      f"Rows read: {report['rows_read']}; kept: {report['kept']}; "
      f"rejected: {sum(rejected.values())}; users: {report['users']}.", "",
      f"Files skipped (not a supported type): "
      f"{', '.join(f'`{p}`' for p in report.get('skipped_files', [])) or 'none'}.", "",
      "## Rejected rows by reason", "",
      _md_table(["reason", "rows"], [[r, n] for r, n in rejected.items()])
      if rejected else "None.", "",
      "## Users and conversations per split", "",
  ]
  cols = ["users", "users_without_history", "history_conversations",
          "target_conversations", "history_follow_ups", "target_follow_ups"]
  lines.append(_md_table(["split"] + cols, [
      [s] + [report["splits"][s].get(c, 0) for c in cols] for s in schema.SPLITS]))
  lines += ["", "## User turns per kept conversation", "",
            _md_table(["user turns", "conversations"],
                      [[k, v] for k, v in report["user_turns_histogram"].items()]), ""]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# The LLM stages.
# ----------------------------------------------------------------------------------------


def _read(workdir: str, name: str, cls, stage: str):
  del stage  # the error names the stage that makes the file
  return schema.read_jsonl(files.input_path(workdir, name, field="--workdir"), cls)


def make_client(client_cfg, workdir: str, cache_name: str = files.LLM_CACHE
                ) -> client_lib.InferenceClient:
  """The client of `client_cfg` behind the request cache `<workdir>/<cache_name>`.

  SQLite needs a local file. With a remote workdir the cache is a local copy
  (`local_llm_cache`) into which the workdir's cache is merged now, and which goes back
  to the workdir when the client closes; a run killed before that keeps its answers in
  the local copy, and the next run on this machine merges them in again.
  """
  cache = os.path.join(workdir, cache_name)
  if not fileio.is_remote(cache):
    return client_lib.make_client(client_cfg, cache_path=cache)
  local = local_llm_cache(workdir, cache_name)
  _merge_sqlite(cache, local)
  client = client_lib.make_client(client_cfg, cache_path=local)
  close = client.close

  def close_and_upload() -> None:
    close()
    _upload_sqlite(local, cache)

  # An instance attribute: `with client:` (__exit__) and explicit close() both use it.
  client.close = close_and_upload
  return client


def local_llm_cache(workdir: str, cache_name: str = files.LLM_CACHE) -> str:
  """Where the local copy of a remote workdir's request cache lives (one per workdir).

  Under $RLHI_CACHE_DIR, default ~/.cache/rlhi: it outlives the process, so that the
  answers of a run that died before uploading them are not asked for again.
  """
  root = os.environ.get("RLHI_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "rlhi")
  key = hashlib.sha256(os.fspath(workdir).rstrip("/").encode()).hexdigest()[:16]
  return os.path.join(root, "llm_cache", key, cache_name)


def _merge_sqlite(remote: str, local: str) -> None:
  """Adds the rows of the remote SQLite file to the local one (union; keys are hashes
  of the request, so two copies never disagree on a key)."""
  if not fileio.exists(remote):
    return
  os.makedirs(os.path.dirname(local), exist_ok=True)
  if not os.path.exists(local):
    fileio.copy_file(remote, local)
    return
  with tempfile.TemporaryDirectory(prefix="rlhi_") as tmp:
    copy = os.path.join(tmp, files.LLM_CACHE)
    fileio.copy_file(remote, copy)
    conn = sqlite3.connect(local, timeout=60.0, isolation_level=None)
    try:
      conn.execute("ATTACH DATABASE ? AS remote", (copy,))
      tables = [r[0] for r in conn.execute(
          "SELECT name FROM remote.sqlite_master WHERE type = 'table'")]
      local_tables = {r[0] for r in conn.execute(
          "SELECT name FROM main.sqlite_master WHERE type = 'table'")}
      conn.execute("BEGIN")
      for table in tables:
        if table in local_tables:
          conn.execute(f'INSERT OR IGNORE INTO main."{table}" '
                       f'SELECT * FROM remote."{table}"')
      conn.execute("COMMIT")
      conn.execute("DETACH DATABASE remote")
    finally:
      conn.close()


def _upload_sqlite(local: str, remote: str) -> None:
  """Uploads a consistent snapshot (SQLite's backup API: the WAL included, even if
  another connection still has the file open)."""
  if not os.path.exists(local):
    return
  with tempfile.TemporaryDirectory(prefix="rlhi_") as tmp:
    snapshot = os.path.join(tmp, files.LLM_CACHE)
    src, dst = sqlite3.connect(local, timeout=60.0), sqlite3.connect(snapshot)
    try:
      src.backup(dst)
    finally:
      src.close()
      dst.close()
    fileio.copy_file(snapshot, remote)


def reason_code(reason: str) -> str:
  """'near_identical (similarity 0.97 ...)' -> 'near_identical'; 'request failed: x'
  -> 'request_failed'."""
  m = re.match(r"[A-Za-z_ ]+", reason)
  return (m.group(0) if m else "other").strip().replace(" ", "_")


# Reasons that mean the inference itself did not deliver (server down, answers that never
# parse), as opposed to the method setting an item aside (too little history, a rewrite
# that repeats the original): only these count towards `max_failure_fraction`.
INFERENCE_FAILURES = ("request_failed", "invalid_answer", "regeneration_failed")


class StageFailedError(RuntimeError):
  """More of a stage's inference failed than config.max_failure_fraction allows."""


def check_failures(stage: str, asked: int, failures: list[schema.Reject],
                   max_fraction: float, *, where: str, rerun: str) -> None:
  """Raises StageFailedError when more than `max_fraction` of `asked` items failed.

  Called after the stage has written its outputs and report (what succeeded is kept, and
  cached), so the error can point at them. `where` names the report; `rerun` says how
  to heal the failures.
  """
  if not asked or len(failures) <= max_fraction * asked:
    return
  by_reason = collections.Counter(r.reason for r in failures)
  first = "; ".join(f"{r.key}: {r.detail[:200]}" for r in failures[:3])
  raise StageFailedError(
      f"{stage}: {len(failures)} of {asked} items failed at inference "
      f"({100 * len(failures) / asked:.0f}%, above max_failure_fraction={max_fraction}): "
      f"{dict(by_reason)}. First: {first}. Details: {where}. {rerun}")


def _check_stage(cfg, stage: str, asked: int, rejects: list[schema.Reject],
                 workdir: str) -> None:
  check_failures(
      stage, asked, [r for r in rejects if r.reason in INFERENCE_FAILURES],
      cfg.max_failure_fraction,
      where=os.path.join(workdir, f"{stage}_report.md") + " and "
      + os.path.join(workdir, files.REJECTS.format(stage=stage)),
      rerun="Fix the inference server (config.client) and re-run this stage: answers "
      "that passed are cached, so only the failed items are asked again (or raise "
      "--config.max_failure_fraction).")


def rejects_of(source: str, failed: Mapping[str, str], *, numbered: bool = True
               ) -> list[schema.Reject]:
  """One reject per failed item (`line`: its rank by key, or 0); `raw` holds what the
  model answered (each attempt's start, as a JSON list) when the reason carries it
  (prompting.Failure)."""
  return [schema.Reject(source=source, line=i if numbered else 0,
                        reason=reason_code(reason),
                        detail=str(reason), key=key,
                        raw=(json.dumps(list(prompting.answers_of(reason)),
                                        ensure_ascii=False)
                             if prompting.answers_of(reason) else ""))
          for i, (key, reason) in enumerate(sorted(failed.items()), start=1)]


def _rejected(rejects: list[schema.Reject], failed: Mapping[str, str], n: int = 3
              ) -> dict[str, Any]:
  """The report's `rejected` (items by reason code) and `common_failures`: the `n`
  most common kinds of failure (prompting.failure_kind), each with its first item's
  key, reason and what the model answered."""
  by_kind = collections.defaultdict(list)
  for key, reason in sorted(failed.items()):
    by_kind[prompting.failure_kind(reason)].append((key, reason))
  top = sorted(by_kind.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:n]
  return {
      "rejected": dict(collections.Counter(r.reason for r in rejects)),
      "common_failures": [
          {"kind": kind, "items": len(items), "key": items[0][0],
           "reason": str(items[0][1]), "answers": list(prompting.answers_of(items[0][1]))}
          for kind, items in top]}


def _client_section(client: client_lib.InferenceClient) -> dict[str, Any]:
  replicas = client.replica_stats()
  return {"client": client.name, "requests": client.stats(),
          **({"replicas": replicas} if replicas else {})}


def _client_markdown(report: Mapping[str, Any]) -> list[str]:
  s = report["requests"]
  md = ["## Inference", "", f"Client: {report['client']}", "",
        _md_table(["items asked", "HTTP sent", "from cache", "failed", "retries",
                   "prompt tokens", "completion tokens"],
                  [[s["requests"], s["sent"], s["cached"], s["failed"], s["retries"],
                    s["prompt_tokens"], s["completion_tokens"]]]), ""]
  if report.get("replicas"):
    md += [_md_table(["replica", "HTTP sent", "failed attempts"],
                     [[r["url"], r["sent"], r["failed"]] for r in report["replicas"]]),
           ""]
  return md


def _rejects_markdown(report: Mapping[str, Any]) -> list[str]:
  rejected = report["rejected"]
  md = ["## Rejected", "",
        _md_table(["reason", "items"], [[k, v] for k, v in rejected.items()])
        if rejected else "None.", ""]
  if report["common_failures"]:
    # Answers quoted as JSON strings (newlines escaped): a table row stays one line.
    quote = lambda text: json.dumps(text[:160], ensure_ascii=False).replace("|", "\\|")
    md += ["### Most common failures, with an example each", "",
           _md_table(["kind", "items", "example item", "the model answered"],
                     [[f["kind"].replace("|", "\\|"), f["items"], f["key"],
                       " / ".join(quote(a) for a in f["answers"]) or "-"]
                      for f in report["common_failures"]]), "",
           "Every rejected item, with each answer's first "
           f"{prompting.ANSWER_CHARS} characters: the stage's `*_rejects.jsonl` "
           "(`raw`).", ""]
  return md


def run_classify(cfg, workdir: str) -> dict[str, Any]:
  conversations = _read(workdir, files.CONVERSATIONS, schema.Conversation, "classify")
  users = _read(workdir, files.USERS, schema.User, "classify")
  ccfg = classify.ClassifyConfig.from_config(cfg.classify)
  with make_client(cfg.client, workdir) as client:
    follow_ups, failed = classify.classify(client, conversations, users, ccfg)
    report = _client_section(client)
  schema.write_jsonl(os.path.join(workdir, files.FOLLOW_UPS), follow_ups)
  rejects = rejects_of("classify", failed)
  schema.write_jsonl(os.path.join(workdir, files.REJECTS.format(stage="classify")),
                     rejects)

  labels = [name for name, _ in ccfg.labels]
  by_part = {p: collections.Counter(f.label for f in follow_ups if f.part == p)
             for p in ("history", "target")}
  actionable = collections.Counter((f.split, f.part) for f in follow_ups if f.actionable)
  total = collections.Counter((f.split, f.part) for f in follow_ups)
  report.update({
      "follow_ups": len(follow_ups) + len(failed),
      "classified": len(follow_ups),
      **_rejected(rejects, failed),
      "labels": {p: {l: by_part[p][l] for l in labels} for p in by_part},
      "actionable": sum(actionable.values()),
      "actionable_share": round(sum(actionable.values()) / max(1, len(follow_ups)), 4),
      "actionable_by_split": {
          f"{s}/{p}": f"{actionable[s, p]}/{total[s, p]}"
          for s in schema.SPLITS for p in ("history", "target") if total[s, p]},
  })
  md = ["# Follow-up classification", "",
        f"Follow-ups: {report['follow_ups']}; classified: {report['classified']}; "
        f"actionable: {report['actionable']} ({100 * report['actionable_share']:.1f}%).",
        "", "## Labels", "",
        _md_table(["label", "history", "target", "all"],
                  [[l, by_part["history"][l], by_part["target"][l],
                    by_part["history"][l] + by_part["target"][l]] for l in labels]),
        "", "## Actionable by split", "",
        _md_table(["split/part", "actionable/classified"],
                  [[k, v] for k, v in report["actionable_by_split"].items()]), ""]
  md += _rejects_markdown(report) + _client_markdown(report)
  reports.write_report(workdir, "classify", report, "\n".join(md))
  _check_stage(cfg, "classify", report["follow_ups"], rejects, workdir)
  return report


def run_persona(cfg, workdir: str) -> dict[str, Any]:
  conversations = _read(workdir, files.CONVERSATIONS, schema.Conversation, "persona")
  users = _read(workdir, files.USERS, schema.User, "persona")
  pcfg = persona.PersonaConfig.from_config(cfg.persona)
  with make_client(cfg.client, workdir) as client:
    personas, skipped = persona.infer_personas(client, users, conversations, pcfg)
    report = _client_section(client)
  schema.write_jsonl(os.path.join(workdir, files.PERSONAS), personas)
  rejects = rejects_of("persona", skipped)
  schema.write_jsonl(os.path.join(workdir, files.REJECTS.format(stage="persona")),
                     rejects)
  words = [len(p.to_text().split()) for p in personas]
  split_of = {u.user_id: u.split for u in users}
  report.update({
      "users": len(users),
      "personas": len(personas),
      **_rejected(rejects, skipped),
      "personas_by_split": dict(collections.Counter(split_of[p.user_id]
                                                    for p in personas)),
      "mean_words": round(sum(words) / max(1, len(words)), 1),
      "max_words": max(words, default=0),
  })
  md = ["# Personas", "",
        f"Users: {len(users)}; personas built: {len(personas)} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(report['personas_by_split'].items()))}); "
        f"words per persona: mean {report['mean_words']}, max {report['max_words']} "
        f"(cap {pcfg.max_words}).", ""]
  md += _rejects_markdown(report) + _client_markdown(report)
  reports.write_report(workdir, "persona", report, "\n".join(md))
  asked = len(personas) + sum(r.reason in INFERENCE_FAILURES for r in rejects)
  _check_stage(cfg, "persona", asked, rejects, workdir)
  return report


def run_rewrites(cfg, workdir: str) -> dict[str, Any]:
  conversations = _read(workdir, files.CONVERSATIONS, schema.Conversation, "rewrites")
  follow_ups = _read(workdir, files.FOLLOW_UPS, schema.FollowUp, "rewrites")
  personas = {p.user_id: p
              for p in _read(workdir, files.PERSONAS, schema.Persona, "rewrites")}
  rcfg = rewrites.RewriteConfig.from_config(cfg.rewrites)
  policy = (make_client(cfg.policy_client, workdir) if rcfg.rejected == "regenerate"
            else None)
  try:
    with make_client(cfg.client, workdir) as client:
      pairs, failed = rewrites.make_pairs(client, follow_ups, conversations, personas,
                                          rcfg, policy_client=policy)
      report = _client_section(client)
  finally:
    if policy is not None:
      policy.close()
  for split in schema.SPLITS:
    schema.write_jsonl(os.path.join(workdir, files.PAIRS.format(split=split)),
                       [p for p in pairs if p.split == split])
  rejects = rejects_of("rewrites", failed)
  schema.write_jsonl(os.path.join(workdir, files.REJECTS.format(stage="rewrites")),
                     rejects)
  save_pairs_hf(pairs, os.path.join(workdir, files.PAIRS_HF))
  by_split = collections.Counter(p.split for p in pairs)
  report.update({
      "mode": rcfg.mode,
      "rejected_answer": rcfg.rejected,
      "actionable_targets": len(pairs) + len(failed),
      "pairs": len(pairs),
      "pairs_by_split": {s: by_split[s] for s in schema.SPLITS},
      "pairs_without_persona": sum(p.persona is None for p in pairs),
      "pairs_by_label": dict(sorted(collections.Counter(p.label for p in pairs).items())),
      **_rejected(rejects, failed),
  })
  md = ["# User-guided rewrites", "",
        f"Actionable target follow-ups: {report['actionable_targets']}; pairs kept: "
        f"{len(pairs)} (train {by_split['train']}, val {by_split['val']}, test "
        f"{by_split['test']}); without persona: {report['pairs_without_persona']}. "
        f"Mode: {rcfg.mode}; rejected answer: {rcfg.rejected}.", "",
        _md_table(["label", "pairs"], [[k, v] for k, v in
                                        report["pairs_by_label"].items()]), ""]
  md += _rejects_markdown(report) + _client_markdown(report)
  reports.write_report(workdir, "rewrites", report, "\n".join(md))
  _check_stage(cfg, "rewrites", report["actionable_targets"], rejects, workdir)
  return report


def save_pairs_hf(pairs, path: str) -> None:
  """An HF DatasetDict (one split per user split) in TRL's conversational format:
  prompt/chosen/rejected message lists (prompt without the persona), plus persona and
  provenance columns."""
  import datasets  # pylint: disable=g-import-not-at-top  (heavy)
  splits = {}
  for split in schema.SPLITS:
    rows = []
    for p in pairs:
      if p.split != split:
        continue
      row = p.to_trl(with_persona=False)
      row.update(persona=p.persona, pair_id=p.pair_id, user_id=p.user_id,
                 source=p.source, conversation_hash=p.conversation_hash,
                 message_index=p.message_index, label=p.label, feedback=p.feedback)
      rows.append(row)
    features = _pair_features()
    # from_dict, not from_list: a split can be empty and still needs its columns.
    splits[split] = datasets.Dataset.from_dict(
        {name: [r[name] for r in rows] for name in features}, features=features)
  # One shard per split even when empty: datasets cannot load a split of zero shards.
  datasets.DatasetDict(splits).save_to_disk(path, num_shards={s: 1 for s in splits})


def _pair_features():  # pylint: disable=invalid-name
  import datasets  # pylint: disable=g-import-not-at-top
  message = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
  return datasets.Features({
      "prompt": message, "chosen": message, "rejected": message,
      "persona": datasets.Value("string"), "pair_id": datasets.Value("string"),
      "user_id": datasets.Value("string"), "source": datasets.Value("string"),
      "conversation_hash": datasets.Value("string"),
      "message_index": datasets.Value("int64"), "label": datasets.Value("string"),
      "feedback": datasets.Value("string")})


STAGES = {"ingest": run_ingest, "classify": run_classify, "persona": run_persona,
          "rewrites": run_rewrites}


def run_stage(stage: str, cfg, workdir: str) -> dict[str, Any]:
  """Runs one stage with the data-prep config (see configs/data_prep.py)."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
  with workdir_lock.hold(workdir, f"prepare_data --stage {stage}"):
    if stage == "ingest":
      return run_ingest(cfg.ingest, workdir)
    return STAGES[stage](cfg, workdir)
