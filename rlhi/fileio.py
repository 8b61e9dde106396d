"""File io on local paths and on every path etils.epath supports (gs://, s3://, ...).

A local path goes to the builtins exactly as before (`open`, `os.makedirs`,
`os.replace`), so local behaviour does not change; a path with a scheme (`gs://b/run`)
goes through `etils.epath`, whose backend is tf.io.gfile when tensorflow is installed
and fsspec (gcsfs for gs://, `pip install -e .[tpu]`) otherwise.

Object stores differ from a file system in ways the callers must not trip over:
  - there is no append: an object is written whole, so `open(path, "a")` raises;
  - an object appears only once its upload completes, so uploading a finished local
    file is as atomic as a local temporary file plus rename (`atomic_write`);
  - libraries that need a real file (safetensors' mmap, sqlite, tensorboardX,
    transformers' save_pretrained) work on a local temporary copy (`local_input`,
    `local_output`); a safetensors file is the exception, read in place by range
    reads (`open_safetensors`), so that loading a checkpoint downloads only what each
    host's shards need.

Never imports jax: the data package (rlhi/data) uses this module.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO

from etils import epath
import numpy as np

PathLike = str | os.PathLike

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_COPY_CHUNK = 8 * 2**20


def is_remote(path: PathLike) -> bool:
  """True for a URI such as gs://bucket/dir (anything with a scheme)."""
  return _SCHEME.match(os.fspath(path)) is not None


def _epath(path: PathLike) -> epath.Path:
  return epath.Path(os.fspath(path))


# pylint: disable-next=redefined-builtin
def open(path: PathLike, mode: str = "r", *, encoding: str = "utf-8",
         newline: str | None = None) -> IO:
  """`builtins.open` for a local path; an epath file for a remote one.

  Text is always UTF-8 (also remotely, where fsspec would otherwise use the locale's
  encoding).
  """
  if not is_remote(path):
    return builtins.open(path, mode, encoding=None if "b" in mode else encoding,
                         newline=None if "b" in mode else newline)
  if "a" in mode or "+" in mode:
    raise ValueError(f"open({os.fspath(path)!r}, {mode!r}): object stores cannot "
                     f"append or update in place; write the object whole")
  binary_mode = mode.replace("t", "").replace("b", "") + "b"
  raw = _epath(path).open(binary_mode)
  if "b" in mode:
    return raw
  if isinstance(raw, io.IOBase):  # fsspec: wrap, to choose the encoding ourselves.
    return io.TextIOWrapper(raw, encoding=encoding, newline=newline)
  # tf.io.gfile.GFile is no io.IOBase (TextIOWrapper cannot wrap it) and its text mode
  # is UTF-8 already. Nothing was written to `raw`: GFile creates its writer lazily.
  raw.close()
  return _epath(path).open(mode.replace("t", ""))


def exists(path: PathLike) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  return _epath(path).exists()


def isdir(path: PathLike) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)
  return _epath(path).is_dir()


def listdir(path: PathLike) -> list[str]:
  """Names (not paths) in a directory, like os.listdir."""
  if not is_remote(path):
    return os.listdir(path)
  return [p.name for p in _epath(path).iterdir()]


def makedirs(path: PathLike) -> None:
  """os.makedirs(exist_ok=True); on an object store, whatever the backend needs."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
  else:
    _epath(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike) -> None:
  """Deletes one file (FileNotFoundError if there is none)."""
  if not is_remote(path):
    os.remove(path)
  else:
    _epath(path).unlink()


def read_bytes(path: PathLike) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def write_bytes(path: PathLike, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", *, newline: str | None = "\n"
                 ) -> Iterator[IO]:
  """A file that appears at `path` whole or not at all.

  Local: written to a temporary file of its own beside `path` (`<name>.<random>.tmp`,
  removed if the block raises), then renamed over `path`. Remote: written to a local
  temporary file, then uploaded as one object (an object becomes visible only when its
  upload completes; a rename on GCS is a copy plus a delete, no more atomic).
  """
  path = os.fspath(path)
  if is_remote(path):
    # Not straight to the object: closing a remote file uploads what it holds, also
    # when the block raised half-way. A local file is uploaded only on success.
    with tempfile.TemporaryDirectory(prefix="rlhi_") as tmp:
      local = os.path.join(tmp, _epath(path).name)
      with open(local, mode, newline=newline) as f:
        yield f
      copy_file(local, path)
    return
  # A temporary name of this writer's own (two writers of one path never share it), in
  # the same directory (so the rename is atomic), removed if the block raises.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                             prefix=os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    with open(tmp, mode, newline=newline) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file; either side may be local or remote. Streams in chunks."""
  if not is_remote(src) and not is_remote(dst):
    shutil.copyfile(src, dst)
    return
  with open(src, "rb") as fin, open(dst, "wb") as fout:
    while chunk := fin.read(_COPY_CHUNK):
      fout.write(chunk)


def upload_tree(local_dir: PathLike, dst: PathLike) -> None:
  """Copies every file under `local_dir` to the same relative path under `dst`."""
  local_dir = os.fspath(local_dir)
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = dst if rel == "." else os.path.join(dst, rel)
    if files:
      makedirs(target)
    for name in sorted(files):
      copy_file(os.path.join(root, name), os.path.join(target, name))


@contextlib.contextmanager
def local_input(path: PathLike, *, include: Callable[[str], bool] | None = None
                ) -> Iterator[str]:
  """A local path with the contents of `path` (a file, or a directory's top-level files).

  Local: `path` itself, nothing copied. Remote: a temporary copy, deleted on exit; for
  a directory only the files whose name passes `include` (e.g. a tokenizer's files,
  not the model weights beside them), subdirectories not at all.
  """
  path = os.fspath(path)
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="rlhi_") as tmp:
    if not isdir(path):
      local = os.path.join(tmp, _epath(path).name)
      copy_file(path, local)
      yield local
      return
    for child in _epath(path).iterdir():
      if (include is None or include(child.name)) and not child.is_dir():
        copy_file(os.fspath(child), os.path.join(tmp, child.name))
    yield tmp


@contextlib.contextmanager
def local_output(path: PathLike, *, is_dir: bool = False) -> Iterator[str]:
  """A local path to write to; what is written there ends up at `path`.

  Local: `path` itself (its directory created). Remote: a temporary file or
  directory, uploaded when the block exits without an exception (into `path`, next to
  what is there already), then deleted.
  """
  path = os.fspath(path)
  if not is_remote(path):
    makedirs(path if is_dir else (os.path.dirname(path) or "."))
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="rlhi_") as tmp:
    if is_dir:
      yield tmp
      upload_tree(tmp, path)
    else:
      local = os.path.join(tmp, _epath(path).name)
      yield local
      copy_file(local, path)


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


@functools.cache
def _safetensors_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (only safetensors readers)
  return {
      "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
      "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"),
      "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
      "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"),
      "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
  }


class RemoteSafetensors:
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
    dtypes = _safetensors_dtypes()
    if info["dtype"] not in dtypes:
      raise ValueError(f"Tensor {name!r} in {self._file} has dtype {info['dtype']}, "
                       f"not one of {sorted(dtypes)}")
    dtype = dtypes[info["dtype"]]
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

  def __init__(self, file: RemoteSafetensors, offset: int, shape: tuple[int, ...],
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


def open_safetensors(file: PathLike, stack: contextlib.ExitStack):
  """safetensors.safe_open(framework="numpy") for a local file (it mmaps it), range
  reads (`RemoteSafetensors`) for a remote one; closed when `stack` closes."""
  file = os.fspath(file)
  if is_remote(file):
    return RemoteSafetensors(stack.enter_context(open(file, "rb")), file)
  import safetensors  # pylint: disable=g-import-not-at-top  (only safetensors readers)
  return stack.enter_context(safetensors.safe_open(file, framework="numpy"))
