"""Sweeps: rlhi/sweep.py (expansion, flags, names) and experiments/sweep.py (commands,
local runs that resume and summarize, one real sweep of two SFT runs)."""

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from configs import reward_model
from configs import sft
from rlhi import sweep as hyper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ("hidden_size=64,intermediate_size=128,num_layers=2,num_heads=2,num_kv_heads=1,"
         "head_dim=32")


# ---- rlhi/sweep.py -----------------------------------------------------------------


def test_product_zipit_chainit():
  lrs, personas, seeds = [1e-5, 3e-5, 1e-4], [True, False], [0, 1]
  runs = hyper.product([hyper.sweep("config.optimizer.lr", lrs),
                        hyper.sweep("config.data.with_persona", personas),
                        hyper.sweep("config.seed", seeds)])
  expected = [{"config.optimizer.lr": a, "config.data.with_persona": b, "config.seed": c}
              for a, b, c in itertools.product(lrs, personas, seeds)]
  assert runs == expected  # same order too: the first sweep varies slowest

  zipped = hyper.zipit([hyper.sweep("config.optimizer.lr", lrs),
                        hyper.sweep("config.total_steps", [10, 20, 30]),
                        hyper.fixed("config.seed", 7, length=3)])
  assert zipped == [{"config.optimizer.lr": lr, "config.total_steps": n, "config.seed": 7}
                    for lr, n in zip(lrs, [10, 20, 30])]

  chained = hyper.chainit([hyper.sweep("config.optimizer.lr", lrs),
                           hyper.product([hyper.fixed("config", "tiny,no_persona"),
                                          hyper.sweep("config.seed", seeds)])])
  assert len(chained) == 5
  assert chained[3:] == [{"config": "tiny,no_persona", "config.seed": 0},
                         {"config": "tiny,no_persona", "config.seed": 1}]
  assert hyper.product([]) == [{}]


def test_hyper_mistakes_are_errors():
  with pytest.raises(ValueError, match="different lengths"):
    hyper.zipit([hyper.sweep("config.a", [1, 2]), hyper.sweep("config.b", [1, 2, 3])])
  with pytest.raises(ValueError, match="set twice"):
    hyper.product([hyper.sweep("config.a", [1]), hyper.sweep("config.a", [2])])
  with pytest.raises(ValueError, match="no values"):
    hyper.sweep("config.a", [])
  with pytest.raises(ValueError, match="start with 'config.'"):
    hyper.sweep("optimizer.lr", [1])
  with pytest.raises(ValueError, match="set by the sweep"):
    hyper.sweep("workdir", ["/x"])
  with pytest.raises(ValueError, match="expected"):
    hyper.sweep("config.a b", [1])
  with pytest.raises(TypeError, match="a flag takes"):
    hyper.to_flags({"config.a": {"nested": 1}})


def _parse(config, args):
  """What ml_collections makes of `--config=config *args`: the experiments' parsing,
  set up here independently of experiments/sweep.py."""
  argv = ["prog", f"--config={config}", *args]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                           lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value


def test_flags_parse_back_to_the_values():
  run = {"config.optimizer.lr": 1e-5, "config.optimizer.b2": 0.95,
         "config.data.with_persona": False, "config.model.scan_layers": True,
         "config.total_steps": 123, "config.data.bucket_lengths": (256, 512),
         "config.data.max_length": 384,
         "config.eval_splits": ("val",),
         "config.data.system_template": "It's \"{persona}\", with spaces, $HOME",
         "config.model.overrides": "num_layers=2,hidden_size=64"}
  flag_list = hyper.to_flags(run)
  assert "--config.optimizer.lr=1e-05" in flag_list
  assert "--config.data.with_persona=False" in flag_list
  assert "--config.data.bucket_lengths=(256, 512)" in flag_list
  assert "--config.eval_splits=('val',)" in flag_list
  cfg = _parse("configs/reward_model.py:tiny", flag_list)
  for key, value in run.items():
    got = cfg
    for part in key.split(".")[1:]:
      got = got[part]
    assert got == value and type(got) is type(value), (key, got, value)
  # A command line that went through a shell (the TPU launcher's path) parses the same.
  again = _parse("configs/reward_model.py:tiny", shlex.split(shlex.join(flag_list)))
  assert again.to_dict() == cfg.to_dict()


def test_config_key_selects_the_variant():
  assert hyper.config_spec("configs/sft.py:tiny", {}) == "configs/sft.py:tiny"
  assert hyper.config_spec("configs/sft.py:tiny", {"config": "small,no_persona"}) == (
      "configs/sft.py:small,no_persona")
  assert hyper.config_spec("configs/sft.py", {"config": "configs/dpo.py:live"}) == (
      "configs/dpo.py:live")
  assert hyper.to_flags({"config": "small", "config.seed": 3}) == ["--config.seed=3"]
  cfg = _parse(hyper.config_spec("configs/sft.py:tiny", {"config": "small,no_persona"}),
               [])
  assert cfg.model.name == "small" and not cfg.data.with_persona


def test_run_names_unique_short_and_filesystem_safe():
  runs = hyper.product([
      hyper.sweep("config.optimizer.lr", [1e-5, 3e-5]),
      hyper.sweep("config.data.with_persona", [True, False]),
      hyper.fixed("config.seed", 0),  # the same in every run: left out of names
  ])
  names = hyper.run_names(runs)
  assert names == ["lr=1e-05,with_persona=True", "lr=1e-05,with_persona=False",
                   "lr=3e-05,with_persona=True", "lr=3e-05,with_persona=False"]

  awkward = hyper.chainit([
      hyper.product([hyper.sweep("config.optimizer.lr", [1e-4]),
                     hyper.sweep("config.reference.lr", [1e-4, 2e-4])]),
      hyper.sweep("config.model.init", ["gs://b/m/hf", "/tmp/a b/c,d", "../x"]),
      hyper.sweep("config.data.bucket_lengths", [(256,), (128, 256)]),
      hyper.sweep("config", ["tiny,no_persona"]),
      hyper.sweep("config.data.system_template", ["x" * 300, "x" * 300 + "y"]),
      hyper.sweep("config.seed", [1, 1]),  # identical runs still get distinct names
  ])
  names = hyper.run_names(awkward)
  assert len(set(names)) == len(names) == len(awkward)
  for name in names:
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+,-]*", name), name
    assert len(name) <= hyper.MAX_NAME_LENGTH and name not in (".", "..")
  assert names[0] == "optimizer.lr=0.0001,reference.lr=0.0001"  # clash -> longer keys
  assert "init=gs___b_m_hf" in names[2] and "bucket_lengths=128_256" in names[6]
  assert names[7] == "config=tiny+no_persona"


def test_get_sweep_of_the_configs():
  for config in (sft, reward_model):
    for arg in ("tiny", "llama3_8b"):
      runs = config.get_sweep(hyper, arg)
      default = config.get_config(arg).optimizer.lr
      lrs = sorted({r["config.optimizer.lr"] for r in runs})
      assert len(runs) == 6 and len(lrs) == 3
      assert lrs[0] < default < lrs[2] and default in lrs
      assert {r["config.data.with_persona"] for r in runs} == {True, False}


# ---- experiments/sweep.py ----------------------------------------------------------


def _sweep(*args, env=None, check=True, timeout=60):
  result = subprocess.run([sys.executable, "-m", "experiments.sweep", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_dry_run_prints_one_command_per_run(tmp_path):
  workdir = str(tmp_path / "sw")
  out = _sweep("--experiment", "experiments.train_reward", "--config",
               "configs/reward_model.py:tiny", "--workdir", workdir, "--dry_run", "--",
               "--config.data.dir=/data dir", "--config.total_steps=5").stdout
  commands = [shlex.split(line) for line in out.splitlines()]
  expected = reward_model.get_sweep(hyper, "tiny")
  assert len(commands) == len(expected) == 6
  workdirs = set()
  for words, run in zip(commands, expected):
    assert words[:3] == [sys.executable, "-m", "experiments.train_reward"]
    assert words[3] == "--config=configs/reward_model.py:tiny"
    assert "--config.data.dir=/data dir" in words and "--config.total_steps=5" in words
    assert set(hyper.to_flags(run)) <= set(words)
    (wd,) = [w.split("=", 1)[1] for w in words if w.startswith("--workdir=")]
    assert os.path.dirname(wd) == workdir
    workdirs.add(wd)
  assert len(workdirs) == 6
  assert not os.path.exists(workdir)  # a dry run writes nothing


def test_dry_run_tpu_launchers(tmp_path):
  base = ["--experiment", "experiments.train_reward", "--config",
          "configs/reward_model.py:llama3_8b", "--workdir", "gs://b/sweep", "--dry_run",
          "--launcher", "tpu"]
  (one,) = [shlex.split(line) for line in _sweep(
      *base, "--tpu_name", "rlhi-sweep", "--tpu_args", "--zone us-east5-a", "--",
      "--config.data.dir=gs://b/data").stdout.splitlines()]
  launch_sh = os.path.join(REPO, "tpu", "launch.sh")
  assert one[:3] == [launch_sh, "--name", "rlhi-sweep"] and "us-east5-a" in one
  inner = one[one.index("--") + 1:]
  assert inner[:3] == ["python", "-m", "experiments.sweep"]
  assert "--launcher=local" in inner and "--workdir=gs://b/sweep" in inner
  assert inner[-2:] == ["--", "--config.data.dir=gs://b/data"]

  per_run = [shlex.split(line) for line in _sweep(
      *base, "--tpu_name", "rlhi-sweep-{index}").stdout.splitlines()]
  assert [c[2] for c in per_run] == [f"rlhi-sweep-{i}" for i in range(6)]
  for c in per_run:
    assert c[c.index("--") + 1:][:3] == ["python", "-m", "experiments.train_reward"]


def test_misspelt_field_fails_before_any_run(tmp_path):
  config = tmp_path / "typo.py"
  config.write_text("from configs.sft import get_config  # noqa: F401\n\n"
                    "def get_sweep(hyper):\n"
                    "  return hyper.sweep('config.optimizer.lrr', [1e-3])\n")
  result = _sweep("--experiment", "experiments.train_sft", "--config", str(config),
                  "--workdir", str(tmp_path / "sw"), check=False)
  assert result.returncode != 0 and "lrr" in result.stderr
  assert "does not build" in result.stderr
  assert not (tmp_path / "sw").exists()


# A stand-in experiment: instant, and it fails, succeeds or waits for SIGTERM as told.
FAKE_EXPERIMENT = r'''
import json, os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
workdir, lr = args["workdir"], float(args.get("config.optimizer.lr", 0))
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
  f.write(json.dumps({"step": 1, "train/loss": 2.0, "train/grad_norm": 1.0}) + "\n")
  f.write(json.dumps({"step": 2, "train/loss": 1.5 + lr}) + "\n")
  f.write(json.dumps({"step": 2, "eval/loss": 1.25, "eval/accuracy": 0.75}) + "\n")
if lr == 0.5:
  def stop(*_):
    open(os.path.join(workdir, "got_sigterm"), "w").close()
    sys.exit(0)
  signal.signal(signal.SIGTERM, stop)
  open(os.path.join(workdir, "waiting"), "w").close()
  time.sleep(60)
  sys.exit(5)
with open(os.path.join(workdir, "eval_report.json"), "w") as f:
  json.dump({"val_persona/accuracy": 0.5, "note": "text is left out"}, f)
sys.exit(3 if lr > 0.002 else 0)
'''


@pytest.fixture
def fake(tmp_path):
  (tmp_path / "fake_experiment.py").write_text(FAKE_EXPERIMENT)
  config = tmp_path / "fake_config.py"
  config.write_text("from configs.sft import get_config  # noqa: F401\n\n"
                    "def get_sweep(hyper):\n"
                    "  return hyper.sweep('config.optimizer.lr', [0.001, 0.005])\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
  args = ["--experiment", "fake_experiment", "--config", str(config), "--workdir",
          str(tmp_path / "sw")]
  return tmp_path / "sw", args, env, config


def test_local_sweep_failures_resume_and_summary(fake):
  workdir, args, env, _ = fake
  result = _sweep(*args, env=env, check=False)
  assert result.returncode != 0 and "1 of 2 runs did not finish" in result.stderr
  ok, bad = json.loads((workdir / "lr=0.001" / "sweep_status.json").read_text()), (
      json.loads((workdir / "lr=0.005" / "sweep_status.json").read_text()))
  assert (ok["status"], ok["returncode"], bad["status"], bad["returncode"]) == (
      "finished", 0, "failed", 3)

  md = (workdir / "sweep_summary.md").read_text()
  rows = [line for line in md.splitlines() if line.startswith("| lr=")]
  assert rows == ["| lr=0.001 | 0.001 | finished | 2 | 1.501 | 1.25 | 0.75 |",
                  "| lr=0.005 | 0.005 | failed (exit code 3) | 2 | 1.505 | 1.25 | 0.75 |"]
  assert "| run | lr | status | step | train/loss | eval/loss | eval/accuracy |" in md
  summary = json.loads((workdir / "sweep_summary.json").read_text())
  first = summary["runs"][0]
  assert first["metrics"]["train/grad_norm"] == 1.0  # the .json keeps every metric
  assert first["eval_report"] == {"val_persona/accuracy": 0.5}

  # Again: the finished run is skipped, the failed one runs again.
  again = _sweep(*args, env=env, check=False)
  assert "lr=0.001: finished before, skipped" in again.stdout
  assert "lr=0.005: failed (exit code 3)" in again.stdout
  with open(workdir / "lr=0.001" / "metrics.jsonl") as f:
    assert len(f.readlines()) == 3  # not run twice
  dry = _sweep(*args, "--dry_run", env=env).stdout.splitlines()
  assert dry[0].startswith("# finished, would be skipped: ") and dry[1].startswith("/")

  # --summarize_only rewrites the summary from the directories alone.
  (workdir / "sweep_summary.md").unlink()
  assert "failed (exit code 3)" in _sweep(*args, "--summarize_only", env=env).stdout
  assert (workdir / "sweep_summary.md").exists()


def test_sigterm_passes_to_the_run_and_marks_it_interrupted(fake):
  workdir, args, env, config = fake
  config.write_text("from configs.sft import get_config  # noqa: F401\n\n"
                    "def get_sweep(hyper):\n"
                    "  return hyper.sweep('config.optimizer.lr', [0.5, 0.001])\n")
  proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  waiting = workdir / "lr=0.5" / "waiting"
  deadline = time.time() + 30
  while not waiting.exists() and time.time() < deadline:
    time.sleep(0.1)
  assert waiting.exists()
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode != 0 and "did not finish" in stderr
  assert (workdir / "lr=0.5" / "got_sigterm").exists()  # the run could save and exit
  status = json.loads((workdir / "lr=0.5" / "sweep_status.json").read_text())
  assert status["status"] == "interrupted" and status["returncode"] == 0
  assert not (workdir / "lr=0.001").exists()  # nothing new starts after SIGTERM


# ---- One real sweep ----------------------------------------------------------------




@pytest.mark.slow  # 20-90 s on 2 cores; CI runs it
def test_real_sweep_of_two_sft_runs(tmp_path, data_dir):
  config = tmp_path / "sft_two.py"
  config.write_text("from configs.sft import get_config  # noqa: F401\n\n"
                    "def get_sweep(hyper):\n"
                    "  return hyper.sweep('config.optimizer.lr', [1e-3, 3e-3])\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  workdir = tmp_path / "sw"
  args = ["--experiment", "experiments.train_sft", "--config", f"{config}:steps=2",
          "--workdir", str(workdir), "--parallel", "2", "--",
          f"--config.data.dir={data_dir}", f"--config.model.overrides={SMALL}",
          "--config.data.max_length=256", "--config.data.max_response_length=64",
          "--config.data.bucket_lengths=(256,)", "--config.batch_size=8",
          "--config.log_every=1", "--config.checkpoint.use_async=False"]
  _sweep(*args, env=env, timeout=300)

  summary = json.loads((workdir / "sweep_summary.json").read_text())
  assert [r["name"] for r in summary["runs"]] == ["lr=0.001", "lr=0.003"]
  for run in summary["runs"]:
    assert run["status"] == "finished" and run["step"] == 2
    assert 0 < run["metrics"]["train/loss"] < 20 and 0 < run["metrics"]["eval/loss"] < 20
    assert os.path.isdir(os.path.join(run["workdir"], "hf"))  # the run's own export
  md = (workdir / "sweep_summary.md").read_text()
  rows = [line.split(" | ") for line in md.splitlines() if line.startswith("| lr=")]
  assert len(rows) == 2
  for row in rows:
    assert row[2] == "finished" and row[3] == "2"
    float(row[4]), float(row[5].rstrip(" |"))  # train/loss, eval/loss are numbers
  again = _sweep(*args, env=env)
  assert again.stdout.count("finished before, skipped") == 2
