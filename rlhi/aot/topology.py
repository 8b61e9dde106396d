"""TPU slices by accelerator name, their chips' published figures, and compile-only
devices for them (libtpu, no TPU needed).

    s = topology.parse("v5litepod-64")     # or v5e-64, v5p-128, v6e-64, v5e:8x8
    s.chips, s.topology, s.chip.hbm_bytes  # 64, 'v5e:8x8', 15.75 GiB
    devices = topology.devices(s)          # 64 TpuDevices to build a mesh on

Accelerator names are those of `gcloud compute tpus` and tpu/*.sh: v5e and v6e count
chips (`v5litepod-64` is 64 chips), v5p counts TensorCores, two per chip (`v5p-128` is
64 chips, one JAX device per chip: megacore). The slice shapes are Cloud TPU's (and
MaxText's accelerator_to_spec_map.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

GiB = 2.0 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Cloud TPU documentation, `source`)."""
  family: str  # v5e | v5p | v6e
  topology_prefix: str  # how libtpu names the family in a topology: v5e:8x8, v5:4x4x4
  hbm_bytes: float  # usable by a program (see CHIPS)
  peak_bf16_flops: float  # FLOP/s
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # bidirectional, all links of one chip together
  cores_per_chip: int  # TensorCores per chip: what a v5p accelerator name counts
  torus_dims: int
  source: str

  @property
  def ici_in_bytes_per_s(self) -> float:
    """What one chip can receive at once: half the bidirectional figure."""
    return self.ici_bytes_per_s / 2


# https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s,
# 400 GB/s bidirectional ICI per chip (4 ports), 2D torus.
# https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2,765 GB/s,
# 1,200 GB/s bidirectional ICI per chip, 3D torus, 2 TensorCores per chip.
# https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1,638 GB/s,
# 800 GB/s bidirectional ICI per chip (4 ports), 2D torus.
# `hbm_bytes` is what the TPU compiler lets one program use, as libtpu 0.0.42 reports
# it when a program does not fit ("exceeds available HBM (15.75G)"): a little under
# the published capacity.
CHIPS = {
    "v5e": Chip("v5e", "v5e", 15.75 * GiB, 197e12, 819e9, 400e9, 1, 2,
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "v5", 95.74 * GiB, 459e12, 2765e9, 1200e9, 2, 3,
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "v6e", 31.25 * GiB, 918e12, 1638e9, 800e9, 1, 2,
                "https://cloud.google.com/tpu/docs/v6e"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5e": "v5e", "v5p": "v5p",
            "v6e": "v6e", "v5": "v5p"}
# Slice shapes by chip count (Cloud TPU's supported single-slice shapes).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
              128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
              128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16",
              2048: "8x16x16", 4096: "16x16x16", 6144: "16x16x24"}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as given
  chip: Chip
  shape: str  # '8x8'

  @property
  def topology(self) -> str:
    return f"{self.chip.topology_prefix}:{self.shape}"

  @property
  def chips(self) -> int:
    return math.prod(int(d) for d in self.shape.split("x"))

  @property
  def accelerator(self) -> str:
    """The gcloud accelerator type of this slice."""
    if self.chip.family == "v5e":
      return f"v5litepod-{self.chips}"
    return f"{self.chip.family}-{self.chips * self.chip.cores_per_chip}"


def parse(name: str) -> Slice:
  """'v5litepod-64' | 'v5e-64' | 'v5p-128' | 'v6e-64' | 'v5e:8x8' | 'v5p:4x4x4' -> Slice.
  """
  known = ", ".join(["v5litepod-N", "v5e-N", "v5p-N", "v6e-N",
                     "or a topology like v5e:8x8 / v5p:4x4x8"])
  m = re.fullmatch(r"([a-z0-9]+?)(?:pod)?-(\d+)", name.strip())
  if m and m.group(1) in _ALIASES:
    chip = CHIPS[_ALIASES[m.group(1)]]
    count = int(m.group(2))
    if count % chip.cores_per_chip:
      raise ValueError(f"--topology {name}: {chip.family} names count TensorCores, "
                       f"{chip.cores_per_chip} per chip; expected a multiple of "
                       f"{chip.cores_per_chip}")
    chips = count // chip.cores_per_chip
    shapes = _SHAPES_3D if chip.torus_dims == 3 else _SHAPES_2D
    if chips not in shapes:
      sizes = ", ".join(f"{chip.family}-{c * chip.cores_per_chip}" for c in shapes)
      raise ValueError(f"--topology {name}: no standard {chip.family} slice of {chips} "
                       f"chips; known: {sizes}; or give the shape, e.g. "
                       f"{chip.family}:{next(iter(shapes.values()))}")
    return Slice(name, chip, shapes[chips])
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", name.strip())
  if m and m.group(1) in _ALIASES:
    chip = CHIPS[_ALIASES[m.group(1)]]
    if len(m.group(2).split("x")) != chip.torus_dims:
      raise ValueError(f"--topology {name}: {chip.family} slices are "
                       f"{chip.torus_dims}-D (e.g. "
                       f"{chip.family}:{'x'.join(['4'] * chip.torus_dims)})")
    return Slice(name, chip, m.group(2))
  raise ValueError(f"--topology {name!r}: unknown accelerator; expected {known}")


def devices(s: Slice) -> list[Any]:
  """Compile-only TPU devices of the slice (needs `pip install -e '.[tpu-compile]'`).

  Works on a machine without a TPU and with JAX_PLATFORMS=cpu: jax's TPU plugin
  (libtpu) provides a compile-only client for the topology; arrays cannot be placed on
  these devices, only programs compiled for them.
  """
  # libtpu reads these when it starts; off a TPU VM it would look them up from the
  # metadata server and print warnings. They do not change what is compiled.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.accelerator)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # libtpu takes /tmp/libtpu_lockfile so that one process owns the TPU; compiling
  # opens no TPU, and must work beside another compile or a job on this TPU VM.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=s.topology)
  except Exception as e:  # pylint: disable=broad-except
    if not libtpu_available():
      raise RuntimeError(
          "compiling for TPU needs libtpu: pip install -e '.[tpu-compile]' "
          "(the version setup.py pins for this jax)") from e
    raise RuntimeError(f"libtpu could not describe topology {s.topology}: {e}") from e
  return list(topo.devices)


def libtpu_available() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("libtpu") is not None
