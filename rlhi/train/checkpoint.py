"""Checkpoints with Orbax: async, keep the latest N plus a permanent one every K steps.

A checkpoint holds the whole TrainState (params, optimizer state, step, RNG) and the
input pipeline's position (JSON), so a resumed run continues exactly. Restoring goes
onto the current mesh from abstract sharded targets (`jax.ShapeDtypeStruct` with
shardings), so a run can resume on a different topology. A latest checkpoint that
cannot be read falls back to the one before it, with a warning; Orbax writes to a
temporary directory and renames at the end, so a process killed mid-save leaves no
half checkpoint that would be mistaken for a finished one.

Preemption: SIGTERM (what a TPU VM receives before it is taken away) sets a flag; the
loop sees it after the current step, saves, waits for the write and exits 0. On a
multi-host run Orbax's `reached_preemption` agrees on the step across hosts.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


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
    """The newest readable checkpoint as (step, state, data_state), or None."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (any unreadable file)
        logging.warning("checkpoint %s/%d cannot be restored (%s: %s); falling back "
                        "to the previous one", self.directory, step, type(e).__name__,
                        str(e)[:300])
        continue
      return step, out.state, dict(out.data)
    return None

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
