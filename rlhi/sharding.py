"""Device mesh and logical-axis sharding rules.

Modules annotate parameters and activations with logical axis names; a short
list of rules maps them onto the mesh axes `data`, `fsdp`, `tensor`. Placement
is declared here, never hand-placed in model code.

Typical use::

  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  shardings = sharding.logical_shardings(llama.abstract_params(config), mesh)
  params = sharding.shard_params(params, shardings)
  with sharding.use_mesh(mesh):           # activations follow the same rules
    hidden = jax.jit(llama.forward, static_argnums=1)(params, config, tokens)

(Multi-host initialisation and global batches belong in this module too; they
are added separately.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Earlier rules win; a repeated logical name is a fallback, used when the
# earlier choice is taken by another dim of the same array or does not divide
# the dim (see `logical_shardings`). Unlisted names are replicated.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("batch", "data"),
    ("batch", "fsdp"),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("vocab", "fsdp"),
    ("head_dim", None),
    ("layers", None),
)



def rules_from_config(value: Any, field: str = "config.sharding_rules") -> Rules:
  """`config.sharding_rules` -> Rules: empty means DEFAULT_RULES; otherwise a sequence
  of (logical name, mesh axes) pairs, axes None, one of MESH_AXES or a tuple of them,
  earlier pairs winning, as in MaxText's `logical_axis_rules`:

    --config.sharding_rules="(('batch', ('data', 'fsdp')), ('embed', 'fsdp'),
                              ('mlp', 'tensor'), ('heads', 'tensor'))"

  Logical names that no rule lists are replicated.
  """
  if not value:
    return DEFAULT_RULES
  rules = []
  for i, rule in enumerate(value):
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2
        or not isinstance(rule[0], str)):
      raise ValueError(f"{field}[{i}] = {rule!r}: expected a pair (logical name, mesh "
                       f"axes), e.g. ('embed', 'fsdp') or ('batch', ('data', 'fsdp'))")
    name, axes = rule
    names = (() if axes is None else (axes,) if isinstance(axes, str) else tuple(axes))
    bad = [a for a in names if a not in MESH_AXES]
    if bad:
      raise ValueError(f"{field}[{i}] = {rule!r}: mesh axes {bad} are not among "
                       f"{MESH_AXES}")
    rules.append((name, None if axes is None else
                  axes if isinstance(axes, str) else tuple(axes)))
  return tuple(rules)


def make_mesh(axes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 for "the rest".

  Args:
    axes: sizes by name; missing axes have size 1. Default: all devices on
      `fsdp`.
    devices: defaults to `jax.devices()`.

  Returns:
    A Mesh whose axes are of type Auto, so that the compiler propagates
    shardings from the logical constraints in the model.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = dict(axes or {"fsdp": -1})
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; expected a subset "
                     f"of {MESH_AXES}")
  sizes = [axes.get(name, 1) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {axes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"Mesh {axes}: {len(devices)} devices are not divisible"
                       f" by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs "
                     f"{math.prod(sizes)} devices, have {len(devices)}")
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types,
                         devices=devices)
  except NotImplementedError:
    # jax.make_mesh maps each mesh axis onto whole axes of the TPU torus and splits a
    # physical axis only on v5e: fsdp=16 x tensor=4 has no such mapping on an 8x8
    # v6e slice (found by compiling for one, rlhi/aot). Splitting a physical axis
    # still gives a valid mesh, its rings a little less aligned with the torus.
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(tuple(sizes), devices,
                                         allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _mesh_axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for one array, skipping rules that do not divide its dims.

  Flax's `nn.logical_to_mesh_axes` resolves the rules; when a chosen mesh
  axis does not divide the dim (e.g. 2 kv heads on tensor=4), that rule is
  dropped for this array and resolution is repeated, so the next rule for the
  same logical name acts as the fallback.
  """
  rules = [(name, tuple(axes) if isinstance(axes, list) else axes)
           for name, axes in rules]
  while True:
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    bad = next((i for i, (axes, dim) in enumerate(zip(spec, shape))
                if dim % _mesh_axis_size(mesh, axes)), None)
    if bad is None:
      return spec
    # Drop the first rule that assigned this name to these mesh axes.
    rules.remove(next(r for r in rules
                      if r[0] == names[bad] and r[1] == spec[bad]))


def logical_shardings(abstract_params: Any, mesh: Mesh,
                      rules: Rules = DEFAULT_RULES) -> Any:
  """NamedSharding pytree for logically annotated (boxed) abstract params.

  Args:
    abstract_params: e.g. `llama.abstract_params(config)` (that is,
      `jax.eval_shape(model.init, ...)["params"]`), whose leaves are
      `nn.LogicallyPartitioned` boxes; unboxed leaves are replicated.
    mesh: the device mesh.
    rules: logical -> mesh axis rules.

  Returns:
    The same (unboxed) tree structure with a NamedSharding per leaf.
  """

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = logical_to_spec(leaf.names, leaf.value.shape, mesh, rules)
    else:
      spec = PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(
      one, abstract_params,
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def strip_boxes(tree: Any) -> Any:
  """Logically boxed leaves (nn.Partitioned) -> their values.

  Unlike `nn.meta.unbox`, adds no sharding constraint: unbox() constrains each value
  to its logical spec, which fails outside jit while a mesh and rules are active.
  """
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def shard_params(params: Any, shardings: Any) -> Any:
  """Places an existing (unboxed) params pytree onto the given shardings."""
  return jax.device_put(params, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
  """Sets the mesh and the logical rules for the model's activation
  constraints (both are read when a function is traced)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh


def current_rules() -> Rules:
  """The rules `use_mesh` set (DEFAULT_RULES outside it)."""
  return tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES


# ---------------------------------------------------------------------------
# Multi-host: initialisation, global batches, process 0.
# ---------------------------------------------------------------------------


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` when this is one process of several.

  On a TPU slice every worker runs the same command and JAX finds its peers from the
  TPU metadata server: tpu/launch.sh sets RLHI_DISTRIBUTED=1 for that (the TPU VM's
  environment does not reliably say it is one worker of several, and calling
  initialize() off a cluster fails). Elsewhere (CPU tests, GPU clusters) the
  coordinator comes from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. Otherwise a single-process run: nothing to do.
  """
  import os  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif (os.environ.get("RLHI_DISTRIBUTED", "") in ("1", "true")
        or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1):
    jax.distributed.initialize()


def to_host(x: Any) -> Any:
  """Every array of `x` (a pytree) whole on this host, as numpy.

  An array that spans several processes (a batch sharded over hosts, FSDP-sharded
  params) is gathered collectively, so every process must call this with the same
  arrays; a fully addressable one is a plain device_get.
  """
  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))
  return jax.tree.map(one, x)


def is_main_process() -> bool:
  """Only process 0 logs, writes reports and exports."""
  return jax.process_index() == 0


def on_all_processes(ok: bool) -> bool:
  """True if `ok` on every process; a collective: all processes must call it."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def global_batch(host_batch: Mapping[str, Any], mesh: Mesh | None = None,
                 rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
  """This host's slice of the batch (numpy, [B/processes, ...]) -> global arrays.

  The leading axis is the logical `batch` axis (data and fsdp by default); the
  global batch is the concatenation of every host's slice in process order.
  """
  mesh = mesh if mesh is not None else jax.sharding.get_mesh()
  n = jax.process_count()
  out = {}
  for name, x in host_batch.items():
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
      continue  # metadata (strings) stays on the host
    global_shape = (x.shape[0] * n,) + x.shape[1:]
    out[name] = jax.make_array_from_process_local_data(
        batch_sharding(global_shape, mesh, rules), x, global_shape)
  return out


def row_multiple(mesh: Mesh, accum_steps: int = 1, rules: Rules = DEFAULT_RULES,
                 process_count: int | None = None) -> int:
  """Rows per host that a packed batch must be a multiple of (rlhi/inputs/batches.py
  `make_batches(packing=True)`): the global rows then split evenly over the devices
  of the batch axis and over `accum_steps` microbatches."""
  axes = nn.logical_to_mesh_axes(("batch",), [
      (name, tuple(a) if isinstance(a, list) else a) for name, a in rules])[0]
  need = _mesh_axis_size(mesh, axes) * accum_steps
  n = jax.process_count() if process_count is None else process_count
  return need // math.gcd(need, n)


def batch_sharding(global_shape: Sequence[int], mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """The sharding of one global batch array: its leading axis is the logical `batch`."""
  spec = logical_to_spec(("batch",) + (None,) * (len(global_shape) - 1), global_shape,
                         mesh, rules)
  return NamedSharding(mesh, spec)
