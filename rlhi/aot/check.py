"""Compile an experiment's programs for a TPU slice; report memory, collectives and an
estimated step time; search for settings that fit.

    s = topology.parse("v5litepod-64")
    mesh = sharding.make_mesh(dict(cfg.mesh), devices=topology.devices(s))
    results = [check.compile_program(p, s) for p in programs.build(cfg, mesh)]
    print(check.format_results(results, s))

The TPU compiler (libtpu) assigns every buffer of the program in HBM and refuses one
that does not fit ("Ran out of memory in memory space hbm"): that is the check. The
figures per chip come from `compiled.memory_analysis()`; collectives and HBM traffic
from the compiled HLO (rlhi/aot/hlo.py); the step time is a roofline estimate
(rlhi/aot/roofline.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_collections
import numpy as np

from rlhi import sharding
from rlhi.aot import hlo
from rlhi.aot import programs
from rlhi.aot import roofline
from rlhi.aot import topology

GiB = topology.GiB


@dataclasses.dataclass
class Memory:
  """Per-chip bytes from `compiled.memory_analysis()`."""
  arguments: float
  outputs: float
  temps: float
  aliased: float  # outputs written in place of donated arguments
  peak: float  # the compiler's peak of live buffers (0 when it does not say)

  @property
  def total(self) -> float:
    """arguments + outputs + temps - aliased: an upper bound of the peak."""
    return self.arguments + self.outputs + self.temps - self.aliased

  @property
  def used(self) -> float:
    return self.peak or self.total


@dataclasses.dataclass
class StepResult:
  name: str
  description: str
  compile_s: float
  capacity: float  # HBM bytes per chip
  memory: Memory | None = None
  error: str = ""  # why it did not compile (out of memory: 'used X of Y')
  oom_used: float = 0.0  # bytes the compiler needed, when it ran out of HBM
  summary: hlo.HloSummary | None = None
  estimate: roofline.Estimate | None = None
  hlo_flops: float = 0.0  # the compiler's cost analysis (a loop body counted once)
  argument_bytes: float = 0.0  # per chip, from the input shardings
  hlo_text: str = ""  # the compiled program (one chip's), when compiled
  compiled: Any = None  # the jax Compiled object (its input/output shardings)
  per_step: int = 1  # steps per program run; the estimate is per step

  @property
  def fits(self) -> bool:
    return (not self.error and self.memory is not None
            and self.memory.used <= self.capacity)

  @property
  def used(self) -> float:
    return self.memory.used if self.memory is not None else self.oom_used


# The TPU compiler's two out-of-HBM messages (libtpu): after buffer assignment, and
# before it when the temporaries alone exceed what is left.
_OOM = (re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
        re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                   r"\(([\d.]+)([KMGT]?)\)"))
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_oom(message: str) -> tuple[float, float, bool] | None:
  """(bytes needed, bytes available, needed counts temporaries only) from the TPU
  compiler's out-of-HBM error; None for another error."""
  for i, pattern in enumerate(_OOM):
    m = pattern.search(message)
    if m:
      return (float(m.group(1)) * _UNITS[m.group(2)],
              float(m.group(3)) * _UNITS[m.group(4)], i == 1)
  return None


def argument_bytes(args: Any) -> float:
  """Bytes of one chip's shards of the abstract arguments."""
  total = 0.0
  for x in jax.tree.leaves(args):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def compile_program(program: programs.Program, s: topology.Slice, *,
                    keep_compiled: bool = False) -> StepResult:
  """Lowers and compiles one program for the slice (nothing runs).

  The compiled executable is kept in the result only with `keep_compiled` (its
  shardings are what a test checks; an 8B program's executable is large).
  """
  result = StepResult(program.name, program.description, 0.0, s.chip.hbm_bytes,
                      argument_bytes=argument_bytes(program.args))
  t0 = time.perf_counter()
  try:
    with sharding.use_mesh(program.mesh, program.rules):
      compiled = program.jitted.lower(*program.args).compile()
  # The compiler's message is the report, whatever the exception type.
  except Exception as e:  # pylint: disable=broad-except
    result.compile_s = time.perf_counter() - t0
    message = str(e)
    oom = parse_oom(message)
    if oom is None and "RESOURCE_EXHAUSTED" not in message:
      result.error = f"compile error: {message.splitlines()[0][:300]}"
      return result
    if oom is not None:
      needed, result.capacity, temps_only = oom
      # Temporaries come on top of the arguments (params, optimizer state, batch).
      result.oom_used = needed + (result.argument_bytes if temps_only else 0.0)
      result.error = (f"out of HBM: needs {result.oom_used / GiB:.2f} GiB of "
                      f"{result.capacity / GiB:.2f} GiB"
                      + (" (temporaries alone: "
                         f"{needed / GiB:.2f} GiB)" if temps_only else ""))
    else:
      result.error = "out of HBM: " + message.splitlines()[0][:200]
    return result
  result.compile_s = time.perf_counter() - t0
  result.compiled = compiled if keep_compiled else None
  m = compiled.memory_analysis()
  result.memory = Memory(m.argument_size_in_bytes, m.output_size_in_bytes,
                         m.temp_size_in_bytes, m.alias_size_in_bytes,
                         float(getattr(m, "peak_memory_in_bytes", 0) or 0))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  result.hlo_flops = float((cost or {}).get("flops", 0.0))
  result.hlo_text = compiled.as_text()
  result.summary = hlo.summarize(result.hlo_text, s.chips)
  result.per_step = program.per_step
  result.estimate = roofline.estimate(
      result.summary, s.chip, s.chips, model_flops=program.model_flops,
      flops_per_chip=program.flops_run / program.parallel_ways,
      per_step=program.per_step)
  return result


# ---- Report --------------------------------------------------------------------------


def _gib(x: float) -> str:
  return f"{x / GiB:.2f}"


def format_results(results: Sequence[StepResult], s: topology.Slice) -> str:
  """A markdown table per step, then each step's collectives and roofline terms."""
  chip = s.chip
  lines = [
      f"{s.accelerator} ({s.topology}, {s.chips} chips of {_gib(chip.hbm_bytes)} GiB "
      f"HBM, {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
      f"{chip.hbm_bytes_per_s / 1e9:.0f} GB/s HBM, "
      f"{chip.ici_bytes_per_s / 1e9:.0f} GB/s ICI per chip)", "",
      "| step | shapes | compile s | arguments GiB | outputs GiB | temps GiB | "
      "aliased GiB | peak GiB | usable HBM GiB | fits | roofline step s | bound | "
      "roofline MFU |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    if r.memory is None:
      lines.append(f"| {r.name} | {r.description} | {r.compile_s:.0f} | | | | | "
                   f"{_gib(r.oom_used) if r.oom_used else '?'} | {_gib(r.capacity)} | "
                   f"**no**: {r.error} | | | |")
      continue
    m, e = r.memory, r.estimate
    lines.append(
        f"| {r.name} | {r.description} | {r.compile_s:.0f} | {_gib(m.arguments)} | "
        f"{_gib(m.outputs)} | {_gib(m.temps)} | {_gib(m.aliased)} | {_gib(m.used)} | "
        f"{_gib(r.capacity)} | {'yes' if r.fits else '**no**'} | {e.step_s:.3g} | "
        f"{e.bound} | {e.mfu:.1%} |")
  lines.append("")
  for r in results:
    if r.summary is None:
      continue
    e, n = r.estimate, r.per_step
    parts = [f"{c.kind} {c.count / n:.0f}x {c.bytes / n / GiB:.2f} GiB "
             f"(ICI {c.ici_bytes / n / GiB:.2f})"
             for c in r.summary.collectives.values()] or ["none"]
    lines.append(f"- {r.name}: collectives per step per chip: {'; '.join(parts)}.")
    lines.append(
        f"  Roofline estimate: compute {e.compute_s:.3g} s "
        f"({e.flops_per_chip / 1e12:.1f} TFLOP per chip run, model "
        f"{e.model_flops / 1e15:.3g} PFLOP per step; the compiler's cost analysis "
        f"counts {r.hlo_flops / n / 1e12:.1f} TFLOP with each loop body once), HBM "
        f"{e.hbm_s:.3g} s ({r.summary.hbm_bytes / n / GiB:.1f} GiB), ICI {e.ici_s:.3g} s "
        f"({r.summary.ici_bytes / n / GiB:.2f} GiB received).")
    if n > 1:
      lines.append(f"  The program runs {n} steps (one token per row each); the figures "
                   f"above are per step.")
    if r.summary.unknown_loops:
      lines.append(f"  Loops of unknown trip count (counted once): "
                   f"{', '.join(r.summary.unknown_loops)}.")
  return "\n".join(lines)


def results_json(results: Sequence[StepResult]) -> list[dict[str, Any]]:
  out = []
  for r in results:
    d = {"step": r.name, "shapes": r.description, "compile_s": r.compile_s,
         "fits": r.fits, "error": r.error, "capacity_bytes": r.capacity,
         "used_bytes": r.used}
    if r.memory is not None:
      d["memory"] = dataclasses.asdict(r.memory)
      d["collectives"] = {k: dataclasses.asdict(c)
                          for k, c in r.summary.collectives.items()}
      e = r.estimate
      d["estimate"] = {
          "per_step": r.per_step, "step_s": e.step_s, "compute_s": e.compute_s,
          "hbm_s": e.hbm_s, "ici_s": e.ici_s, "bound": e.bound, "mfu": e.mfu,
          "model_flops": e.model_flops, "flops_per_chip": e.flops_per_chip,
          "hbm_bytes": r.summary.hbm_bytes, "hlo_flops": r.hlo_flops}
    out.append(d)
  return out


def hlo_file_name(name: str) -> str:
  """A file name for a step's compiled HLO: 'dpo_cached mesh fsdp=64, remat full' ->
  'dpo_cached_mesh_fsdp-64__remat_full.hlo.txt'."""
  return "".join(ch if ch.isalnum() or ch in "._" else "_" if ch in " ,"
                 else "-" for ch in name) + ".hlo.txt"


# ---- Search --------------------------------------------------------------------------


@dataclasses.dataclass
class Candidate:
  mesh: dict[str, int]
  remat: str
  accum: int
  result: StepResult

  def label(self) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items() if v != 1) or "fsdp=1"
    return f"mesh {mesh}, remat {self.remat}, accum {self.accum}"


def default_meshes(chips: int, config_mesh: dict[str, int], num_kv_heads: int
                   ) -> list[dict[str, int]]:
  """The config's mesh; all chips on fsdp x tensor (tensor = 1, 2, 4, 8, dividing
  the kv heads so that tensor parallelism splits every attention projection); and
  data x tensor, which keeps whole (tensor-split) weights on every chip: no gathering
  per step, the mesh decoding wants when the weights fit."""
  out = [dict(config_mesh)]
  for t in (1, 2, 4, 8):
    if chips % t == 0 and num_kv_heads % t == 0:
      out.append({"data": 1, "fsdp": chips // t, "tensor": t})
  for t in (1, 2, 4, 8):
    if chips % t == 0 and num_kv_heads % t == 0 and chips > t:
      out.append({"data": chips // t, "fsdp": 1, "tensor": t})
  resolved = []
  for m in out:
    m = {k: int(v) for k, v in m.items()}
    if -1 in m.values():
      known = math.prod(v for v in m.values() if v != -1)
      m = {k: (chips // known if v == -1 else v) for k, v in m.items()}
    m = {a: m.get(a, 1) for a in sharding.MESH_AXES}
    if m not in resolved and math.prod(m.values()) == chips:
      resolved.append(m)
  return resolved


def _with(cfg, mesh: dict[str, int], remat: str, accum: int):
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.mesh = ml_collections.ConfigDict(mesh)
  cfg.model.remat_policy = remat
  cfg.accum_steps = accum
  return cfg


def search(cfg, step: str, s: topology.Slice, devices: Sequence[Any], *,
           meshes: Iterable[dict[str, int]], remats: Iterable[str],
           max_accum: int = 64, log: Callable[[str], None] = print) -> list[Candidate]:
  """For each mesh and remat policy, the fewest accumulation steps with which `step`
  fits (training steps; the sampler's steps vary the mesh only).

  Accumulation starts at the config's and, when the step does not fit, jumps to the
  count at which the activations (used - arguments, which shrink with the microbatch)
  would fit, then doubles; the microbatch must still split over the batch's shards.
  Returns every candidate compiled, fitting or not, fastest estimate first.
  """
  out: list[Candidate] = []
  train = step in programs.TRAIN_STEPS
  for mesh_axes in meshes:
    for remat in (remats if train else [cfg.model.remat_policy]):
      accum = int(cfg.accum_steps) if train else 1
      while True:
        trial = _with(cfg, mesh_axes, remat, accum)
        mesh = sharding.make_mesh(trial.mesh, devices=devices)
        try:
          (program,) = programs.build(trial, mesh, (step,))
        except ValueError as e:  # e.g. batch not divisible by accum_steps
          log(f"  skip {mesh_axes} {remat} accum {accum}: {e}")
          break
        result = compile_program(program, s)
        if not result.fits:
          result.hlo_text = ""  # only fitting programs' HLO is written out
        cand = Candidate(mesh_axes, remat, accum, result)
        out.append(cand)
        log(f"  {cand.label()}: "
            + (f"fits, {_gib(result.used)} GiB, roofline {result.estimate.step_s:.3g} s"
               if result.fits else f"does not fit ({result.error or _gib(result.used)})")
            + f" [{result.compile_s:.0f} s compile]")
        if result.fits or not train:
          break
        nxt = _next_accum(result, accum, int(trial.batch_size), mesh,
                          1 if step == "sft" else 2)
        if nxt is None or nxt > max_accum:
          break
        accum = nxt
  return sorted(out, key=lambda c: (not c.result.fits,
                                    c.result.estimate.step_s if c.result.estimate
                                    else math.inf))


def _next_accum(result: StepResult, accum: int, batch: int, mesh,
                rows_per_example: int) -> int | None:
  """The next accumulation count to try: the power of two at which the activations
  (what the compiler needed beyond the arguments, shrinking with the microbatch) would
  fit in 95% of HBM, or the largest count whose microbatch still splits over the
  batch's shards (data x fsdp) when that is fewer; None when there is none larger.

  `rows_per_example` is 2 for pairs: chosen and rejected run stacked, so the forward
  pass of a microbatch of b pairs has 2b rows.
  """
  fixed = result.argument_bytes
  room = 0.95 * result.capacity - fixed
  want = accum * 2
  if result.used > 0 and room > 0:
    want = max(want, math.ceil(accum * max(result.used - fixed, 1.0) / room))
  ways = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
  k, best = accum * 2, None
  while batch % k == 0 and (batch // k * rows_per_example) % ways == 0:
    best = k
    if k >= want:
      break
    k *= 2
  return best


def format_search(candidates: Sequence[Candidate], step: str) -> str:
  lines = [f"Search for {step}: fitting settings, fastest estimate first.", "",
           "| # | setting | peak GiB | roofline step s | bound | roofline MFU | "
           "compile s |",
           "|---|---|---|---|---|---|---|"]
  for i, c in enumerate(x for x in candidates if x.result.fits):
    e = c.result.estimate
    lines.append(f"| {i + 1} | {c.label()} | {_gib(c.result.used)} | {e.step_s:.3g} | "
                 f"{e.bound} | {e.mfu:.1%} | {c.result.compile_s:.0f} |")
  misses = [c for c in candidates if not c.result.fits]
  if misses:
    lines += ["", "Did not fit: " + "; ".join(
        f"{c.label()} ({c.result.error or _gib(c.result.used) + ' GiB'})"
        for c in misses) + "."]
  return "\n".join(lines)


# ---- The whole check (experiments/compile.py) --------------------------------------


class SettingsError(ValueError):
  """The slice or the steps asked for cannot be compiled; the message says why."""


def parse_meshes(text: str) -> list[dict[str, int]]:
  """'fsdp=64;fsdp=16,tensor=4' -> [{'fsdp': 64}, {'fsdp': 16, 'tensor': 4}]."""
  meshes = []
  for spec in filter(None, (m.strip() for m in text.split(";"))):
    try:
      meshes.append({k.strip(): int(v) for k, v in
                     (kv.split("=") for kv in spec.split(","))})
    except ValueError as e:
      raise ValueError(f"--search_meshes: {spec!r}; expected axis=size pairs such as "
                       f"'fsdp=16,tensor=4'") from e
  return meshes


def run(cfg, topology_name: str, steps: Sequence[str] = (), *, search_settings: bool =
        False, search_meshes: str = "", search_remat: Sequence[str] = ("full",),
        max_accum: int = 64, json_path: str = "", hlo_dir: str = "",
        log: Callable[[str], None] = print) -> bool:
  """Compiles `steps` (default: the config's) of the experiment `cfg` for the slice
  `topology_name`, or with `search_settings` searches meshes, remat policies and
  accumulation for each; logs the tables, writes `json_path` / `hlo_dir` when given.
  True when every step fits (with `search_settings`: some setting of every step).
  A bad topology or step name, or no libtpu, raises SettingsError."""
  try:
    s = topology.parse(topology_name)
    steps = tuple(steps) or programs.default_steps(cfg)
    unknown = [step for step in steps if step not in programs.STEPS]
    if unknown:
      raise ValueError(f"--steps: unknown {unknown}; known: "
                       f"{', '.join(programs.STEPS)}")
    devices = topology.devices(s)
  except (ValueError, RuntimeError) as e:
    raise SettingsError(str(e)) from e
  log(f"Compiling {', '.join(steps)} ({programs.experiment_kind(cfg)} config, model "
      f"{cfg.model.init or cfg.model.name}) for {s.accelerator} ({s.topology}); the "
      f"TPU compiler runs on this host's CPU.")

  def write_hlo(name: str, text: str) -> None:
    if hlo_dir and text:
      os.makedirs(hlo_dir, exist_ok=True)
      with open(os.path.join(hlo_dir, hlo_file_name(name)), "w") as f:
        f.write(text)

  def write_json(data: Any) -> None:
    if json_path:
      with open(json_path, "w") as f:
        json.dump(data, f, indent=1)

  if search_settings:
    config, _ = programs.model_configs(cfg)
    meshes = (parse_meshes(search_meshes) or
              default_meshes(s.chips, dict(cfg.mesh), config.num_kv_heads))
    ok, found = True, {}
    for step in steps:
      log(f"\n{step}:")
      candidates = search(cfg, step, s, devices, meshes=meshes, remats=search_remat,
                          max_accum=max_accum, log=log)
      log("\n" + format_search(candidates, step))
      found[step] = candidates
      for c in candidates:
        if c.result.fits:
          write_hlo(f"{step} {c.label()}", c.result.hlo_text)
      ok &= any(c.result.fits for c in candidates)
    write_json({step: [dict(setting=c.label(), **results_json([c.result])[0])
                       for c in cands] for step, cands in found.items()})
    return ok

  mesh = sharding.make_mesh(dict(cfg.mesh), devices=devices)
  results = []
  for program in programs.build(cfg, mesh, steps):
    log(f"  {program.name}: {program.description} ...")
    results.append(compile_program(program, s))
    write_hlo(program.name, results[-1].hlo_text)
  log("\n" + format_results(results, s))
  write_json(results_json(results))
  failed = [r.name for r in results if not r.fits]
  if failed:
    log(f"\nDoes not fit or does not compile on {s.accelerator}: {', '.join(failed)}. "
        f"Try --search, more chips, or config.accum_steps / model.remat_policy / mesh.")
  return not failed
