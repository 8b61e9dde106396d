"""Checkpoints with Orbax: async, keep the latest N plus a permanent one every K steps.

A checkpoint holds the whole TrainState (params, optimizer state, step, RNG) and the
input pipeline's position (JSON), so a resumed run continues exactly. Restoring goes
onto the current mesh from abstract sharded targets (`jax.ShapeDtypeStruct` with
shardings), so a run can resume on a different topology. Orbax writes to a temporary
directory and renames at the end, so a process killed mid-save leaves no half
checkpoint that would be mistaken for a finished one.

Unreadable checkpoints (a truncated or damaged file: disk full, a bad copy, bit rot).
`restore` tries the steps newest first. When an older step restores, every newer step
that failed is moved aside to <directory>.corrupt/<step> (a sibling of the checkpoint
directory, e.g. <workdir>/checkpoints.corrupt/8, where Orbax never looks), with a
warning naming the new path and the error, and the manager re-lists its steps. So the
resumed run can save that step again (Orbax refuses to overwrite a step it lists, and
skips an unforced save of a step not newer than its latest), and the keep policy counts
only readable checkpoints: it never deletes a good one to keep a bad one. Nothing is
deleted; look at or delete <directory>.corrupt yourself. When no step restores at all,
`restore` raises `UnreadableCheckpointError` and moves nothing: that is what a changed
config (other shapes or optimizer) looks like too, and training from scratch over the
old checkpoints would be the wrong fix for it. A step that failed on a transient read
error while an older one was readable is moved aside as well (nothing is lost: it is
under .corrupt and the run resumes from the older step).

Multi-host: every process tries each step, and they agree (an all-gather of
"restored") that a step is readable only if it restored on all of them; only process 0
moves directories, the others wait for it (another all-gather, which also spreads a
failed move) and then all re-list (tested with 2 processes on one machine). Damage
that only some processes see (a data shard that only they read) is untested: the
processes that restored wait in Orbax's own barrier at the end of restore while the
others have moved on to the all-gather; they should meet there once that barrier times
out (its error counts as a failed restore), else the run stops with the barrier's error
and nothing moved. The move uses etils.epath (as Orbax does), so it works
on gs:// too, but there it is a copy plus delete per object, not atomic: a process
killed in the middle leaves the rest under <step>, which the next run finds unreadable
and moves to <step>.1.

Preemption: SIGTERM (what a TPU VM receives before it is taken away) sets a flag; the
loop sees it after the current step, saves, waits for the write and exits 0. On a
multi-host run Orbax's `reached_preemption` agrees on the step across hosts.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from rlhi import sharding

CORRUPT_SUFFIX = ".corrupt"


class UnreadableCheckpointError(RuntimeError):
  """No checkpoint under the directory can be restored onto the given target."""


class Checkpointer:
  """Saves and restores {state, data position} under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0,
               use_async: bool = True):
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_every:
      policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=use_async,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True))
    self.directory = directory

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None = None,
           *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest readable checkpoint as (step, state, data_state); None if there is
    no checkpoint. Newer unreadable steps are moved aside (see the module docstring);
    raises UnreadableCheckpointError if there are checkpoints but none is readable."""
    failed: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      error = ""
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (any unreadable file)
        error = f"{type(e).__name__}: {str(e)[:300]}"
      if not sharding.on_all_processes(not error):
        error = error or "unreadable on another process"
        logging.warning("checkpoint %s/%d cannot be restored (%s); trying the previous "
                        "one", self.directory, step, error)
        failed.append((step, error))
        continue
      for bad, why in failed:
        self._move_aside(bad, why)
      if failed:
        self.manager.reload()
      return step, out.state, dict(out.data)
    if failed:
      raise UnreadableCheckpointError(
          f"no checkpoint under {self.directory} can be restored: "
          + "; ".join(f"step {s}: {e}" for s, e in failed)
          + ". If the config changed (model shapes, optimizer), use a new workdir; if "
          "the checkpoints are damaged, move them away to start from scratch.")
    return None

  def _move_aside(self, step: int, error: str) -> None:
    """Moves the step's directory to <directory>.corrupt/ on process 0; all wait."""
    dst, move_error = None, ""
    if jax.process_index() == 0:
      try:
        dst = move_aside(self.directory, step)
      except Exception as e:  # pylint: disable=broad-except  (reported on every process)
        move_error = f"{type(e).__name__}: {e}"
    if not sharding.on_all_processes(not move_error):
      raise UnreadableCheckpointError(
          f"checkpoint {self.directory}/{step} cannot be restored ({error}) and could "
          f"not be moved aside ({move_error or 'failed on process 0'}); move or delete "
          f"it, then re-run")
    if dst is not None:
      logging.warning("checkpoint %s/%d cannot be restored (%s): moved it to %s; the "
                      "run resumes from an older checkpoint", self.directory, step,
                      error, dst)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def move_aside(directory: str, step: int) -> str:
  """Renames <directory>/<step> to <directory>.corrupt/<step> (or <step>.1, .2, ...
  if taken) with etils.epath (local or remote) and returns the new path."""
  src = epath.Path(directory) / str(step)
  base = epath.Path(str(directory).rstrip("/") + CORRUPT_SUFFIX)
  base.mkdir(parents=True, exist_ok=True)
  dst, n = base / str(step), 0
  while dst.exists():
    n += 1
    dst = base / f"{step}.{n}"
  src.rename(dst)
  return str(dst)


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or abstract values) with the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class SigtermFlag:
  """Set by SIGTERM; `requested` is polled by the loop between steps."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step, then "
                    "exiting")
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def restore_handler(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
