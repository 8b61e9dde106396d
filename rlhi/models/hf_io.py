"""Hugging Face checkpoints <-> `llama` params, and config.json mapping.

Loading reads safetensors tensor by tensor, and each device shard by slice, via
`jax.make_array_from_callback`, so parameters land directly in their target
sharding and no host ever holds the whole model. Export writes a standard HF
directory (config.json, generation_config.json, sharded safetensors + index)
that `transformers` and vLLM load.

Supported architectures: those registered in `rlhi.models.families` (built in:
LlamaForCausalLM incl. Llama-3.x "llama3" RoPE scaling, Qwen2ForCausalLM with q/k/v
bias, MistralForCausalLM with a sliding window); a family gives the config.json
mapping and the tensor names, this module the layouts, checks and placement.
No torch import here: safetensors is read with framework="numpy" (bfloat16 via
ml_dtypes).

`load_params(source, config, shardings)` is the loading core over any `TensorSource`
(HF-named tensors in HF layout, read by slice): a safetensors directory here, a GGUF
file in `gguf_io`. Model names and .gguf paths resolve in `sources`.

Directories may be local or remote (gs://..., anything etils.epath supports). A remote
safetensors file is read like a local one, tensor by tensor and slice by slice, with
range reads (`fileio.open_safetensors`), so no host downloads the whole checkpoint; export
uploads each shard as it is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy

from rlhi import fileio
from rlhi import sharding as sharding_lib
from rlhi.models import families
from rlhi.models import llama

Params = Any

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}


# ---------------------------------------------------------------------------
# config.json <-> LlamaConfig, through the family registered for it.
# ---------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], source: str = CONFIG_FILE,
                   **overrides: Any) -> llama.LlamaConfig:
  """Maps an HF config dict to a LlamaConfig, by its registered family
  (rlhi.models.families: Llama, Qwen2, Mistral, ...).

  Args:
    hf: the parsed config.json.
    source: file name used in error messages.
    **overrides: LlamaConfig fields to set (e.g. scan_layers, dtype).
  """
  fields = families.for_hf(hf, source).config_from_hf(hf, source)
  fields.update(overrides)
  return llama.LlamaConfig(**fields)


def model_type_of(config: llama.LlamaConfig) -> str:
  """HF model_type that represents this config exactly."""
  return families.for_config(config).name


def config_to_hf(config: llama.LlamaConfig,
                 family: families.Family | None = None) -> dict[str, Any]:
  """LlamaConfig -> HF config.json dict (keys read by transformers, vLLM), as `family`
  (default: the one that represents `config` exactly) writes it."""
  return (family or families.for_config(config)).config_to_hf(config)


def _read_hf_config(path: str) -> tuple[dict[str, Any], str]:
  file = os.path.join(path, CONFIG_FILE)
  with fileio.open(file) as f:
    return json.load(f), file


def load_config(path: str, **overrides: Any) -> llama.LlamaConfig:
  """Reads `path/config.json` into a LlamaConfig."""
  hf, file = _read_hf_config(path)
  return config_from_hf(hf, source=file, **overrides)


def family_of(path: str, config: llama.LlamaConfig | None = None) -> families.Family:
  """The family of the checkpoint directory `path`: by its config.json, or (with none
  there) the one that represents `config`."""
  if config is not None and not fileio.exists(os.path.join(path, CONFIG_FILE)):
    return families.for_config(config)
  hf, file = _read_hf_config(path)
  return families.for_hf(hf, file)


# ---------------------------------------------------------------------------
# Name and layout mapping.
#
# The names come from the family (`Family.hf_name`): each of our leaves is an HF
# tensor after a fixed transpose/reshape ("kind").
# `_read` produces any rectangular slice of our layout from the smallest
# covering slice of the HF tensor.
# ---------------------------------------------------------------------------


def _hf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  """Our (per-layer) shape -> the HF tensor's shape."""
  if kind == "linear":
    return shape[::-1]
  if kind == "heads_in":                      # [E, N, D] <- [N*D, E]
    return (shape[1] * shape[2], shape[0])
  if kind == "heads_in_bias":                 # [N, D] <- [N*D]
    return (shape[0] * shape[1],)
  if kind == "heads_out":                     # [H, D, E] <- [E, H*D]
    return (shape[2], shape[0] * shape[1])
  return shape


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  """Our (per-layer) array -> the HF tensor."""
  if kind == "linear":
    return x.T
  if kind == "heads_in":
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_in_bias":
    return x.reshape(-1)
  if kind == "heads_out":
    return x.reshape(-1, x.shape[2]).T
  return x


def _read(tensor_slice, kind: str, idx: tuple[slice, ...],
          shape: tuple[int, ...]) -> np.ndarray:
  """Reads our-layout slice `idx` (of our per-layer `shape`) from an HF
  tensor via safetensors' lazy `get_slice` object."""
  s = [slice(*i.indices(n)) for i, n in zip(idx, shape)]
  if kind == "identity":
    return tensor_slice[tuple(s)]
  if kind == "linear":
    return tensor_slice[s[1], s[0]].T
  if kind == "heads_in":                      # ours[e, n, d] = W[n*D + d, e]
    e, n, d = s
    dim = shape[2]
    w = tensor_slice[n.start * dim:n.stop * dim, e]
    w = w.reshape(n.stop - n.start, dim, -1).transpose(2, 0, 1)
    return w[:, :, d]
  if kind == "heads_in_bias":                 # ours[n, d] = b[n*D + d]
    n, d = s
    dim = shape[1]
    b = tensor_slice[n.start * dim:n.stop * dim]
    return b.reshape(n.stop - n.start, dim)[:, d]
  if kind == "heads_out":                     # ours[h, d, e] = W[e, h*D + d]
    h, d, e = s
    dim = shape[1]
    w = tensor_slice[e, h.start * dim:h.stop * dim]
    w = w.reshape(-1, h.stop - h.start, dim).transpose(1, 2, 0)
    return w[:, d, :]
  raise ValueError(kind)


def _leaves(config: llama.LlamaConfig) -> list[tuple[tuple[str, ...],
                                                    tuple[int, ...]]]:
  """(path, shape) of every parameter of `config`, in a stable order."""
  shapes = sharding_lib.strip_boxes(llama.abstract_params(config))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return [(tuple(k.key for k in path), tuple(leaf.shape))
          for path, leaf in flat]


def _layer_of(path: tuple[str, ...]) -> tuple[int | None, tuple[str, ...]]:
  """('layers_3', ...) -> (3, rest); ('layers', ...) -> (-1, rest)."""
  head = path[0]
  if head == "layers":
    return -1, path[1:]
  m = re.fullmatch(r"layers_(\d+)", head)
  if m:
    return int(m.group(1)), path[1:]
  return None, path


def hf_tensor_names(config: llama.LlamaConfig,
                    family: families.Family | None = None) -> list[str]:
  """HF names of all tensors a checkpoint of `config` must contain (names of `family`,
  default the one that represents `config`)."""
  family = family or families.for_config(config)
  names = []
  for path, _ in _leaves(config):
    layer, rest = _layer_of(path)
    if layer == -1:
      names += [family.hf_name(rest, i)[0] for i in range(config.num_layers)]
    else:
      names.append(family.hf_name(rest, layer)[0])
  return names


# safe_open for a local file, range reads for a remote one (rlhi.fileio).


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


def _checkpoint_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file (full path)."""
  index = os.path.join(path, INDEX_FILE)
  if fileio.exists(index):
    with fileio.open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  files = sorted(f for f in fileio.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"No *.safetensors files or {INDEX_FILE} in {path}")
  out = {}
  for file in files:
    full = os.path.join(path, file)
    with contextlib.ExitStack() as stack:
      for name in fileio.open_safetensors(full, stack).keys():
        out[name] = full
  return out


def load_checkpoint(
    path: str,
    config: llama.LlamaConfig | None = None,
    shardings: Any = None,
    **config_overrides: Any,
) -> tuple[llama.LlamaConfig, Params]:
  """Loads an HF checkpoint directory into (config, params).

  Args:
    path: directory with config.json and model.safetensors or sharded
      safetensors with model.safetensors.index.json.
    config: defaults to config.json mapped by `config_from_hf` with
      `config_overrides` applied (e.g. scan_layers=False, param_dtype=...).
    shardings: pytree of `jax.sharding.Sharding` matching the params (e.g.
      `sharding.logical_shardings(llama.abstract_params(config), mesh)`); by
      default everything goes to the first device.
    **config_overrides: see `config`.

  Returns:
    (config, params) with params in config.param_dtype.

  Raises:
    ValueError: a tensor in the checkpoint is not part of the model, a
      tensor is missing, or a shape differs; the message names tensor and file.
  """
  if config is None:
    config = load_config(path, **config_overrides)
  family = family_of(path, config)
  files = _checkpoint_files(path)
  with contextlib.ExitStack() as stack:
    source = _SafetensorsSource(files, stack,
                                f"any safetensors file of {path} "
                                f"({sorted(set(files.values()))})")
    return config, load_params(source, config, shardings, family)


class TensorSource(Protocol):
  """HF-named tensors in HF layout, read by slice: what `load_params` consumes.

  A safetensors directory is one; `gguf_io` makes a GGUF file another, so both
  share this module's name/layout table, checks and sharded placement.
  """

  # Where the whole source is, for "not found in ..." messages.
  description: str

  def locations(self) -> dict[str, str]:
    """HF tensor name -> where it is (a file, a GGUF tensor name), for messages."""

  def get_slice(self, name: str) -> Any:
    """An object with get_shape() and numpy-style [idx] reads of tensor `name`."""


class _SafetensorsSource:
  """Tensors of one HF checkpoint's safetensors files, each opened on first use."""

  def __init__(self, files: dict[str, str], stack: contextlib.ExitStack,
               description: str):
    self._files, self._stack = files, stack
    self._handles: dict[str, Any] = {}
    self.description = description

  def locations(self) -> dict[str, str]:
    return dict(self._files)

  def get_slice(self, name: str) -> Any:
    file = self._files[name]
    if file not in self._handles:
      self._handles[file] = fileio.open_safetensors(file, self._stack)
    return self._handles[file].get_slice(name)


def load_params(source: TensorSource, config: llama.LlamaConfig,
                shardings: Any = None, family: families.Family | None = None
                ) -> Params:
  """Params of `config` from HF-named tensors, each shard read by slice.

  Args:
    source: the tensors (see `TensorSource`).
    config: the model they belong to.
    shardings: as for `load_checkpoint`; default the first device.
    family: whose tensor names `source` uses; default the family that represents
      `config`.

  Raises:
    ValueError: a tensor of `source` is not part of the model, one is missing,
      or a shape differs; the message names the tensor and where it is.
  """
  family = family or families.for_config(config)
  where = source.locations()
  leaves = _leaves(config)
  expected = hf_tensor_names(config, family)
  allowed = set(expected)
  if config.tie_embeddings:
    allowed.add(family.lm_head_name())  # Some tied checkpoints still carry it.
  for name, file in sorted(where.items()):
    if name not in allowed and not family.ignored_tensors.fullmatch(name):
      raise ValueError(
          f"Unknown tensor {name!r} in {file}: not a parameter of a "
          f"{family.name} model with {config.num_layers} layers "
          f"(qkv_bias={config.qkv_bias}, tie_embeddings="
          f"{config.tie_embeddings})")
  missing = [n for n in expected if n not in where]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(f"Missing tensor {missing[0]!r}{more}: not found in "
                     f"{source.description}")

  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device,
                             sharding_lib.strip_boxes(llama.abstract_params(config)))
  sharding_leaves = jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if len(sharding_leaves) != len(leaves):
    raise ValueError(f"shardings has {len(sharding_leaves)} leaves, the params"
                     f" of {config} have {len(leaves)}")
  dtype = _DTYPES[config.param_dtype]

  def tensor(name: str):
    return source.get_slice(name), where[name]

  def check_shape(name, kind, layer_shape):
    sl, file = tensor(name)
    want, got = _hf_shape(layer_shape, kind), tuple(sl.get_shape())
    if want != got:
      raise ValueError(f"Tensor {name!r} in {file} has shape {got}, "
                       f"expected {want} for config {config}")

  arrays = []
  for (path_, shape), sharding in zip(leaves, sharding_leaves):
    layer, rest = _layer_of(path_)
    stacked = layer == -1
    if stacked:
      names_kinds = [family.hf_name(rest, i) for i in range(config.num_layers)]
      layer_shape = shape[1:]
    else:
      names_kinds = [family.hf_name(rest, layer)]
      layer_shape = shape
    for name, kind in names_kinds:
      check_shape(name, kind, layer_shape)
    arrays.append(jax.make_array_from_callback(
        shape, sharding,
        _slice_reader(tensor, names_kinds, layer_shape, stacked, dtype),
        dtype=dtype))
  return jax.tree.unflatten(
      jax.tree.structure(sharding_lib.strip_boxes(llama.abstract_params(config))),
      arrays)


def _slice_reader(tensor: Callable, names_kinds, layer_shape, stacked: bool,
                  dtype) -> Callable:
  """make_array_from_callback callback: reads only the requested slice.

  Replicated shards ask for the same slice on every device; they are read
  once.
  """
  memo: dict[Any, np.ndarray] = {}

  def read(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in memo:
      if stacked:
        layers = range(*index[0].indices(len(names_kinds)))
        parts = [_read(tensor(names_kinds[i][0])[0], names_kinds[i][1],
                       tuple(index[1:]), layer_shape) for i in layers]
        out = np.stack(parts) if parts else np.zeros(
            (0,) + layer_shape, dtype)
      else:
        name, kind = names_kinds[0]
        out = _read(tensor(name)[0], kind, tuple(index), layer_shape)
      memo[key] = np.ascontiguousarray(out.astype(dtype))
    return memo[key]

  return read


# ---------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------


def save_checkpoint(params: Params, config: llama.LlamaConfig, path: str,
                    max_shard_size: int = 5 * 2**30,
                    dtype: str | None = None,
                    family: families.Family | None = None) -> None:
  """Writes an HF checkpoint directory loadable by transformers and vLLM.

  Tensors are fetched one at a time (one layer of a scanned stack at a time).
  With several processes, all must call this (gathers are collective); only
  process 0 writes.

  Args:
    params: model params (any sharding).
    config: their config.
    path: output directory (created).
    max_shard_size: bytes per safetensors file; more than one file gets
      `model-0000i-of-0000n.safetensors` plus model.safetensors.index.json.
    dtype: storage dtype ("bfloat16", "float32", "float16"); default
      config.param_dtype.
    family: the tensor names and config.json to write; default the family that
      represents `config` exactly (Llama, Qwen2 or Mistral).
  """
  family = family or families.for_config(config)
  dtype = dtype or config.param_dtype
  np_dtype = _DTYPES[dtype]
  itemsize = np.dtype(np_dtype).itemsize
  # (name, kind, getter) in HF order; getters fetch lazily.
  plan = []
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  by_path = {tuple(k.key for k in p): leaf for p, leaf in flat}
  for path_, shape in _leaves(config):
    leaf = by_path[path_]
    layer, rest = _layer_of(path_)
    if layer == -1:
      for i in range(config.num_layers):
        name, kind = family.hf_name(rest, i)
        plan.append((name, kind, shape[1:],
                     lambda leaf=leaf, i=i: sharding_lib.to_host(leaf[i])))
    else:
      name, kind = family.hf_name(rest, layer)
      plan.append((name, kind, shape, lambda leaf=leaf: sharding_lib.to_host(leaf)))
  order = {n: i for i, n in enumerate(hf_tensor_names(config, family))}
  plan.sort(key=lambda p: order[p[0]])

  shards: list[list] = [[]]
  size = 0
  for item in plan:
    nbytes = math.prod(item[2]) * itemsize
    if shards[-1] and size + nbytes > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  total_size = sum(math.prod(p[2]) * itemsize for p in plan)

  write = jax.process_index() == 0
  if write:
    fileio.makedirs(path)
  weight_map = {}
  for i, shard in enumerate(shards):
    file = (SINGLE_FILE if len(shards) == 1 else
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    tensors = {name: np.ascontiguousarray(_to_hf(get(), kind).astype(np_dtype))
               for name, kind, _, get in shard}
    if write:
      _save_safetensors(tensors, os.path.join(path, file), {"format": "pt"})
    weight_map.update({name: file for name in tensors})
    del tensors
  if not write:
    return
  if len(shards) > 1:
    with fileio.open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total_size},
                 "weight_map": weight_map}, f, indent=2)
  with fileio.open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config_to_hf(dataclasses.replace(config, param_dtype=dtype), family),
              f, indent=2)
  eos = list(config.eos_token_ids)
  generation = {"_from_model_config": True}
  if config.bos_token_id is not None:
    generation["bos_token_id"] = config.bos_token_id
  if eos:
    generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
  with fileio.open(os.path.join(path, GENERATION_CONFIG_FILE), "w") as f:
    json.dump(generation, f, indent=2)


def _save_safetensors(tensors: dict[str, np.ndarray], file: str,
                      metadata: dict[str, str]) -> None:
  """safetensors.numpy.save_file; to a remote file as one upload of the serialized
  bytes (one shard, at most max_shard_size, in host memory; no local disk needed)."""
  if fileio.is_remote(file):
    fileio.write_bytes(file, safetensors.numpy.save(tensors, metadata=metadata))
  else:
    safetensors.numpy.save_file(tensors, file, metadata=metadata)

