"""Nothing lost, nothing silent: unreadable checkpoints and metrics after a resume.

The whole loop runs in process on test_train_core's toy task (a second per run): train
to step 8 with a checkpoint every 2 steps and keep=2, damage the newest checkpoint,
re-run. The damaged step must be moved aside (not deleted, not kept in the step list),
the re-run must complete and equal an uninterrupted run bit for bit, and the keep
policy must never have kept a bad checkpoint in place of a good one.
"""

import glob
import json
import os

import jax
import numpy as np
import pytest

from rlhi import fileio
from rlhi.train import checkpoint as ckpt_lib
from rlhi.train import loop
from rlhi.train import metrics as metrics_lib
from tests import test_train_core as tc
from tests import test_training as tt
from tests.test_remote_paths import gcs  # pylint: disable=unused-import  (fixture)


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _truncate_data(step_dir):
  """Halves the state's array data files (the merged OCDBT data under state/d/)."""
  files = glob.glob(os.path.join(step_dir, "state", "d", "*"))
  assert files, os.listdir(os.path.join(step_dir, "state"))
  for f in files:
    _truncate(f)


def _truncate_metadata(step_dir):
  _truncate(os.path.join(step_dir, "state", "_METADATA"))


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit())


def _readable(workdir, step):
  try:
    tt._final_state(workdir, step)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def _train(workdir, total):
  cfg = tc.toy_config(total, log_every=1, keep=2, use_async=True)
  return loop.train(cfg, str(workdir), tc.toy_task())


# Orbax/tensorstore's asyncio callbacks after the failed read of the damaged data file.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage,total", [(_truncate_data, 8), (_truncate_metadata, 12)],
                         ids=["data_file_same_total", "metadata_longer_run"])
def test_unreadable_newest_checkpoint_is_moved_aside(tmp_path, monkeypatch, damage,
                                                     total):
  ref = _train(tmp_path / "ref", total)

  work = tmp_path / "work"
  _train(work, 8)
  assert _steps(work) == [6, 8]
  damage(str(work / "checkpoints" / "8"))
  assert not _readable(work, 8)

  # After every save of the re-run: the checkpoints on disk (all must be readable).
  listings = []
  save = ckpt_lib.Checkpointer.save

  def save_and_list(self, step, *args, **kwargs):
    out = save(self, step, *args, **kwargs)
    self.wait()
    listings.append({s: _readable(work, s) for s in _steps(work)})
    return out

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_and_list)
  warnings = []
  monkeypatch.setattr(ckpt_lib.logging, "warning",
                      lambda msg, *args, **kw: warnings.append(msg % args))
  result = _train(work, total)

  assert result.step == total and not result.preempted
  # Never a bad checkpoint on disk in place of a good one (keep=2: two good ones).
  assert listings and all(all(ok.values()) and len(ok) == 2 for ok in listings), listings
  moved = tmp_path / "work" / "checkpoints.corrupt" / "8"
  assert moved.is_dir() and (moved / "state").is_dir()
  assert any(str(moved) in w and "Error" in w for w in warnings), warnings
  assert _steps(work) == [total - 2, total]
  tt._assert_trees_equal(tt._final_state(work, total),  # pylint: disable=protected-access
                         tt._final_state(tmp_path / "ref", total))
  tt._assert_trees_equal(result.state, ref.state)  # pylint: disable=protected-access
  # metrics.jsonl: the steps logged again after the resume replace the old lines.
  steps = [m["step"] for m in tt._metrics(work)]  # pylint: disable=protected-access
  assert steps == list(range(1, total + 1))

  # A re-run of the finished run restores the last step and moves nothing more.
  assert _train(work, total).step == total
  assert os.listdir(tmp_path / "work" / "checkpoints.corrupt") == ["8"]


def test_no_readable_checkpoint_raises_and_moves_nothing(tmp_path):
  _train(tmp_path, 8)
  for step in (6, 8):
    _truncate_metadata(str(tmp_path / "checkpoints" / str(step)))
  with pytest.raises(ckpt_lib.UnreadableCheckpointError, match="step 8: .*step 6: "):
    _train(tmp_path, 10)
  assert _steps(tmp_path) == [6, 8]
  assert not os.path.exists(tmp_path / "checkpoints.corrupt")


@pytest.mark.slow
def test_two_processes_agree_to_move_an_unreadable_checkpoint_aside(data_dir, tmp_path):
  """The reward model's entry point on 2 processes: every process fails to read the
  damaged step, they agree, process 0 moves it, and the re-run exports its model."""
  work = str(tmp_path / "two")
  cmd = tt._reward_cmd(data_dir, work, 4)  # pylint: disable=protected-access
  tt.run_on_two_processes(cmd)
  assert _steps(work) == [2, 4]
  _truncate_metadata(os.path.join(work, "checkpoints", "4"))
  tt.run_on_two_processes(cmd)
  assert os.path.isdir(os.path.join(work, "checkpoints.corrupt", "4"))
  assert _steps(work) == [2, 4] and _readable(work, 4)
  assert os.path.isdir(os.path.join(work, "reward_model"))
  logged = _read(os.path.join(work, "metrics.jsonl"))
  assert len(logged) == len(set(logged)), logged
  assert [s for s, p in logged if p == "train"] == [1, 2, 3, 4]


def test_move_aside_numbers_repeats_and_works_on_gcs(gcs, tmp_path):
  del tmp_path
  for name in ("8/state/_METADATA", "8/commit_success.txt"):
    with fileio.open(f"gs://b/run/checkpoints/{name}", "w") as f:
      f.write("x")
  assert ckpt_lib.move_aside("gs://b/run/checkpoints", 8) == (
      "gs://b/run/checkpoints.corrupt/8")
  with fileio.open("gs://b/run/checkpoints/8/state/_METADATA", "w") as f:
    f.write("y")
  assert ckpt_lib.move_aside("gs://b/run/checkpoints", 8) == (
      "gs://b/run/checkpoints.corrupt/8.1")
  assert sorted(k for k in gcs if k.startswith("/b/run/")) == [
      "/b/run/checkpoints.corrupt/8.1/state/_METADATA",
      "/b/run/checkpoints.corrupt/8/commit_success.txt",
      "/b/run/checkpoints.corrupt/8/state/_METADATA"]


# ----------------------------------------------------------------------------------------
# metrics.jsonl after a resume
# ----------------------------------------------------------------------------------------


def _lines(steps_and_prefixes):
  return "".join(json.dumps({"step": s, f"{p}/loss": float(s)}, sort_keys=True) + "\n"
                 for s, p in steps_and_prefixes)


def _read(path):
  with fileio.open(path) as f:
    return [(m["step"], next(k for k in m if k != "step").split("/")[0])
            for m in map(json.loads, f)]


@pytest.mark.parametrize("remote", [False, True])
def test_metric_writer_drops_steps_after_the_resumed_one(gcs, tmp_path, remote):
  workdir = "gs://b/run" if remote else str(tmp_path / "run")
  fileio.makedirs(workdir)
  path = f"{workdir}/metrics.jsonl"
  # Logged up to step 7 (eval at 4 and 6) and killed mid-line; the checkpoint is at 6.
  old = _lines([(s, "train") for s in range(1, 5)] + [(4, "eval")]
               + [(s, "train") for s in range(5, 7)] + [(6, "eval"), (7, "train")])
  with fileio.open(path, "w") as f:
    f.write(old + '{"step": 8, "tra')
  w = metrics_lib.MetricWriter(workdir, 10, initial_step=6, enabled=True)
  # Rewritten once, at open (also remotely): a kill now loses nothing that was kept.
  assert _read(path) == ([(s, "train") for s in range(1, 5)] + [(4, "eval")]
                         + [(5, "train"), (6, "train"), (6, "eval")])
  for s in (7, 8):
    w.write(s, {"loss": float(s)})
  w.write(8, {"loss": 1.0}, prefix="eval")
  w.close()
  got = _read(path)
  assert got[-3:] == [(7, "train"), (8, "train"), (8, "eval")]
  assert len(got) == len(set(got)) == 11


def test_metric_writer_replaces_a_line_logged_again_at_the_resumed_step(tmp_path):
  """A finished run re-run: it restores the last step and logs the final eval again."""
  workdir = str(tmp_path)
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write(_lines([(1, "train"), (2, "train"), (2, "eval")]))
  w = metrics_lib.MetricWriter(workdir, 2, initial_step=2, enabled=True)
  w.write(2, {"loss": 0.5}, prefix="eval")
  w.close()
  assert _read(str(tmp_path / "metrics.jsonl")) == [(1, "train"), (2, "train"),
                                                    (2, "eval")]
  with open(tmp_path / "metrics.jsonl") as f:
    assert json.loads(f.readlines()[-1])["eval/loss"] == 0.5
