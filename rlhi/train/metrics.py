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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

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
    if not self.enabled:
      return
    import tensorboardX  # pylint: disable=g-import-not-at-top
    if fileio.is_remote(workdir):
      self._local = tempfile.mkdtemp(prefix="rlhi_metrics_")
      remote_jsonl = os.path.join(workdir, METRICS_FILE)
      if fileio.exists(remote_jsonl):  # a resumed run appends, as locally
        fileio.copy_file(remote_jsonl, os.path.join(self._local, METRICS_FILE))
        self._synced_sizes[METRICS_FILE] = os.path.getsize(
            os.path.join(self._local, METRICS_FILE))
      fileio.makedirs(workdir)
    else:
      os.makedirs(workdir, exist_ok=True)
    out = self._local or workdir
    self._tb = tensorboardX.SummaryWriter(os.path.join(out, TB_DIR))
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
    self._jsonl.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
    self._jsonl.flush()
    if prefix == "train" and f"{prefix}/loss" in values:
      self._bar.set_postfix(loss=f"{values[f'{prefix}/loss']:.4f}", refresh=False)
    if self._local and time.monotonic() - self._last_sync >= self._sync_secs:
      self.flush()

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
