"""Work directories, failures and errors: nothing is lost, nothing fails silently.

Each test reproduces a problem a user met (two runs on one work directory, a run whose
requests all failed exiting 0, a misspelled override ending in tracebacks) with real
processes, files and HTTP.
"""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from configs import data_prep
from configs import eval as eval_config
from rlhi import cli
from rlhi import fileio
from rlhi import workdir_lock
from rlhi.data import files
from rlhi.data import pipeline
from rlhi.data import schema
from rlhi.eval import usereval
from rlhi.testing.openai_server import OpenAIServer

from tests import test_training as tt

REPO = tt.REPO


def _env():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device is enough for these commands
  return env


def _prepare_data(workdir, *flags, stage="ingest"):
  return subprocess.run(
      [sys.executable, "-m", "experiments.prepare_data",
       "--config", "configs/data_prep.py:sample", f"--workdir={workdir}",
       f"--stage={stage}", "--noprint_report", *flags],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------
# One writer per work directory.
# ----------------------------------------------------------------------------------------


def test_a_second_run_on_a_busy_workdir_stops_naming_the_holder(tmp_path):
  workdir = tmp_path / "data"
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time\n"
       "from rlhi import workdir_lock\n"
       "with workdir_lock.hold(sys.argv[1], 'train_dpo'):\n"
       "  print('held', flush=True)\n"
       "  time.sleep(600)\n", str(workdir)],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    busy = _prepare_data(workdir)
    assert busy.returncode == 1, busy.stderr[-2000:]
    assert f"is in use by `train_dpo` (pid {holder.pid} on host" in busy.stderr
    assert "Traceback" not in busy.stderr
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_FILE]  # nothing written
  finally:
    holder.send_signal(signal.SIGKILL)  # dies holding the lock
    holder.wait()
  # The kernel released the dead holder's lock: the next run needs no clean-up.
  done = _prepare_data(workdir)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (workdir / files.CONVERSATIONS).exists()


def test_the_lock_is_reentrant_in_one_process_and_excludes_another(tmp_path):
  d = str(tmp_path)
  with workdir_lock.hold(d, "outer"):
    with workdir_lock.hold(d, "inner"):  # `--stage all` -> run_stage
      pass
    other = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom rlhi import workdir_lock\n"
         "with workdir_lock.hold(sys.argv[1], 'x'): pass", d],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and "WorkdirBusyError" in other.stderr
    assert "`outer`" in other.stderr
  with workdir_lock.hold(d, "again"):  # released
    pass


def test_concurrent_atomic_writes_of_one_path_never_mix(tmp_path):
  """Every writer used to share `<path>.tmp`: writers died on each other's rename and
  the survivor's file could hold another writer's bytes."""
  path = str(tmp_path / "out.jsonl")
  contents = {w: "".join(f'{{"writer": {w}, "row": {i}}}\n' for i in range(2000))
              for w in range(6)}
  errors = []

  def write(w):
    try:
      for _ in range(15):
        with fileio.atomic_write(path) as f:
          for line in contents[w].splitlines(keepends=True):
            f.write(line)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=write, args=(w,)) for w in contents]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  with open(path, encoding="utf-8") as f:
    assert f.read() in contents.values()
  assert os.listdir(tmp_path) == ["out.jsonl"]  # no temporary file left


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
  path = tmp_path / "x.json"
  with pytest.raises(UnicodeEncodeError):
    with fileio.atomic_write(str(path)) as f:
      f.write("ok\n")
      f.write("\ud83d")
  assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------
# A run that mostly failed does not exit 0.
# ----------------------------------------------------------------------------------------


def _failing_client(cfg, server):
  cfg.client.backend = "openai"
  cfg.client.base_url = server.base_url
  cfg.client.model = "m"
  cfg.client.api_key_env = ""
  cfg.client.max_retries = 0
  return cfg


def test_a_stage_over_its_failure_budget_writes_its_report_then_fails(tmp_path):
  cfg = data_prep.get_config("sample")
  pipeline.run_stage("ingest", cfg, str(tmp_path))
  with OpenAIServer(lambda body: "{}", permanent=lambda body: "500") as server:
    cfg = _failing_client(cfg, server)
    with pytest.raises(pipeline.StageFailedError) as e:
      pipeline.run_stage("classify", cfg, str(tmp_path))
  with open(tmp_path / "classify_report.json", encoding="utf-8") as f:
    report = json.load(f)
  n = report["follow_ups"]
  assert n > 0 and report["rejected"] == {"request_failed": n}
  assert f"classify: {n} of {n} items failed at inference (100%" in str(e.value)
  assert "HTTP 500" in str(e.value)
  # Under the budget the same failures are counted, and the stage succeeds.
  with OpenAIServer(lambda body: "{}", permanent=lambda body: "500") as server:
    cfg = _failing_client(cfg, server)
    cfg.max_failure_fraction = 1.0
    assert pipeline.run_stage("classify", cfg, str(tmp_path))["classified"] == 0


def test_prepare_data_all_stops_at_a_failed_stage_with_a_non_zero_exit(tmp_path):
  with OpenAIServer(lambda body: "{}", permanent=lambda body: "500") as server:
    run = _prepare_data(
        tmp_path, "--config.client.backend=openai",
        f"--config.client.base_url={server.base_url}", "--config.client.model=m",
        "--config.client.api_key_env=", "--config.client.max_retries=0", stage="all")
  assert run.returncode == 1, run.stderr[-2000:]
  assert "ERROR: classify:" in run.stderr and "Traceback" not in run.stderr
  assert (tmp_path / "classify_report.md").exists()
  assert not (tmp_path / "persona_report.md").exists()  # stopped there


def test_usereval_with_no_judge_server_fails_after_its_report(data_dir, tmp_path):
  with OpenAIServer(lambda body: "{}") as server:
    dead = server.base_url  # nothing listens there once the server stops
  cfg = eval_config.get_config("max_items=6")
  cfg.data.dir = data_dir
  cfg.systems.b = cfg.systems.a  # two systems that need no model
  c = cfg.judge.client
  c.base_url, c.model, c.max_retries, c.timeout_s = dead, "judge", 0, 5.0
  with pytest.raises(pipeline.StageFailedError,
                     match=r"usereval judge: 12 of 12 items failed at inference"):
    usereval.run_usereval(cfg, str(tmp_path))
  judgements = schema.read_jsonl(tmp_path / usereval.REJECTS_FILE, schema.Reject)
  assert len(judgements) == 12 and {r.reason for r in judgements} == {"request_failed"}


# ----------------------------------------------------------------------------------------
# Errors that say what to fix.
# ----------------------------------------------------------------------------------------


def test_a_misspelled_override_names_the_flag_and_the_closest_fields():
  run = subprocess.run(
      [sys.executable, "-m", "experiments.train_sft", "--config=configs/sft.py:tiny",
       "--config.steps=10", "--workdir=/nonexistent/never_made"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert run.returncode == 1
  assert ("--config.steps=10: configs/sft.py:tiny has no field 'steps'; did you mean "
          "--config.total_steps") in run.stderr
  assert "Traceback" not in run.stderr
  assert not os.path.exists("/nonexistent/never_made")


@pytest.mark.parametrize("argv, want", [
    (["--config.loss.betta=0.2"],
     "--config.loss.betta=0.2: configs/dpo.py has no field 'loss.betta'; did you mean "
     "--config.loss.beta? Fields of config.loss: beta, "),
    (["--config.total_steps.x=1"],
     "--config.total_steps.x=1: config.total_steps in configs/dpo.py is a value (int), "
     "not a section with field 'x'"),
    (["--config.total_steps=3", "--config.optimiser.lr=1"],
     "--config.optimiser.lr=1: configs/dpo.py has no field 'optimiser'; did you mean "
     "--config.optimizer?"),
    (["--config.total_steps=3"], None),
])
def test_explain_override(argv, want):
  config = cli.load_config("configs/dpo.py")
  got = cli.explain_override(config, argv, "configs/dpo.py")
  assert (got is None) if want is None else got.startswith(want), got


def test_a_missing_data_dir_names_the_command_that_makes_it(tmp_path):
  missing = str(tmp_path / "no_data")
  with pytest.raises(files.MissingInputError) as e:
    files.input_path(missing, files.PAIRS.format(split="train"))
  assert str(e.value).startswith(
      f"{missing}/pairs_rewrites.train.jsonl not found: make it with `python -m "
      f"experiments.prepare_data --config configs/data_prep.py:sample --workdir "
      f"{missing} --stage rewrites`")
  assert "point config.data.dir at a data-prep directory" in str(e.value)
  run = subprocess.run(
      [sys.executable, "-m", "experiments.train_dpo", "--config=configs/dpo.py:rewrites",
       f"--config.data.dir={missing}", f"--workdir={tmp_path / 'dpo'}"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert run.returncode == 1
  assert f"ERROR: {missing}/pairs_rewrites.train.jsonl not found" in run.stderr
  assert "Traceback" not in run.stderr
