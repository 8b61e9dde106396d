"""Running a config file's sweep: the launcher, per-run status and the summary table
behind experiments/sweep.py (whose docstring describes the command). The sweep itself
(expansion, flags, run names) is rlhi/sweep.py.

    spec = sweep_runner.SweepSpec("experiments.train_reward",
                                  "configs/reward_model.py:tiny", "/tmp/sweep")
    launches = sweep_runner.expand(spec.config, spec.workdir)
    sweep_runner.validate(launches, extra)
    sweep_runner.run_local(spec, launches, extra, parallel=1)
    print(sweep_runner.write_summary(spec, launches))
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import inspect
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
from etils import epath
from ml_collections import config_flags

from rlhi import cli
from rlhi import sweep as hyper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUS_FILE = "sweep_status.json"  # per run: running | finished | failed | interrupted
RUN_LOG = "sweep_run.log"  # per run, local work directories only
SUMMARY = "sweep_summary"  # <workdir>/sweep_summary.{md,json}
METRICS = "metrics.jsonl"  # rlhi/train/metrics.py
EVAL_REPORT = "eval_report.json"  # the trainers' eval reports (rlhi.reports.write_report)


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """What experiments/sweep.py was asked to run (its flags)."""
  experiment: str  # module run per point, e.g. experiments.train_reward
  config: str  # --config value, with its variant
  workdir: str  # run i works in <workdir>/<its name>
  summary_metrics: Sequence[str] = ("train/loss", "eval/*loss", "eval/*accuracy")
  tpu_name: str = ""
  tpu_args: str = ""


@dataclasses.dataclass
class Launch:
  index: int
  name: str
  values: dict[str, Any]  # from get_sweep
  config: str  # --config value
  flags: list[str]  # the swept flags
  workdir: str

  def command(self, python: str, experiment: str, extra: Sequence[str]) -> list[str]:
    # Swept flags last: where `extra` sets the same field, the swept value is the one
    # the summary reports, so it must win.
    return [python, "-m", experiment, f"--config={self.config}",
            f"--workdir={self.workdir}", *extra, *self.flags]


# ---- Expanding the sweep -----------------------------------------------------------


def load_sweep(config: str) -> list[dict[str, Any]]:
  """Calls get_sweep(hyper[, arg]) of the config file named in `config`."""
  path, _, arg = config.partition(":")
  if not os.path.isfile(path):
    raise app.UsageError(f"--config: no file {path!r} (relative to {os.getcwd()})")
  spec = importlib.util.spec_from_file_location("_rlhi_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  get_sweep = getattr(module, "get_sweep", None)
  if get_sweep is None:
    raise app.UsageError(f"{path} defines no get_sweep(hyper); see rlhi/sweep.py")
  takes_arg = len(inspect.signature(get_sweep).parameters) >= 2
  runs = get_sweep(hyper, arg or None) if takes_arg else get_sweep(hyper)
  if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
    sys.exit(f"{path}: get_sweep must return a non-empty list of dicts, got "
             f"{runs!r:.200}")
  return runs


def expand(config: str, workdir: str) -> list[Launch]:
  runs = load_sweep(config)
  names = hyper.run_names(runs)
  return [Launch(i, name, dict(run), hyper.config_spec(config, run), hyper.to_flags(run),
                 os.path.join(workdir, name))
          for i, (name, run) in enumerate(zip(names, runs))]


def config_overrides(args: Sequence[str]) -> list[str]:
  """The --config.* flags among `args` (with their value when it is a separate word)."""
  out = []
  for i, arg in enumerate(args):
    if arg.startswith("--config."):
      out.append(arg)
      if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("-"):
        out.append(args[i + 1])
  return out


def resolve_config(config: str, overrides: Sequence[str]):
  """The ConfigDict an experiment gets from `--config=config *overrides`, built by
  ml_collections exactly as the experiment's own flag parsing does."""
  argv = ["sweep", f"--config={config}", *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                           lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value


def validate(launches: Sequence[Launch], extra: Sequence[str]) -> None:
  common = config_overrides(extra)
  for launch in launches:
    try:
      resolve_config(launch.config, [*common, *config_overrides(launch.flags)])
    except Exception as e:  # noqa: BLE001  (config files raise anything)
      # The error alone: absl's usage text would bury it.
      overrides = [*common, *config_overrides(launch.flags)]
      why = (cli.explain_override(cli.load_config(launch.config), overrides,
                                  launch.config) or f"{type(e).__name__}: {e}")
      sys.exit(f"sweep run {launch.index} ({launch.name}): its config does not build, "
               f"nothing was run.\n  {why}\n  config: {launch.config}"
               f"\n  flags: {shlex.join(launch.flags)}")


# ---- Local runs --------------------------------------------------------------------


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_status(workdir: str) -> dict[str, Any]:
  path = epath.Path(workdir) / STATUS_FILE
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return {"status": "pending"}


def write_status(launch: Launch, command: Sequence[str], **fields: Any) -> None:
  path = epath.Path(launch.workdir)
  path.mkdir(parents=True, exist_ok=True)
  record = {"name": launch.name, "index": launch.index, "values": launch.values,
            "command": list(command), **fields}
  (path / STATUS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _is_local(path: str) -> bool:
  return "://" not in path


def run_local(spec: SweepSpec, launches: Sequence[Launch], extra: Sequence[str],
              parallel: int) -> list[str]:
  """Runs the unfinished launches; returns the status of each launch, in order."""
  statuses = [read_status(l.workdir)["status"] for l in launches]
  pending = [l for l, s in zip(launches, statuses) if s != "finished"]
  for launch, status in zip(launches, statuses):
    if status == "finished":
      print(f"[{launch.index + 1}/{len(launches)}] {launch.name}: finished before, "
            f"skipped", flush=True)
  active: dict[subprocess.Popen, tuple[Launch, list[str], float, Any]] = {}
  stopping = False

  def on_sigterm(signum, frame):
    del signum, frame
    nonlocal stopping
    stopping = True
    for proc in active:
      proc.send_signal(signal.SIGTERM)

  def start(launch: Launch) -> None:
    command = launch.command(sys.executable, spec.experiment, extra)
    write_status(launch, command, status="running", started=_now())
    log = None
    if _is_local(launch.workdir):
      # Closed in finish(), when the run ends.
      log = open(os.path.join(launch.workdir, RUN_LOG), "a", encoding="utf-8")  # noqa: SIM115
    where = f", log: {log.name}" if log else ""
    print(f"[{launch.index + 1}/{len(launches)}] {launch.name}: started{where}",
          flush=True)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT if log else None)
    active[proc] = (launch, command, time.time(), log)

  def finish(proc: subprocess.Popen, rc: int) -> None:
    launch, command, t0, log = active.pop(proc)
    if log:
      log.close()
    status = "interrupted" if stopping else "finished" if rc == 0 else "failed"
    seconds = round(time.time() - t0, 1)
    write_status(launch, command, status=status, returncode=rc, ended=_now(),
                 seconds=seconds)
    statuses[launch.index] = status
    note = "" if rc == 0 else f" (exit code {rc})"
    print(f"[{launch.index + 1}/{len(launches)}] {launch.name}: {status}{note} after "
          f"{seconds} s", flush=True)

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    while (pending and not stopping) or active:
      while pending and not stopping and len(active) < parallel:
        start(pending.pop(0))
      for proc in list(active):
        rc = proc.poll()
        if rc is not None:
          finish(proc, rc)
      time.sleep(0.2)
  except KeyboardInterrupt:
    stopping = True
    for proc in active:
      proc.send_signal(signal.SIGTERM)  # they save a checkpoint before exiting
    for proc in list(active):
      finish(proc, proc.wait())
  finally:
    signal.signal(signal.SIGTERM, previous)
  return statuses


# ---- TPU ---------------------------------------------------------------------------


def tpu_commands(spec: SweepSpec, launches: Sequence[Launch], extra: Sequence[str]
                 ) -> list[list[str]]:
  launch_sh = os.path.join(REPO, "tpu", "launch.sh")
  tpu_args = shlex.split(spec.tpu_args)
  name = spec.tpu_name
  if "{index}" in name:  # one slice per run, all at once
    return [[launch_sh, "--name", name.format(index=l.index), "--run-name",
             f"sweep-{l.name}", *tpu_args, "--",
             *l.command("python", spec.experiment, extra)] for l in launches]
  # The whole sweep on one slice: this program, launcher local, on every worker.
  base = os.path.basename(os.path.normpath(spec.workdir)) or "sweep"
  return [[launch_sh, *(["--name", name] if name else []), "--run-name",
           hyper.run_name({"sweep": base}).replace("=", "-"), *tpu_args, "--",
           "python", "-m", "experiments.sweep", f"--experiment={spec.experiment}",
           f"--config={spec.config}", f"--workdir={spec.workdir}", "--launcher=local",
           f"--summary_metrics={','.join(spec.summary_metrics)}", "--", *extra]]


# ---- Summary -----------------------------------------------------------------------


def _final_metrics(workdir: str) -> tuple[dict[str, float], int | None]:
  """The last value of every metric in metrics.jsonl (appended to across resumes)."""
  path = epath.Path(workdir) / METRICS
  try:
    text = path.read_text()
  except FileNotFoundError:
    return {}, None
  final, step = {}, None
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    step = max(step or 0, int(record.get("step", 0)))
    final.update({k: v for k, v in record.items() if k != "step"})
  return final, step


def _numbers(tree: Any, prefix: str = "") -> dict[str, float]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_numbers(v, f"{prefix}{k}/"))
    return out
  if isinstance(tree, (int, float)) and not isinstance(tree, bool):
    return {prefix.rstrip("/"): float(tree)}
  return {}


def collect(launch: Launch) -> dict[str, Any]:
  status = read_status(launch.workdir)
  metrics, step = _final_metrics(launch.workdir)
  report_path = epath.Path(launch.workdir) / EVAL_REPORT
  try:
    report = _numbers(json.loads(report_path.read_text()))
  except (FileNotFoundError, json.JSONDecodeError):
    report = {}
  return {"name": launch.name, "index": launch.index, "values": launch.values,
          "flags": launch.flags, "workdir": launch.workdir,
          "status": status.get("status", "pending"),
          "returncode": status.get("returncode"), "seconds": status.get("seconds"),
          "step": step, "metrics": metrics, "eval_report": report}


def _format(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  return str(value)


def summary_markdown(spec: SweepSpec, rows: Sequence[dict[str, Any]],
                     patterns: Sequence[str]) -> str:
  keys = hyper.varying_keys([r["values"] for r in rows])
  short = hyper.short_keys(keys)
  names = sorted({m for r in rows for m in r["metrics"]})
  shown = []
  for pattern in patterns:
    shown += [m for m in names if fnmatch.fnmatchcase(m, pattern) and m not in shown]
  header = ["run", *(short[k] for k in keys), "status", "step", *shown]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    status = r["status"]
    if status == "failed":
      status = f"failed (exit code {r['returncode']})"
    cells = [r["name"], *(_format(r["values"].get(k)) for k in keys), status,
             _format(r["step"]), *(_format(r["metrics"].get(m)) for m in shown)]
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  counts: dict[str, int] = {}
  for r in rows:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
  return "\n".join([
      "# Sweep summary", "",
      (f"`{spec.experiment}` with `{spec.config}`: {len(rows)} runs ({tally}), "
       f"each in `{spec.workdir}/<run>`. Metrics are each run's final values "
       f"(metrics.jsonl); all of them, and eval_report.json, are in {SUMMARY}.json."),
      "",
      *lines, ""])


def write_summary(spec: SweepSpec, launches: Sequence[Launch]) -> str:
  rows = [collect(l) for l in launches]
  markdown = summary_markdown(spec, rows, spec.summary_metrics)
  out = epath.Path(spec.workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{SUMMARY}.json").write_text(json.dumps(
      {"experiment": spec.experiment, "config": spec.config,
       "workdir": spec.workdir, "runs": rows}, indent=2, sort_keys=True) + "\n")
  (out / f"{SUMMARY}.md").write_text(markdown)
  return markdown
