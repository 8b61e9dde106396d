"""One writer per work directory: every data stage, trainer and evaluation holds a lock.

Two runs on one work directory would interleave their writes (a `conversations.jsonl`
matching neither run, a complete result replaced by a partial one), so the second run
stops at once with an error that names the holder:

    /tmp/rlhi/data is in use by `prepare_data --stage classify` (pid 4242 on host
    tpu-vm-0, since 2026-12-02T11:40:03Z; ...); wait for it to end or use another --workdir

Local directories: `<workdir>/.rlhi.lock` is held with `fcntl.flock`. The kernel releases
the lock when its holder exits, however it exits (SIGKILL included), so a stale lock
cannot exist: the file that a dead run leaves behind is simply locked again. The file
holds the holder's host, pid, command and start time for the error message. flock is
reliable on local disks; on NFS it depends on the mount (use a local or gs:// workdir).

Remote directories (gs://...): object stores have no locks, and etils.epath exposes no
generation preconditions, so the rule is documented single-writer with a best-effort
check: the lock object `<workdir>/.rlhi.lock` is read, and the run stops with the same
error if another holder wrote it; otherwise the run writes its own and removes it at the
end. Two runs started within one round trip of each other can both pass the check. A
run killed without cleanup leaves the object behind; the error then says to delete it
when its holder is known to be dead (same host: a dead pid is detected and taken over).

The lock is re-entrant within a process (`prepare_data --stage all` holds it for every
stage it runs). On a multi-host run only process 0 takes it: the processes of one run
share the work directory by design.

Never imports jax: the data package uses it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator

from rlhi import fileio

LOCK_FILE = ".rlhi.lock"

_held: dict[str, int] = {}  # lock path -> depth, for re-entrant use in one process


class WorkdirBusyError(RuntimeError):
  """Another run holds the work directory."""


def _holder_info(command: str) -> dict[str, object]:
  return {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
          "argv": " ".join(os.path.basename(a) if i == 0 else a
                           for i, a in enumerate(sys.argv)),
          "since": datetime.datetime.now(datetime.timezone.utc).strftime(
              "%Y-%m-%dT%H:%M:%SZ")}


def _describe(workdir: str, lock_path: str, text: str) -> str:
  try:
    h = json.loads(text)
    who = (f"`{h['command']}` (pid {h['pid']} on host {h['host']}, since {h['since']}; "
           f"command line: {h.get('argv', '?')})")
  except (ValueError, KeyError, TypeError):
    who = f"another run (lock file {lock_path} holds no readable owner)"
  return (f"{workdir} is in use by {who}; wait for it to end or use another --workdir. "
          f"Two runs on one work directory would overwrite each other's files.")


@contextlib.contextmanager
def hold(workdir: str, command: str, *, enabled: bool = True) -> Iterator[None]:
  """Holds the lock of `workdir` (created if missing) for the block; see the module doc.

  `command` names this run in the other run's error (e.g. 'train_dpo'). With
  enabled=False (processes other than 0 of a multi-host run) it does nothing.
  """
  if not enabled:
    yield
    return
  fileio.makedirs(workdir)
  path = os.path.join(os.fspath(workdir), LOCK_FILE)
  if path in _held:
    _held[path] += 1
    try:
      yield
    finally:
      _held[path] -= 1
    return
  release = (_remote_acquire if fileio.is_remote(path) else _local_acquire)(
      os.fspath(workdir), path, command)
  _held[path] = 1
  try:
    yield
  finally:
    del _held[path]
    release()


def _local_acquire(workdir: str, path: str, command: str):
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      os.close(fd)
      raise
    text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
    os.close(fd)
    raise WorkdirBusyError(_describe(workdir, path, text)) from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(_holder_info(command), sort_keys=True).encode(), 0)

  def release() -> None:
    # The file stays (removing it would race with a run that just opened it); closing
    # the descriptor releases the lock.
    os.ftruncate(fd, 0)
    os.close(fd)

  return release


def _remote_acquire(workdir: str, path: str, command: str):
  if fileio.exists(path):
    text = fileio.read_bytes(path).decode("utf-8", "replace")
    if not _dead_on_this_host(text):
      raise WorkdirBusyError(
          _describe(workdir, path, text) + f" If that run is dead, delete {path}.")
  mine = json.dumps(_holder_info(command), sort_keys=True).encode()
  fileio.write_bytes(path, mine)

  def release() -> None:
    with contextlib.suppress(OSError, FileNotFoundError):
      if fileio.read_bytes(path) == mine:
        fileio.remove(path)

  return release


def _dead_on_this_host(text: str) -> bool:
  """True when the lock names a process of this host that no longer runs."""
  try:
    h = json.loads(text)
    if h["host"] != socket.gethostname():
      return False
    os.kill(int(h["pid"]), 0)
  except ProcessLookupError:
    return True
  except (ValueError, KeyError, TypeError, PermissionError):
    return False
  return False
