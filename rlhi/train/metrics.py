"""Metrics out of the training loop: TensorBoard (tensorboardX), JSONL and a progress bar.

Only process 0 writes; the other processes get a writer that does nothing, so the loop
has no `if process_index == 0` of its own. Values are fetched from the device once per
log step with one `jax.device_get` of the whole dict.

The workdir may be remote (gs://..., any path etils.epath supports). Objects there cannot
be appended to, and tensorboardX writes gs:// only through google-cloud-storage (S3 via
boto3), so with a remote workdir both files are written to a local temporary directory
and uploaded whole (only the files that grew) at most every `sync_secs` seconds, on
`flush()` and on `close()`. A resumed run first downloads the existing metrics.jsonl and
appends to it, as a local run does. A process killed without `close()` loses at most the
last `sync_secs` seconds of metrics on the remote copy.

Resuming: a run resumed from the checkpoint of step `initial_step` logs again every step
after it, so on open the existing metrics.jsonl loses its lines with a step after
`initial_step` (and a last line cut short by a kill), rewritten once, atomically (a
temporary file renamed over it; remotely, uploaded whole right away). A line at
`initial_step` itself that is logged again (the final evaluation of a finished run that
is re-run) replaces the old one. So each (step, prefix) appears once, with the values of
the run that the checkpoints continue. TensorBoard gets the same effect from
tensorboardX's `purge_step`: on load it drops the older events after `initial_step`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import tqdm

from rlhi import fileio

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class MetricWriter:
  """Writes scalars to <workdir>/tb (TensorBoard) and <workdir>/metrics.jsonl."""

  def __init__(self, workdir: str, total_steps: int, *, initial_step: int = 0,
               desc: str = "train", enabled: bool | None = None,
               sync_secs: float = 60.0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = self._jsonl = self._bar = None
    self._workdir = workdir
    self._local = None  # local mirror of a remote workdir, else None
    self._sync_secs = sync_secs
    self._synced_sizes: dict[str, int] = {}
    self._last_sync = time.monotonic()
    self._initial_step = initial_step
    # Prefixes ('train', 'eval') of the kept lines at initial_step: logged again, they
    # replace the old line (see the module docstring).
    self._at_initial: set[str] = set()
    if not self.enabled:
      return
    import tensorboardX  # pylint: disable=g-import-not-at-top
    if fileio.is_remote(workdir):
      self._local = tempfile.mkdtemp(prefix="rlhi_metrics_")
      remote_jsonl = os.path.join(workdir, METRICS_FILE)
      local_jsonl = os.path.join(self._local, METRICS_FILE)
      if fileio.exists(remote_jsonl):  # a resumed run appends, as locally
        fileio.copy_file(remote_jsonl, local_jsonl)
        if self._drop_after_initial_step(local_jsonl):
          fileio.copy_file(local_jsonl, remote_jsonl)
        self._synced_sizes[METRICS_FILE] = os.path.getsize(local_jsonl)
      fileio.makedirs(workdir)
    else:
      os.makedirs(workdir, exist_ok=True)
      self._drop_after_initial_step(os.path.join(workdir, METRICS_FILE))
    out = self._local or workdir
    self._tb = tensorboardX.SummaryWriter(os.path.join(out, TB_DIR),
                                          purge_step=initial_step + 1)
    self._jsonl = open(os.path.join(out, METRICS_FILE), "a", encoding="utf-8")
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc=desc,
                          unit="step", dynamic_ncols=True, mininterval=1.0)

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "train") -> None:
    if not self.enabled:
      return
    values = {f"{prefix}/{k}": float(np.asarray(v)) for k, v in
              jax.device_get(dict(scalars)).items()}
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)
    if step == self._initial_step and prefix in self._at_initial:
      self._at_initial.discard(prefix)
      self._replace_line(step, prefix)
    self._jsonl.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
    self._jsonl.flush()
    if prefix == "train" and f"{prefix}/loss" in values:
      self._bar.set_postfix(loss=f"{values[f'{prefix}/loss']:.4f}", refresh=False)
    if self._local and time.monotonic() - self._last_sync >= self._sync_secs:
      self.flush()

  def _drop_after_initial_step(self, path: str) -> bool:
    """Drops the lines of `path` (local) after initial_step; True if any were."""
    def keep(record, line):
      if record is None:  # not JSON: kept unless it is a last line cut short
        return line.endswith("\n")
      step = record.get("step", 0)
      if step == self._initial_step:
        self._at_initial.update(_prefixes(record))
      return step <= self._initial_step
    return _rewrite_lines(path, keep)

  def _replace_line(self, step: int, prefix: str) -> None:
    """Drops the old line of (step, prefix) from the open metrics.jsonl."""
    path = self._jsonl.name
    self._jsonl.close()
    _rewrite_lines(path, lambda record, line: record is None or not (
        record.get("step") == step and prefix in _prefixes(record)))
    self._jsonl = open(path, "a", encoding="utf-8")
    self._synced_sizes.pop(METRICS_FILE, None)  # the size alone no longer tells

  def advance(self, n: int = 1) -> None:
    if self.enabled:
      self._bar.update(n)

  def flush(self) -> None:
    """Flushes TensorBoard and JSONL; with a remote workdir, uploads what grew."""
    if not self.enabled:
      return
    self._tb.flush()
    self._jsonl.flush()
    self._upload()

  def _upload(self) -> None:
    if not self._local:
      return
    for root, _, files in os.walk(self._local):
      for name in sorted(files):
        local = os.path.join(root, name)
        rel = os.path.relpath(local, self._local)
        size = os.path.getsize(local)
        if self._synced_sizes.get(rel) == size:  # both files only ever grow
          continue
        remote = os.path.join(self._workdir, rel)
        fileio.makedirs(os.path.dirname(remote))
        fileio.copy_file(local, remote)
        self._synced_sizes[rel] = size
    self._last_sync = time.monotonic()

  def close(self) -> None:
    if self.enabled:
      self._bar.close()
      self._tb.close()
      self._jsonl.close()
      if self._local:
        self._upload()
        shutil.rmtree(self._local, ignore_errors=True)
        self._local = None


def _prefixes(record: Mapping[str, Any]) -> set[str]:
  return {k.split("/")[0] for k in record if k != "step"}


def _rewrite_lines(path: str, keep: Callable[[dict | None, str], bool]) -> bool:
  """Keeps the lines of the local file `path` for which keep(parsed JSON or None, line)
  is true: rewritten atomically (temporary file + rename) only if one is dropped.
  Returns whether the file changed."""
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if not isinstance(record, dict):
      record = None
    if keep(record, line):
      kept.append(line)
  if kept and not kept[-1].endswith("\n"):  # a whole last line that lost its newline
    kept[-1] += "\n"
  elif len(kept) == len(lines):
    return False
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)
  return True
