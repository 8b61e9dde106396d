"""Metrics out of the training loop: TensorBoard (tensorboardX), JSONL and a progress bar.

Only process 0 writes; the other processes get a writer that does nothing, so the loop
has no `if process_index == 0` of its own. Values are fetched from the device once per
log step with one `jax.device_get` of the whole dict.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import tqdm


class MetricWriter:
  """Writes scalars to <workdir>/tb (TensorBoard) and <workdir>/metrics.jsonl."""

  def __init__(self, workdir: str, total_steps: int, *, initial_step: int = 0,
               desc: str = "train", enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = self._jsonl = self._bar = None
    if not self.enabled:
      return
    import tensorboardX  # pylint: disable=g-import-not-at-top
    os.makedirs(workdir, exist_ok=True)
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
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

  def advance(self, n: int = 1) -> None:
    if self.enabled:
      self._bar.update(n)

  def close(self) -> None:
    if self.enabled:
      self._bar.close()
      self._tb.close()
      self._jsonl.close()
