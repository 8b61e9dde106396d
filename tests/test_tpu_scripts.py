"""tpu/*.sh: the gcloud commands they print with --dry-run, their checks, and the
worker-side runner (tpu/remote_run.sh) run here for real.

No gcloud is needed: every command is parsed back from the dry-run output with shlex,
the way a shell would read it.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "tpu")
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh",
           "ssh.sh"]

V5E = ["--accelerator", "v5litepod-8"]
V5P = ["--accelerator", "v5p-64", "--zone", "us-east5-a"]
SLICES = [pytest.param(V5E, "v5litepod-8", "v2-alpha-tpuv5-lite", "us-west4-a", id="v5e-8"),
          pytest.param(V5P, "v5p-64", "v2-alpha-tpuv5", "us-east5-a", id="v5p-64")]

# An experiment command with the awkward parts: a space, both quote kinds, a $ that
# must not be expanded anywhere, a comma list, an empty argument.
EXPERIMENT = ["python", "-m", "experiments.train_dpo",
              "--config", "configs/dpo.py:rewrites,llama3_8b",
              "--config.model.init=gs://b/sft/hf",
              "--config.data.system_template=About \"the\" user's {persona}: $HOME",
              "--workdir", "gs://b/runs/dpo 8b", ""]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("RLHI_TPU_")}
  env.update(extra)
  return env


def _run(script, *args, project="my-proj", env=None, check=True):
  env = _env(**(env or {}))
  argv = ["bash", os.path.join(TPU, script)]
  if project:
    argv += ["--project", project]
  result = subprocess.run([*argv, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60, check=False)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _commands(script, *args, **kw):
  """The printed commands, each split into words as a shell would."""
  out = _run(script, "--dry-run", *args, **kw).stdout
  return [shlex.split(line) for line in out.splitlines() if line.strip()]


def _flag(words, name):
  values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
  assert len(values) == 1, (name, words)
  return values[0]


@pytest.mark.parametrize("slice_args,accelerator,runtime,zone", SLICES)
def test_create_queued_resource(slice_args, accelerator, runtime, zone):
  spot = _commands("create.sh", *slice_args, "--name", "rlhi-a", "--spot")
  create = spot[0]
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create",
                        "rlhi-a"]
  assert _flag(create, "--accelerator-type") == accelerator
  assert _flag(create, "--runtime-version") == runtime
  assert _flag(create, "--zone") == zone
  assert _flag(create, "--project") == "my-proj"
  assert _flag(create, "--node-id") == "rlhi-a"
  assert "--spot" in create
  # Then it waits for ACTIVE by describing the queued resource.
  assert spot[1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]
  assert len(spot) == 2

  on_demand = _commands("create.sh", *slice_args, "--name", "rlhi-a", "--no-wait")
  assert len(on_demand) == 1 and "--spot" not in on_demand[0]


def test_create_plain_vm_and_recreate():
  (vm,) = _commands("create.sh", *V5P, "--mode", "vm", "--spot")
  assert vm[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert _flag(vm, "--version") == "v2-alpha-tpuv5"
  assert _flag(vm, "--accelerator-type") == "v5p-64"
  assert "--spot" in vm
  delete, create, _ = _commands("create.sh", *V5E, "--recreate", "--spot")
  assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete
  assert create[3:5] == ["queued-resources", "create"]


def test_settings_from_environment_and_flags_win():
  env = {"RLHI_TPU_PROJECT": "env-proj", "RLHI_TPU_ACCELERATOR": "v4-32",
         "RLHI_TPU_NAME": "env-tpu", "RLHI_TPU_SPOT": "1"}
  (create, _) = _commands("create.sh", project=None, env=env)
  assert _flag(create, "--project") == "env-proj"
  assert _flag(create, "--accelerator-type") == "v4-32"
  assert _flag(create, "--runtime-version") == "tpu-ubuntu2204-base"
  assert _flag(create, "--zone") == "us-central2-b"
  assert create[5] == "env-tpu" and "--spot" in create
  (create, _) = _commands("create.sh", "--project=flag-proj", "--zone", "us-east5-b",
                          "--runtime=v2-custom", "--accelerator", "v6e-8", project=None,
                          env=env)
  assert _flag(create, "--project") == "flag-proj"
  assert _flag(create, "--zone") == "us-east5-b"
  assert _flag(create, "--runtime-version") == "v2-custom"
  assert _flag(create, "--accelerator-type") == "v6e-8"


@pytest.mark.parametrize("slice_args,accelerator,runtime,zone", SLICES)
def test_setup_copies_and_installs_on_all_workers(slice_args, accelerator, runtime, zone):
  del accelerator, runtime
  tar, scp, unpack, install = _commands("setup.sh", *slice_args, "--name", "rlhi-a")
  assert tar[0] == "tar" and tar[-1] == "." and REPO in tar
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[6] == "rlhi-a:rlhi-code.tgz"
  for cmd in (scp, unpack, install):
    assert "--worker=all" in cmd
    assert _flag(cmd, "--zone") == zone
  assert unpack[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rlhi-a"]
  script = _flag(install, "--command")
  assert "pip install" in script and "-e $HOME/rlhi" in script
  (pip,) = [part for part in script.split(";") if "uv pip install" in part]
  assert "jax[tpu]" in shlex.split(pip)  # quoted for the worker's shell
  # --code-only stops after the copy; a bucket stages the tarball once in GCS.
  assert len(_commands("setup.sh", *slice_args, "--code-only")) == 3
  tar, upload, unpack = _commands("setup.sh", *slice_args, "--code-only",
                                  "--bucket", "my-bucket")
  assert upload[:3] == ["gcloud", "storage", "cp"]
  assert upload[-1].startswith("gs://my-bucket/")
  assert upload[-1] in _flag(unpack, "--command")


@pytest.mark.parametrize("slice_args,accelerator,runtime,zone", SLICES)
def test_launch_runs_the_command_intact_on_all_workers(slice_args, accelerator, runtime,
                                                        zone):
  del accelerator, runtime
  (ssh,) = _commands("launch.sh", *slice_args, "--name", "rlhi-dpo", "--run-name", "r1",
                     "--env", "XLA_FLAGS=--a --b", "--", *EXPERIMENT)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rlhi-dpo"]
  assert "--worker=all" in ssh
  assert _flag(ssh, "--zone") == zone and _flag(ssh, "--project") == "my-proj"
  remote = shlex.split(_flag(ssh, "--command"))  # as the worker's shell reads it
  assert remote[:3] == ["cd", "$HOME/rlhi", "&&"]
  assert remote[3:5] == ["env", "XLA_FLAGS=--a --b"]
  assert remote[5:9] == ["bash", "tpu/remote_run.sh", "--run", "r1"]
  assert remote[remote.index("--") + 1:] == EXPERIMENT


def test_launch_default_run_name_and_sync():
  (ssh,) = _commands("launch.sh", "--", "python", "-m", "experiments.train_sft")
  remote = shlex.split(_flag(ssh, "--command"))
  run = remote[remote.index("--run") + 1]
  assert run.startswith("train_sft-") and len(run) == len("train_sft-20250101-120000")
  cmds = _commands("launch.sh", "--sync", "--run-name", "x", "--", "python", "-V")
  assert [c[0] for c in cmds] == ["tar", "gcloud", "gcloud", "gcloud"]
  assert cmds[-1][4] == "ssh" and "--worker=all" in cmds[-1]


def test_launch_command_survives_the_worker_shell(tmp_path):
  """The --command text, run by bash as the worker would, starts the job with exactly
  the arguments given to launch.sh."""
  (ssh,) = _commands("launch.sh", *V5P, "--run-name", "r1", "--", sys.executable,
                     "-c", "import json, sys; print(json.dumps(sys.argv[1:]))",
                     *EXPERIMENT[3:])
  home = tmp_path / "home"
  (home / "rlhi" / "tpu").mkdir(parents=True)
  shutil.copy(os.path.join(TPU, "remote_run.sh"), home / "rlhi" / "tpu")
  env = _env(HOME=str(home), RLHI_VENV=str(tmp_path / "no-venv"))
  subprocess.run(["bash", "-c", _flag(ssh, "--command")], check=True, env=env,
                 timeout=30, capture_output=True)
  log = home / "rlhi-logs" / "r1.log"
  for _ in range(100):
    if (home / "rlhi-logs" / "r1.exit").exists():
      break
    time.sleep(0.1)
  assert (home / "rlhi-logs" / "r1.exit").read_text().strip() == "0"
  printed = [line for line in log.read_text().splitlines() if line.startswith("[\"")]
  assert json.loads(printed[0]) == EXPERIMENT[3:]


FAKE_GCLOUD = """#!/usr/bin/env bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' gcloud "$@" >>"$GCLOUD_LOG"
if [[ " $* " == *" describe "* ]]; then echo ACTIVE; fi
"""


@pytest.mark.parametrize("script,args", [
    ("create.sh", [*V5E, "--spot", "--recreate"]),
    ("create.sh", [*V5P, "--mode", "vm"]),
    ("setup.sh", [*V5P, "--bucket", "my-bucket"]),
    ("launch.sh", [*V5P, "--run-name", "r1", "--", *EXPERIMENT]),
    ("logs.sh", [*V5P, "--no-follow"]),
    ("stop.sh", [*V5P]),
    ("delete.sh", [*V5P, "--yes"]),
])
def test_dry_run_prints_what_a_real_run_runs(tmp_path, script, args):
  """With a stand-in gcloud on PATH, the real run calls gcloud with exactly the words
  the dry run printed."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path),
         "GCLOUD_LOG": str(tmp_path / "calls.jsonl")}
  printed = [c for c in _commands(script, *args, env=env) if c[0] == "gcloud"]
  _run(script, *args, env=env)
  with open(tmp_path / "calls.jsonl") as f:
    called = [json.loads(line) for line in f]
  if script == "create.sh" and "--recreate" in args:
    # The real run asks whether there is a queued resource to delete first.
    assert called[0][4] == "describe"
    called = called[1:]
  assert called == printed


def test_logs_follow_worker_0_and_status_on_all():
  for slice_args in (V5E, V5P):
    (ssh,) = _commands("logs.sh", *slice_args, "--name", "rlhi-dpo")
    assert ssh[4:6] == ["ssh", "rlhi-dpo"] and "--worker=0" in ssh
    assert _flag(ssh, "--command") == "tail -n 100 -F $HOME/rlhi-logs/latest.log"
  (ssh,) = _commands("logs.sh", "--run", "r1", "--worker", "3", "--no-follow")
  assert "--worker=3" in ssh and _flag(ssh, "--command").endswith("rlhi-logs/r1.log")
  (ssh,) = _commands("logs.sh", "--status")
  assert "--worker=all" in ssh and "--status" in _flag(ssh, "--command")


def test_stop_delete_and_ssh():
  (stop,) = _commands("stop.sh", *V5P, "--wait")
  assert "--worker=all" in stop and "--stop --wait" in _flag(stop, "--command")
  (qr,) = _commands("delete.sh", *V5P, "--name", "rlhi-dpo")
  assert qr[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "rlhi-dpo"]
  assert "--force" in qr and "--quiet" in qr and _flag(qr, "--zone") == "us-east5-a"
  (vm,) = _commands("delete.sh", "--mode", "vm")
  assert vm[3:5] == ["tpu-vm", "delete"]
  (ssh,) = _commands("ssh.sh", "--", "ls", "a b")
  assert "--worker=all" in ssh
  assert shlex.split(_flag(ssh, "--command"))[-2:] == ["ls", "a b"]
  (shell,) = _commands("ssh.sh", "--worker", "2")
  assert "--worker=2" in shell and not any(w.startswith("--command") for w in shell)


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_project_fails_clearly(script):
  command = ["--", "python", "-V"] if script in ("launch.sh", "ssh.sh") else []
  result = _run(script, "--dry-run", *command, project=None, check=False)
  assert result.returncode != 0 and not result.stdout
  assert "no GCP project" in result.stderr and "RLHI_TPU_PROJECT" in result.stderr


@pytest.mark.parametrize("accelerator,message", [
    ("v3-8", "unknown accelerator type 'v3-8'"),
    ("tpu-64", "unknown accelerator type"),
    ("v5litepod-12", "v5e slices have 1, 4, 8"),
    ("v5p-12", "multiple of 8"),
    ("v5p-x", "must be a number"),
])
def test_bad_accelerator_fails_clearly(accelerator, message):
  result = _run("create.sh", "--dry-run", "--accelerator", accelerator, check=False)
  assert result.returncode != 0 and not result.stdout
  assert message in result.stderr


def test_other_mistakes_fail_clearly():
  cases = [
      ("create.sh", ["--zone"], "--zone needs a value"),
      ("create.sh", ["--bogus"], "unknown flag or argument '--bogus'"),
      ("create.sh", ["--name", "Bad_Name"], "name 'Bad_Name'"),
      ("create.sh", ["--zone", "useast"], "is not a GCP zone"),
      ("create.sh", ["--mode", "vm", "--reserved"], "for --mode qr"),
      ("launch.sh", [], "no command"),
      ("launch.sh", ["--env", "1X=2", "--", "x"], "--env takes KEY=VALUE"),
      ("logs.sh", ["--worker", "x"], "--worker takes"),
  ]
  for script, args, message in cases:
    result = _run(script, "--dry-run", *args, check=False)
    assert result.returncode != 0, (script, args)
    assert message in result.stderr, (script, args, result.stderr)
  # Without --dry-run the scripts need gcloud, and say so.
  result = _run("delete.sh", "--yes", check=False,
                env={"PATH": "/usr/bin:/bin"} if not shutil.which("gcloud") else None)
  if not shutil.which("gcloud"):
    assert result.returncode != 0 and "gcloud not found" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  result = _run(script, "--help", project=None)
  assert result.stdout.startswith("Usage: tpu/" + script)
  assert "--dry-run" in result.stdout


def test_shell_syntax_and_shellcheck():
  scripts = sorted(f for f in os.listdir(TPU) if f.endswith(".sh"))
  assert {"common.sh", "remote_run.sh", *SCRIPTS} <= set(scripts)
  for script in scripts:
    result = subprocess.run(["bash", "-n", os.path.join(TPU, script)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, (script, result.stderr)
    with open(os.path.join(TPU, script)) as f:
      text = f.read()
    if script != "common.sh":  # sourced, not run
      assert "set -euo pipefail" in text, script
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (bash -n passed)")
  result = subprocess.run([shellcheck, "-x", *scripts], cwd=TPU, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout


def test_remote_run_start_status_stop(tmp_path):
  """The worker side, here: a job that saves on SIGTERM is started detached, refuses a
  second launch, and tpu/stop.sh's --stop makes it exit cleanly with its code kept."""
  env = _env(RLHI_LOG_DIR=str(tmp_path / "logs"), RLHI_VENV=str(tmp_path / "no-venv"))
  job = tmp_path / "job.py"
  job.write_text(
      "import signal, sys, time\n"
      "def stop(*_):\n"
      "  print('saving', flush=True); sys.exit(0)\n"
      "signal.signal(signal.SIGTERM, stop)\n"
      "print('ready', flush=True)\n"
      "time.sleep(60)\n")
  runner = ["bash", os.path.join(TPU, "remote_run.sh")]

  def remote(*args, check=True):
    return subprocess.run([*runner, *args], env=env, capture_output=True, text=True,
                          check=check, timeout=30)

  assert "started run j1" in remote("--run", "j1", "--", sys.executable, str(job)).stdout
  log = tmp_path / "logs" / "j1.log"
  for _ in range(100):
    if "ready" in log.read_text():
      break
    time.sleep(0.1)
  assert "running: run j1" in remote("--status").stdout
  busy = remote("--run", "j2", "--", "true", check=False)
  assert busy.returncode != 0 and "still running" in busy.stderr
  assert "stopped" in remote("--stop", "--wait").stdout
  assert "saving" in log.read_text()
  assert (tmp_path / "logs" / "j1.exit").read_text().strip() == "0"
  assert "last run j1, exit code 0" in remote("--status").stdout
