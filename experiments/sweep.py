r"""Runs a config file's sweep (its `get_sweep(hyper)`, see rlhi/sweep.py): one run of
an experiment per point, each in its own work directory, then a table of final metrics.

  python -m experiments.sweep --experiment experiments.train_reward \
      --config configs/reward_model.py:tiny --workdir /tmp/rlhi_sweep/reward \
      -- --config.data.dir=/tmp/rlhi_demo/data

Flags after `--` go to every run. Run i works in <workdir>/<its name>, named after the
values it changes (`lr=0.0001,with_persona=False`). Before anything starts, every run's
config is built from its flags exactly as the experiment will build it, so a misspelt
field or a value of the wrong type fails here, not hours later.

Launchers:
  local  (default) the runs one after another (--parallel N at once: CPU only, runs
         cannot share accelerators), with this Python. A run that exits 0 is marked
         finished (<run>/sweep_status.json) and skipped when the same command runs
         again; failed and interrupted runs run again (and resume from their last
         checkpoint). SIGTERM or Ctrl-C passes SIGTERM to the running runs, which save a
         checkpoint and exit: re-run the sweep to continue.
  tpu    through tpu/launch.sh (environment RLHI_TPU_* or --tpu_args set project, zone,
         ...). With --tpu_name NAME the whole sweep runs on that one slice, run after
         run: this same program with --launcher local on every worker, so it resumes the
         same way after a preemption (relaunch it). With a name holding '{index}'
         (rlhi-sweep-{index}) run i goes to its own slice, already created
         (tpu/create.sh --name rlhi-sweep-0 ...), all at once.

--dry_run prints the commands, one per line, and runs nothing. After local runs (or with
--summarize_only, e.g. once a TPU sweep is done) the summary is written to
<workdir>/sweep_summary.md and .json: one row per run with its values, status (failed
runs with their exit code), step, and final metrics: the last value of each metric in
the run's metrics.jsonl plus its eval_report.json if it wrote one.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from absl import app
from absl import flags

from rlhi import cli
from rlhi import sweep_runner as runner


_EXPERIMENT = flags.DEFINE_string(
    "experiment", None, "Module to run, e.g. experiments.train_reward.")
_CONFIG = flags.DEFINE_string(
    "config", None, "Config file with get_sweep, and its arg: configs/x.py[:arg].")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Sweep directory; run i works in <workdir>/<run name>.")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "tpu"], "Where runs go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands; run nothing.")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 1, "local: runs at once (CPU only: runs cannot share accelerators).")
_SUMMARIZE_ONLY = flags.DEFINE_bool(
    "summarize_only", False, "Only (re)write the summary from the runs' directories.")
_TPU_NAME = flags.DEFINE_string(
    "tpu_name", "", "tpu: the slice for the whole sweep (default: tpu/launch.sh's), or "
    "a name with '{index}' for one slice per run.")
_TPU_ARGS = flags.DEFINE_string(
    "tpu_args", "", "tpu: more flags for tpu/launch.sh, e.g. '--zone us-east5-a'.")
_SUMMARY_METRICS = flags.DEFINE_list(
    "summary_metrics", ["train/loss", "eval/*loss", "eval/*accuracy"],
    "Metric names (fnmatch patterns) shown in sweep_summary.md; the .json has all.")
flags.mark_flags_as_required(["experiment", "config", "workdir"])


# ---- Main --------------------------------------------------------------------------


def main(argv):
  extra = list(argv[1:])  # the flags after `--`, for every run
  if _PARALLEL.value < 1:
    raise app.UsageError("--parallel must be at least 1")
  spec = runner.SweepSpec(_EXPERIMENT.value, _CONFIG.value, _WORKDIR.value,
                          tuple(_SUMMARY_METRICS.value), _TPU_NAME.value, _TPU_ARGS.value)
  launches = runner.expand(spec.config, spec.workdir)
  if _SUMMARIZE_ONLY.value:
    print(runner.write_summary(spec, launches))
    return
  runner.validate(launches, extra)

  if _LAUNCHER.value == "tpu":
    commands = runner.tpu_commands(spec, launches, extra)
    for command in commands:
      if _DRY_RUN.value:
        print(shlex.join(command))
      else:
        subprocess.run(command, check=True)
    if not _DRY_RUN.value:
      print(f"launched. When the runs are done: python -m experiments.sweep "
            f"--experiment={_EXPERIMENT.value} --config={_CONFIG.value} "
            f"--workdir={_WORKDIR.value} --summarize_only", flush=True)
    return

  if _DRY_RUN.value:
    for launch in launches:
      done = runner.read_status(launch.workdir)["status"] == "finished"
      line = shlex.join(launch.command(sys.executable, _EXPERIMENT.value, extra))
      print(f"# finished, would be skipped: {line}" if done else line)
    return
  statuses = runner.run_local(spec, launches, extra, _PARALLEL.value)
  print(runner.write_summary(spec, launches), flush=True)
  if any(s != "finished" for s in statuses):
    left = sum(s != "finished" for s in statuses)
    sys.exit(f"{left} of {len(statuses)} runs did not finish; re-run the same command "
             f"to run them again (they resume from their last checkpoints)")


if __name__ == "__main__":
  cli.run(main)
