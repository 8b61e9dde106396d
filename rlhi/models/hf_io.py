"""Hugging Face checkpoints <-> `llama` params, and config.json mapping.

Loading reads safetensors tensor by tensor, and each device shard by slice, via
`jax.make_array_from_callback`, so parameters land directly in their target
sharding and no host ever holds the whole model. Export writes a standard HF
directory (config.json, generation_config.json, sharded safetensors + index)
that `transformers` and vLLM load.

Supported architectures: LlamaForCausalLM (incl. Llama-3.x "llama3" RoPE
scaling), Qwen2ForCausalLM (q/k/v bias), MistralForCausalLM (sliding window).
No torch import here: safetensors is read with framework="numpy" (bfloat16 via
ml_dtypes).

`load_params(source, config, shardings)` is the loading core over any `TensorSource`
(HF-named tensors in HF layout, read by slice): a safetensors directory here, a GGUF
file in `gguf_io`. Model names and .gguf paths resolve in `sources`.

Directories may be local or remote (gs://..., anything etils.epath supports). A remote
safetensors file is read like a local one, tensor by tensor and slice by slice, with
range reads (`_RemoteSafetensors`), so no host downloads the whole checkpoint; export
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
import safetensors
import safetensors.numpy

from rlhi import fileio
from rlhi import sharding as sharding_lib
from rlhi.models import llama

Params = Any

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}

# Checkpoint tensors that are derived buffers, not parameters.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}


# ---------------------------------------------------------------------------
# config.json <-> LlamaConfig.
# ---------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], source: str = CONFIG_FILE,
                   **overrides: Any) -> llama.LlamaConfig:
  """Maps an HF config dict (Llama / Qwen2 / Mistral) to a LlamaConfig.

  Args:
    hf: the parsed config.json.
    source: file name used in error messages.
    **overrides: LlamaConfig fields to set (e.g. scan_layers, dtype).
  """
  model_type = hf.get("model_type")
  if model_type not in _ARCHITECTURES:
    raise ValueError(f"{source}: model_type={model_type!r} is not supported; "
                     f"expected one of {sorted(_ARCHITECTURES)}")

  def unsupported(field, value, expected):
    raise ValueError(f"{source}: {field}={value!r} is not supported "
                     f"(expected {expected})")

  if hf.get("hidden_act", "silu") != "silu":
    unsupported("hidden_act", hf["hidden_act"], "'silu'")
  if model_type in ("llama", "mistral"):
    if hf.get("attention_bias", False):
      unsupported("attention_bias", True, "false; o_proj bias is not modelled")
    if hf.get("mlp_bias", False):
      unsupported("mlp_bias", True, "false")

  # transformers >= 5 writes `rope_parameters`; older files (and the Hub's
  # Llama-3 checkpoints) have rope_theta + rope_scaling.
  rope = dict(hf.get("rope_parameters") or {})
  theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
  if not rope or set(rope) <= {"rope_theta", "rope_type"}:
    rope = dict(hf.get("rope_scaling") or rope)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    rope_scaling = None
  elif rope_type == "llama3":
    rope_scaling = llama.RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(
            rope["original_max_position_embeddings"]))
  else:
    unsupported("rope_type", rope_type, "'default' or 'llama3'")

  sliding_window = None
  if model_type == "mistral":
    sliding_window = hf.get("sliding_window")
  elif model_type == "qwen2":
    layer_types = hf.get("layer_types") or []
    uses_window = hf.get("use_sliding_window", False) and (
        hf.get("max_window_layers", 0) < hf["num_hidden_layers"])
    if "sliding_attention" in layer_types or uses_window:
      unsupported("use_sliding_window", True,
                  "false (per-layer windows are not modelled)")

  eos = hf.get("eos_token_id")
  eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  if dtype not in _DTYPES:
    unsupported("torch_dtype", dtype, f"one of {sorted(_DTYPES)}")
  num_heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      rope_theta=float(theta),
      rope_scaling=rope_scaling,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2",
      sliding_window=sliding_window,
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=eos,
      param_dtype=dtype,
      dtype=dtype,
  )
  fields.update(overrides)
  return llama.LlamaConfig(**fields)


def model_type_of(config: llama.LlamaConfig) -> str:
  """HF model_type that represents this config exactly."""
  if config.qkv_bias:
    if config.sliding_window is not None:
      raise ValueError("qkv_bias with sliding_window has no HF equivalent")
    return "qwen2"
  if config.sliding_window is not None:
    return "mistral"
  return "llama"


def config_to_hf(config: llama.LlamaConfig) -> dict[str, Any]:
  """LlamaConfig -> HF config.json dict (keys read by transformers, vLLM)."""
  model_type = model_type_of(config)
  rs = config.rope_scaling
  eos = list(config.eos_token_ids)
  hf = {
      "architectures": [_ARCHITECTURES[model_type]],
      "model_type": model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.norm_eps,
      # The pre-v5 layout of the Hub's Llama-3 checkpoints: read by
      # transformers 4.x and 5.x and by vLLM.
      "rope_theta": config.rope_theta,
      "rope_scaling": None if rs is None else {
          "rope_type": "llama3",
          "factor": rs.factor,
          "low_freq_factor": rs.low_freq_factor,
          "high_freq_factor": rs.high_freq_factor,
          "original_max_position_embeddings":
              rs.original_max_position_embeddings,
      },
      "tie_word_embeddings": config.tie_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
      "torch_dtype": config.param_dtype,
      "initializer_range": config.init_std,
      "use_cache": True,
  }
  if model_type == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  elif model_type == "qwen2":
    hf.update(use_sliding_window=False, sliding_window=None,
              max_window_layers=config.num_layers)
  else:
    hf.update(sliding_window=config.sliding_window)
  return hf


def load_config(path: str, **overrides: Any) -> llama.LlamaConfig:
  """Reads `path/config.json` into a LlamaConfig."""
  file = os.path.join(path, CONFIG_FILE)
  with fileio.open(file) as f:
    return config_from_hf(json.load(f), source=file, **overrides)


# ---------------------------------------------------------------------------
# Name and layout mapping.
#
# Each of our leaves is the HF tensor after a fixed transpose/reshape ("kind").
# `_read` produces any rectangular slice of our layout from the smallest
# covering slice of the HF tensor.
# ---------------------------------------------------------------------------


def _hf_name(path: tuple[str, ...], layer: int | None) -> tuple[str, str]:
  """Our param path (inside one layer if `layer` is set) -> (HF name, kind)."""
  *modules, leaf = path
  suffix = "bias" if leaf == "bias" else "weight"
  if layer is None:
    if modules == ["lm_head"]:
      return "lm_head.weight", "linear"
    return f"model.{'.'.join(modules)}.{suffix}", "identity"
  name = f"model.layers.{layer}.{'.'.join(modules)}.{suffix}"
  module = modules[-1]
  if module in ("q_proj", "k_proj", "v_proj"):
    kind = "heads_in_bias" if leaf == "bias" else "heads_in"
  elif module == "o_proj":
    kind = "heads_out"
  elif module in ("gate_proj", "up_proj", "down_proj"):
    kind = "linear"
  else:
    kind = "identity"
  return name, kind


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


def hf_tensor_names(config: llama.LlamaConfig) -> list[str]:
  """HF names of all tensors a checkpoint of `config` must contain."""
  names = []
  for path, _ in _leaves(config):
    layer, rest = _layer_of(path)
    if layer == -1:
      names += [_hf_name(rest, i)[0] for i in range(config.num_layers)]
    else:
      names.append(_hf_name(rest, layer)[0])
  return names


# ---------------------------------------------------------------------------
# Remote safetensors: the part of safetensors.safe_open that loading uses
# (keys, get_slice(...)[idx], get_shape, get_tensor) over range reads, since
# safe_open needs a local file (it mmaps it).
#
# Format: 8 bytes little-endian header length N, N bytes of JSON header
# {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
# then the data; offsets count from the end of the header; tensors are
# C-contiguous, little-endian.
# ---------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
}


class _RemoteSafetensors:
  """A safetensors file read through an open binary file object with range reads."""

  def __init__(self, f, file: str):
    self._f, self._file = f, file
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    self._header = header
    self._data_start = 8 + n

  def keys(self) -> list[str]:
    return sorted(self._header)

  def get_slice(self, name: str) -> _RemoteSlice:
    info = self._header[name]
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"Tensor {name!r} in {self._file} has dtype {info['dtype']}, "
                       f"not one of {sorted(_SAFETENSORS_DTYPES)}")
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize:
      raise ValueError(f"Tensor {name!r} in {self._file}: data_offsets {begin}..{end} "
                       f"do not fit shape {shape} of {info['dtype']}")
    return _RemoteSlice(self, self._data_start + begin, shape, dtype)

  def get_tensor(self, name: str) -> np.ndarray:
    return self.get_slice(name)[...]

  def read(self, offset: int, size: int) -> bytes:
    self._f.seek(offset)
    data = self._f.read(size)
    if len(data) != size:
      raise ValueError(f"{self._file}: truncated (wanted {size} bytes at {offset}, "
                       f"got {len(data)})")
    return data


class _RemoteSlice:
  """`get_slice` result: reads only the rows its index selects on the first axis."""

  def __init__(self, file: _RemoteSafetensors, offset: int, shape: tuple[int, ...],
               dtype: np.dtype):
    self._file, self._offset, self._shape, self._dtype = file, offset, shape, dtype

  def get_shape(self) -> list[int]:
    return list(self._shape)

  def __getitem__(self, idx) -> np.ndarray:
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not self._shape or not idx or idx[0] is Ellipsis:  # everything
      data = self._file.read(self._offset, math.prod(self._shape) * self._dtype.itemsize)
      return np.frombuffer(data, self._dtype).reshape(self._shape)[idx]
    first, rest = idx[0], idx[1:]
    n = self._shape[0]
    if isinstance(first, slice):
      rows = range(*first.indices(n))
    else:  # an integer
      i = int(first) + n if int(first) < 0 else int(first)
      if not 0 <= i < n:
        raise IndexError(f"index {first} out of range for axis 0 of size {n}")
      rows = range(i, i + 1)
    row_shape = self._shape[1:]
    if not rows:
      return np.zeros((0,) + row_shape, self._dtype)[(slice(None),) + rest]
    lo, hi = min(rows), max(rows) + 1
    row_bytes = math.prod(row_shape) * self._dtype.itemsize
    data = self._file.read(self._offset + lo * row_bytes, (hi - lo) * row_bytes)
    block = np.frombuffer(data, self._dtype).reshape((hi - lo,) + row_shape)
    if not isinstance(first, slice):
      return block[(0,) + rest]
    stop = rows.stop - lo
    local = slice(rows.start - lo, stop if stop >= 0 else None, rows.step)
    return block[(local,) + rest]


def _open_safetensors(file: str, stack: contextlib.ExitStack):
  """safetensors.safe_open (mmap) for a local file, range reads for a remote one."""
  if fileio.is_remote(file):
    return _RemoteSafetensors(stack.enter_context(fileio.open(file, "rb")), file)
  return stack.enter_context(safetensors.safe_open(file, framework="numpy"))


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
      for name in _open_safetensors(full, stack).keys():
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
  files = _checkpoint_files(path)
  with contextlib.ExitStack() as stack:
    source = _SafetensorsSource(files, stack,
                                f"any safetensors file of {path} "
                                f"({sorted(set(files.values()))})")
    return config, load_params(source, config, shardings)


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
      self._handles[file] = _open_safetensors(file, self._stack)
    return self._handles[file].get_slice(name)


def load_params(source: TensorSource, config: llama.LlamaConfig,
                shardings: Any = None) -> Params:
  """Params of `config` from HF-named tensors, each shard read by slice.

  Args:
    source: the tensors (see `TensorSource`).
    config: the model they belong to.
    shardings: as for `load_checkpoint`; default the first device.

  Raises:
    ValueError: a tensor of `source` is not part of the model, one is missing,
      or a shape differs; the message names the tensor and where it is.
  """
  where = source.locations()
  leaves = _leaves(config)
  expected = set(hf_tensor_names(config))
  allowed = set(expected)
  if config.tie_embeddings:
    allowed.add("lm_head.weight")  # Some tied checkpoints still carry it.
  for name, file in sorted(where.items()):
    if name not in allowed and not _IGNORED.fullmatch(name):
      raise ValueError(
          f"Unknown tensor {name!r} in {file}: not a parameter of a "
          f"{model_type_of(config)} model with {config.num_layers} layers "
          f"(qkv_bias={config.qkv_bias}, tie_embeddings="
          f"{config.tie_embeddings})")
  missing = [n for n in hf_tensor_names(config) if n not in where]
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
      names_kinds = [_hf_name(rest, i) for i in range(config.num_layers)]
      layer_shape = shape[1:]
    else:
      names_kinds = [_hf_name(rest, layer)]
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
                    dtype: str | None = None) -> None:
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
  """
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
        name, kind = _hf_name(rest, i)
        plan.append((name, kind, shape[1:],
                     lambda leaf=leaf, i=i: sharding_lib.to_host(leaf[i])))
    else:
      name, kind = _hf_name(rest, layer)
      plan.append((name, kind, shape, lambda leaf=leaf: sharding_lib.to_host(leaf)))
  order = {n: i for i, n in enumerate(hf_tensor_names(config))}
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
    json.dump(config_to_hf(dataclasses.replace(config, param_dtype=dtype)),
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

