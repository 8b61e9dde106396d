"""What a compiled program does per step, read from its optimised HLO text.

`compiled.as_text()` of a TPU executable is the program after SPMD partitioning, fusion
and scheduling: one chip's share. This module reads from it

  * the collectives: kind, how many run per step and how many bytes each chip
    receives over ICI for them (`Collective`);
  * the HBM traffic: bytes each top-level operation reads and writes in HBM.

Loop bodies count once per trip, nested loops multiply (XLA's own
`compiled.cost_analysis()` counts a while body once, so a scan over 80 layers looks like
one layer there). The trip count of a `while` comes from its backend config
(`known_trip_count`) or from its condition (`counter < constant`, the form of
jax.lax.scan / fori_loop); a loop whose count cannot be read counts once and is
reported in `HloSummary.unknown_loops`.

Both figures are estimates for the roofline in rlhi/aot/roofline.py, not a simulation:
see docs/tpu.md for what they leave out.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterator

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
    "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
    "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1, "f8e3m4": 1, "token": 0,
}
# One array in a type: dtype[dims] and an optional layout {...} (which may hold
# parentheses, e.g. {1,0:T(8,128)(2,1)S(1)}, but no braces or spaces).
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^{}\s]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([^\s(]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([^\s=]+) = (.*)$")
_CALLEE_LISTS = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|"
                     r"false_computation)=%([^\s,)}]+)")

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all")
# Operations that move no data of their own, or whose data is counted elsewhere
# (the -done half of an async pair; loops and calls count through their bodies).
_NO_TRAFFIC = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
    "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
    "custom-call", "iota", "domain", "add-dependency",
}
_SLICES = {"slice", "dynamic-slice", "slice-start", "gather"}


@dataclasses.dataclass
class _Instruction:
  name: str
  opcode: str
  type: str  # the result type, layouts included
  args: str  # the text between the opcode's parentheses
  operands: list[str]
  attributes: str
  is_root: bool


@dataclasses.dataclass
class _Computation:
  name: str
  is_entry: bool
  instructions: dict[str, _Instruction]

  @property
  def root(self) -> _Instruction:
    return next(i for i in self.instructions.values() if i.is_root)


@dataclasses.dataclass
class Collective:
  """The collectives of one kind, per step, on one chip."""
  kind: str
  count: int  # executions per step (loop trips included)
  bytes: float  # result bytes per step (the gathered / reduced arrays)
  ici_bytes: float  # bytes each chip receives over ICI per step (see `ici_bytes`)


@dataclasses.dataclass
class HloSummary:
  collectives: dict[str, Collective]
  hbm_bytes: float  # HBM bytes read + written per step, on one chip
  loops: list[tuple[str, int]]  # (while body, trips per execution)
  unknown_loops: list[str]

  @property
  def ici_bytes(self) -> float:
    return sum(c.ici_bytes for c in self.collectives.values())


def array_bytes(type_text: str, hbm_only: bool = False) -> float:
  """Bytes of every array in an HLO type (a tuple sums its elements).

  With `hbm_only`, arrays laid out in another memory space (`S(1)`: the TPU's on-chip
  VMEM, where the compiler prefetches operands) count nothing.
  """
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(type_text):
    if dtype not in _DTYPE_BYTES:
      continue
    if hbm_only and layout:
      space = _MEMORY_SPACE.search(layout)
      if space and space.group(1) != "0":
        continue
    total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _tuple_elements(type_text: str) -> list[str]:
  """'(a, (b, c), d)' -> ['a', '(b, c)', 'd']; a non-tuple type -> [type]."""
  if not type_text.startswith("("):
    return [type_text]
  out, depth, start = [], 0, 1
  for i, ch in enumerate(type_text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        out.append(type_text[start:i])
    elif ch == "," and depth == 1:
      out.append(type_text[start:i])
      start = i + 1
  return [re.sub(r"/\*.*?\*/", "", e).strip() for e in out if e.strip()]


def _output_type(instruction: "_Instruction") -> str:
  """The array an operation produces: for an async `-start`, whose type is
  ((operands), result, context...), the result."""
  if instruction.opcode.endswith("-start"):
    elements = _tuple_elements(instruction.type)
    if len(elements) >= 2:
      return elements[1]
  return instruction.type


def _largest_array(type_text: str) -> float:
  sizes = [array_bytes(f"{d}[{s}]") for d, s, _ in _ARRAY.findall(type_text)]
  return max(sizes, default=0.0)


def _split_type(rest: str) -> tuple[str, str]:
  """'(a, b) op(...)' or 'f32[2]{0} op(...)' -> (type, 'op(...)')."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  type_text, _, tail = rest.partition(" ")
  return type_text, tail


def _split_call(text: str) -> tuple[str, str, list[str], str]:
  """'op(%a, %b), attrs' -> ('op', '%a, %b', ['a', 'b'], 'attrs')."""
  opcode, _, tail = text.partition("(")
  depth, end = 1, len(tail)
  for i, ch in enumerate(tail):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      end = i
      break
  operands = re.findall(r"%([^\s,()]+)", tail[:end])
  return opcode.strip(), tail[:end], operands, tail[end + 1:]


def parse(text: str) -> dict[str, _Computation]:
  """HLO module text -> computations by name (in the text's order)."""
  computations: dict[str, _Computation] = {}
  current = None
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = _Computation(m.group(2), bool(m.group(1)), {})
      continue
    if line.startswith("}"):
      computations[current.name] = current
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    type_text, call = _split_type(m.group(3))
    opcode, args, operands, attributes = _split_call(call)
    current.instructions[m.group(2)] = _Instruction(
        m.group(2), opcode, type_text, args, operands, attributes, bool(m.group(1)))
  return computations


def _callees(instruction: _Instruction) -> Iterator[tuple[str, str]]:
  """(role, computation) for every computation an instruction calls."""
  for role, name in _CALLEE.findall(instruction.attributes):
    yield role, name
  for names in _CALLEE_LISTS.findall(instruction.attributes):
    for name in re.findall(r"%([^\s,}]+)", names):
      yield "branch", name


def _trip_count(loop: _Instruction, computations: dict[str, _Computation]) -> int | None:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes)
  if m:
    return int(m.group(1))
  condition = computations.get(dict(_callees(loop)).get("condition", ""))
  if condition is None:
    return None
  root = condition.root
  if root.opcode != "compare" or "direction=LT" not in root.attributes:
    return None
  for operand in root.operands:
    bound = condition.instructions.get(operand)
    if bound is not None and bound.opcode == "constant" and re.fullmatch(
        r"-?\d+", bound.args.strip()):
      return int(bound.args)
  return None


def _multiplicities(computations: dict[str, _Computation]
                    ) -> tuple[dict[str, float], set[str], list, list]:
  """Executions per step of every computation; the computations that are fusion
  bodies or reducers (their work is counted at the calling instruction)."""
  counts: dict[str, float] = collections.defaultdict(float)
  inlined: set[str] = set()
  loops, unknown = [], []
  for c in computations.values():
    if c.is_entry:
      counts[c.name] = 1.0
  # Callers come after their callees in the text: walk backwards.
  for c in reversed(list(computations.values())):
    n = counts.get(c.name, 0.0)
    for instruction in c.instructions.values():
      callees = list(_callees(instruction))
      if instruction.opcode == "while":
        trips = _trip_count(instruction, computations)
        roles = dict(callees)
        if trips is None:
          unknown.append(roles.get("body", instruction.name))
          trips = 1
        loops.append((roles.get("body", instruction.name), trips))
        for role, name in callees:
          counts[name] += n * (trips + (role == "condition"))
        continue
      for role, name in callees:
        counts[name] += n
        if role in ("calls", "to_apply") and instruction.opcode != "call":
          inlined.add(name)
  return counts, inlined, loops, unknown


def group_size(attributes: str, num_devices: int) -> int:
  """Participants per group of a collective, from its replica_groups."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if m:
    sizes = dict((k.strip("'"), int(v)) for k, v in
                 (item.split("=") for item in m.group(1).split(",")))
    return math.prod(sizes[a.strip().strip("'")] for a in m.group(2).split(",") if a)
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
  if m:
    return len(m.group(1).split(","))
  return num_devices


def ici_bytes(kind: str, result_bytes: float, group: int) -> float:
  """Bytes one chip receives for one collective, with the bandwidth-optimal
  algorithms: an all-gather receives the (g-1)/g of the result it does not hold, a
  reduce-scatter the (g-1) other shards of its result, an all-reduce is a
  reduce-scatter then an all-gather, an all-to-all keeps 1/g of its data."""
  if group <= 1 and kind != "collective-permute":
    return 0.0
  share = (group - 1) / group
  return {
      "all-gather": result_bytes * share,
      "reduce-scatter": result_bytes * (group - 1),
      "all-reduce": 2 * result_bytes * share,
      "all-to-all": result_bytes * share,
      "ragged-all-to-all": result_bytes * share,
      "collective-permute": result_bytes,
  }[kind]


def _collective_kind(opcode: str) -> str | None:
  base = opcode.removesuffix("-start")
  return base if base in COLLECTIVES and not opcode.endswith("-done") else None


def _fusion_operand_bytes(instruction: _Instruction, caller: _Computation,
                          body: _Computation | None) -> float:
  """HBM bytes a fusion reads: an operand that the fused code only slices counts at
  the slices' size; the buffer a dynamic-update-slice writes in place is not read, nor
  is one passed through to the fusion's outputs untouched (the buffer an async
  collective fills while the fusion computes)."""
  params = {}
  if body is not None:
    for inner in body.instructions.values():
      if inner.opcode == "parameter":
        params[int(inner.args)] = inner.name
  users = collections.defaultdict(list)
  if body is not None:
    for inner in body.instructions.values():
      for k, operand in enumerate(inner.operands):
        users[operand].append((inner, k))
  total = 0.0
  for i, operand in enumerate(instruction.operands):
    source = caller.instructions.get(operand)
    full = array_bytes(source.type, hbm_only=True) if source else 0.0
    uses = users.get(params.get(i, ""), [])
    if uses and all(u.opcode in _SLICES and k == 0 for u, k in uses):
      full = min(full, sum(array_bytes(u.type) for u, _ in uses))
    elif uses and all((u.opcode == "dynamic-update-slice" and k == 0)
                      or (u.is_root and u.opcode == "tuple") for u, _ in uses):
      full = 0.0
    total += full
  return total


def _result_bytes(instruction: _Instruction, body: _Computation | None) -> float:
  """HBM bytes an operation writes: an in-place dynamic-update-slice writes only the
  update; a fusion's outputs that are its inputs passed through, or a collective's
  result (counted once per collective in `summarize`), write nothing here."""
  if body is None:
    if _collective_kind(instruction.opcode):
      return 0.0
    return array_bytes(_output_type(instruction), hbm_only=True)
  root = body.root
  elements = [root]
  if root.opcode == "tuple":
    elements = [body.instructions.get(o) for o in root.operands]
  total = 0.0
  for element, element_type in zip(elements, _tuple_elements(instruction.type)
                                   if root.opcode == "tuple" else [instruction.type]):
    if element is None or element.opcode == "parameter" or _collective_kind(
        element.opcode):
      continue
    if element.opcode == "dynamic-update-slice":
      update = body.instructions.get(element.operands[1])
      total += array_bytes(update.type) if update is not None else 0.0
      continue
    total += array_bytes(element_type, hbm_only=True)
  return total


def summarize(text: str, num_devices: int) -> HloSummary:
  """Collectives and HBM traffic per step of one chip's program (`as_text()`)."""
  computations = parse(text)
  counts, inlined, loops, unknown = _multiplicities(computations)
  by_channel: dict[tuple[str, str], tuple[float, float, float, float]] = {}
  hbm = 0.0
  for c in computations.values():
    n = counts.get(c.name, 0.0)
    if not n:
      continue
    scheduled = c.name not in inlined
    for instruction in c.instructions.values():
      kind = _collective_kind(instruction.opcode)
      if kind is not None:
        size = (_largest_array(instruction.type) if instruction.opcode.endswith("-start")
                and kind != "all-reduce" else array_bytes(instruction.type))
        group = group_size(instruction.attributes, num_devices)
        # An async collective that the compiler split into pieces (a collective
        # matmul) keeps one channel id: one logical collective.
        channel = re.search(r"channel_id=(\d+)", instruction.attributes)
        key = (kind, channel.group(1) if channel else f"{c.name}/{instruction.name}")
        old = by_channel.get(key, (0.0, 0.0, 0.0, 0.0))
        written = array_bytes(_output_type(instruction), hbm_only=True)
        by_channel[key] = (max(old[0], n), max(old[1], size),
                           max(old[2], ici_bytes(kind, size, group)),
                           max(old[3], written))
      if (not scheduled or instruction.opcode in _NO_TRAFFIC
          or instruction.opcode.endswith("-done")):
        continue
      body = None
      if instruction.opcode == "fusion":
        body = computations.get(dict(_callees(instruction)).get("calls", ""))
      if instruction.opcode in _SLICES:
        # Reads the slice (from HBM unless its source is on chip), writes the result.
        out = _output_type(instruction)
        source = c.instructions.get(instruction.operands[0]) if instruction.operands \
            else None
        in_hbm = source is None or array_bytes(source.type, hbm_only=True) > 0
        moved = array_bytes(out) * in_hbm + array_bytes(out, hbm_only=True)
      elif instruction.opcode == "dynamic-update-slice":
        update = c.instructions.get(instruction.operands[1])
        moved = 2 * array_bytes(update.type) if update else 0.0
      else:
        moved = (_fusion_operand_bytes(instruction, c, body) if body is not None else
                 sum(array_bytes(c.instructions[o].type, hbm_only=True)
                     for o in instruction.operands if o in c.instructions))
        moved += _result_bytes(instruction, body)
      hbm += n * moved
  collectives: dict[str, Collective] = {}
  for (kind, _), (n, size, received, written) in by_channel.items():
    hbm += n * written  # its result, written to HBM once
    entry = collectives.setdefault(kind, Collective(kind, 0, 0.0, 0.0))
    entry.count += int(n)
    entry.bytes += n * size
    entry.ici_bytes += n * received
  return HloSummary(collectives=dict(sorted(collectives.items())), hbm_bytes=hbm,
                    loops=loops, unknown_loops=unknown)
