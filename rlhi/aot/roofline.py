"""An estimate of step time and MFU from FLOPs, HBM traffic and ICI traffic.

    t_compute = FLOPs run per chip / peak bf16 FLOP/s
    t_hbm     = HBM bytes per chip (rlhi/aot/hlo.py) / HBM bandwidth
    t_ici     = bytes each chip receives for collectives / (ICI bandwidth / 2)
    step time = max(t_compute, t_hbm, t_ici)      (perfect overlap: a lower bound)
    MFU       = model FLOPs / (chips x peak x step time)

Model FLOPs are the usual analytic count (6 x matmul params x tokens for training, plus
attention, `llama.flops_per_token`); FLOPs run also count what the program recomputes
(rematerialisation, the LM head recomputed per chunk) and what chips repeat when the
batch is not split over every chip. The compiler's own count (`cost_analysis`) is
printed for reference only: it counts a loop body once.

It leaves out: how well kernels use the MXUs (dense attention, small matmuls), latency
of collectives and their overlap with compute (assumed perfect), ICI routing on the torus
(every collective is assumed to use all of a chip's links), host input, and compile-time
choices that only a profile shows. Read it as "no faster than", not as a prediction.
"""

from __future__ import annotations

import dataclasses

from rlhi.aot import hlo
from rlhi.aot import topology


@dataclasses.dataclass
class Estimate:
  compute_s: float
  hbm_s: float
  ici_s: float
  model_flops: float  # whole step, all chips
  flops_per_chip: float  # run, incl. recomputation and repeated work
  chips: int
  peak_flops: float

  @property
  def step_s(self) -> float:
    return max(self.compute_s, self.hbm_s, self.ici_s)

  @property
  def bound(self) -> str:
    return max((self.compute_s, "compute"), (self.hbm_s, "HBM"), (self.ici_s, "ICI"))[1]

  @property
  def mfu(self) -> float:
    if self.step_s <= 0:
      return 0.0
    return self.model_flops / (self.chips * self.peak_flops * self.step_s)


def estimate(summary: hlo.HloSummary, chip: topology.Chip, chips: int, *,
             model_flops: float, flops_per_chip: float, per_step: int = 1) -> Estimate:
  """The roofline of a program that runs `per_step` steps (the decode loop: one per
  token), per step."""
  return Estimate(
      compute_s=flops_per_chip / chip.peak_bf16_flops / per_step,
      hbm_s=summary.hbm_bytes / chip.hbm_bytes_per_s / per_step,
      ici_s=summary.ici_bytes / chip.ici_in_bytes_per_s / per_step,
      model_flops=model_flops / per_step, flops_per_chip=flops_per_chip / per_step,
      chips=chips, peak_flops=chip.peak_bf16_flops)
