"""Imports run one way: data -> models -> train -> eval -> the top (docs: ARCHITECTURE.md).

Two checks:
  - the data layer's packages (every module of rlhi/data and rlhi/sim, client backends
    built) never import jax, flax, optax or orbax, nor a module of a higher layer, in a
    fresh interpreter;
  - an AST scan of every .py file under rlhi/ (imports inside functions included: a
    lazy import is still an import) finds no module importing a higher layer than its own.

Where each module of rlhi/ sits (LAYER_OF_PACKAGE, LAYER_OF_MODULE, SHARED below):

    layer   modules                                  why
    shared  rlhi/fileio.py, reports.py, sharding.py,  below every layer: anyone imports
            workdir_lock.py, cli.py, __init__.py      them; they import no layer, except
                                                      cli.py, which imports rlhi.data
                                                      (pipeline's and files' errors)
    data    rlhi/data/**                              jax-free data preparation
            rlhi/sim/**                               simulated users and their logs;
                                                      jax-free
    models  rlhi/models/**                            model families, io, scorer
            rlhi/inputs/**                            tokenized batches; imports data only
                                                      (jax lazily); models/scorer uses it
            rlhi/sampling.py, rlhi/generate.py        the KV-cache sampler over a model
            rlhi/local_backend.py                     backend='local': registers rlhi's
                                                      model with the data package's client
                                                      factory, from the model's layer
    train   rlhi/train/**                             one trainer per objective
            rlhi/losses.py                            DPO / Bradley-Terry losses
                                                      (imported by train/objectives only)
    eval    rlhi/eval/**                              judges, UserEval, reports
    top     rlhi/aot/**                               compiles every layer's programs
            rlhi/sweep.py, rlhi/sweep_runner.py       launch experiments (sweep_runner
                                                      runs their mains)
            rlhi/testing/**                           test helpers (a loopback server)

A module of rlhi/ that is in none of these tables fails the scan: give it a layer here.
"""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
RLHI = REPO / "rlhi"

LAYERS = ("data", "models", "train", "eval", "top")
RANK = {name: i for i, name in enumerate(LAYERS)}

# Below every layer: any module may import these. Value: the highest layer that the
# module itself may import (None: none, only other shared modules).
SHARED = {
    "rlhi": None,
    "rlhi.fileio": None,
    "rlhi.reports": None,
    "rlhi.sharding": None,
    "rlhi.workdir_lock": None,
    "rlhi.cli": "data",
}
LAYER_OF_PACKAGE = {
    "rlhi.data": "data",
    "rlhi.sim": "data",
    "rlhi.models": "models",
    "rlhi.train": "train",
    "rlhi.eval": "eval",
    "rlhi.inputs": "models",
    "rlhi.aot": "top",
    "rlhi.testing": "top",
}
LAYER_OF_MODULE = {
    "rlhi.sampling": "models",
    "rlhi.generate": "models",
    "rlhi.local_backend": "models",
    "rlhi.losses": "train",
    "rlhi.sweep": "top",
    "rlhi.sweep_runner": "top",
}
# Never imported from rlhi/ at all: the layer above `top`.
ABOVE_RLHI = ("experiments", "configs", "tests", "bench")

JAX_SIDE = ("jax", "flax", "optax", "orbax")

# The packages of the data layer: imported, module by module, without jax.
DATA_PACKAGES = tuple(p for p, layer in LAYER_OF_PACKAGE.items() if layer == "data")

# ----------------------------------------------------------------------------------------
# The data layer's packages in a fresh interpreter.
# ----------------------------------------------------------------------------------------

_DATA_SCRIPT = r"""
import importlib, json, os, pkgutil, sys, tempfile

modules = []
for package in %r:
  def fail(name, package=package):
    raise ImportError(f"walking {package}: cannot import {name}")
  top = importlib.import_module(package)
  modules.append(package)
  for info in pkgutil.walk_packages(top.__path__, package + ".", onerror=fail):
    importlib.import_module(info.name)
    modules.append(info.name)
# The modules below every layer that the data package uses.
import rlhi.fileio, rlhi.reports, rlhi.workdir_lock

from rlhi.data import client
backends = {}
with tempfile.TemporaryDirectory() as tmp:
  for backend in client.BACKENDS:
    cfg = {"backend": backend}
    if backend == "openai":
      cfg["model"] = "test-model"  # built only: no request is sent
    try:
      built = client.make_client(cfg, cache_path=os.path.join(tmp, backend + ".sqlite"))
    except ValueError as e:
      backends[backend] = {"error": str(e)}
    else:
      backends[backend] = {"class": type(built.inner).__name__,
                           "module": type(built.inner).__module__}
      built.close()
print(json.dumps({
    "modules": modules, "backends": backends,
    "jax_side": sorted(m for m in %r if m in sys.modules),
    "rlhi": sorted(m for m in sys.modules if m.startswith("rlhi")),
}))
""" % (DATA_PACKAGES, JAX_SIDE)


@pytest.fixture(scope="module")
def data_run():
  out = subprocess.run([sys.executable, "-c", _DATA_SCRIPT], capture_output=True,
                       text=True, cwd=REPO, check=False)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_data_module_imports_without_jax(data_run):
  modules = set(data_run["modules"])
  # The walk found the packages' modules, the client subpackage's included.
  assert {"rlhi.data.client", "rlhi.data.client.base", "rlhi.data.client.openai",
          "rlhi.data.client.reference", "rlhi.data.client.factory",
          "rlhi.data.files", "rlhi.data.pipeline", "rlhi.data.schema",
          "rlhi.sim", "rlhi.sim.features", "rlhi.sim.users"} <= modules
  assert data_run["jax_side"] == [], (
      f"importing {', '.join(DATA_PACKAGES)} loaded {data_run['jax_side']}")
  higher = [m for m in data_run["rlhi"]
            if m not in SHARED and _layer(m) != "data"]
  assert higher == [], (f"importing {', '.join(DATA_PACKAGES)} loaded modules of "
                        f"higher layers: {higher}")


def test_every_backend_resolves_without_jax(data_run):
  backends = data_run["backends"]
  assert backends["reference"] == {"class": "ReferenceClient",
                                   "module": "rlhi.data.client.reference"}
  assert backends["openai"] == {"class": "OpenAIClient",
                                "module": "rlhi.data.client.openai"}
  # A backend that runs rlhi's own model (jax) is registered from outside the data
  # package; without that, the error says what to import.
  assert "import rlhi.local_backend first" in backends["local"]["error"]
  for name, outcome in backends.items():
    assert "class" in outcome or "import rlhi." in outcome["error"], (name, outcome)
  assert data_run["jax_side"] == []


# ----------------------------------------------------------------------------------------
# The AST scan.
# ----------------------------------------------------------------------------------------


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _is_module(name: str) -> bool:
  path = REPO.joinpath(*name.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _layer(module: str) -> str | None:
  """'shared', a name of LAYERS, or None (unassigned)."""
  if module in SHARED:
    return "shared"
  if module in LAYER_OF_MODULE:
    return LAYER_OF_MODULE[module]
  for package, layer in LAYER_OF_PACKAGE.items():
    if module == package or module.startswith(package + "."):
      return layer
  return None


def _rank(module: str) -> int:
  layer = _layer(module)
  return -1 if layer == "shared" else RANK[layer]


def _ceiling(module: str) -> int:
  """The highest rank `module` may import."""
  if module in SHARED:
    return -1 if SHARED[module] is None else RANK[SHARED[module]]
  return _rank(module)


def _imports(path: pathlib.Path, module: str):
  """(line, imported module, as written) for every import in the file, at any depth."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name, f"import {alias.name}"
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
      written = f"from {'.' * node.level}{node.module or ''} import " + ", ".join(
          a.name for a in node.names)
      for alias in node.names:
        target = f"{base}.{alias.name}"
        yield node.lineno, target if _is_module(target) else base, written


def _scan():
  unassigned, violations = [], []
  for path in sorted(RLHI.rglob("*.py")):
    module = _module_name(path)
    where = path.relative_to(REPO)
    if _layer(module) is None:
      unassigned.append(f"{where}: module {module} has no layer (tests/test_layers.py)")
      continue
    for line, target, written in _imports(path, module):
      top = target.split(".")[0]
      if top in ABOVE_RLHI:
        violations.append(f"{where}:{line}: `{written}`: rlhi/ imports {top}/")
        continue
      if top != "rlhi":
        continue
      if _layer(target) is None:
        unassigned.append(f"{where}:{line}: `{written}`: {target} has no layer")
        continue
      if _rank(target) > _ceiling(module):
        own = _layer(module)
        own = f"shared, may import up to {SHARED[module] or 'no layer'}" if (
            own == "shared") else own
        violations.append(f"{where}:{line}: `{written}`: {module} ({own}) imports "
                          f"{target} ({_layer(target)})")
  return unassigned, violations


def test_every_module_has_a_layer():
  unassigned, _ = _scan()
  assert not unassigned, "\n".join(unassigned)


def test_imports_run_one_way():
  _, violations = _scan()
  assert not violations, ("a lower layer imports a higher one (data -> models -> train "
                          "-> eval -> top):\n" + "\n".join(violations))


def test_the_scan_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
  """The scan itself: an import inside a function, and a relative one, count."""
  package = tmp_path / "rlhi" / "data"
  package.mkdir(parents=True)
  (tmp_path / "rlhi" / "__init__.py").write_text("")
  (package / "__init__.py").write_text("")
  (tmp_path / "rlhi" / "train").mkdir()
  (tmp_path / "rlhi" / "train" / "__init__.py").write_text("")
  (tmp_path / "rlhi" / "train" / "loop.py").write_text("")
  (package / "lazy.py").write_text(
      "def f():\n  from rlhi.train import loop\n  from ..train import loop as l2\n")
  monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
  monkeypatch.setattr(sys.modules[__name__], "RLHI", tmp_path / "rlhi")
  _, violations = _scan()
  assert violations == [
      "rlhi/data/lazy.py:2: `from rlhi.train import loop`: rlhi.data.lazy (data) imports "
      "rlhi.train.loop (train)",
      "rlhi/data/lazy.py:3: `from ..train import loop`: rlhi.data.lazy (data) imports "
      "rlhi.train.loop (train)"], violations
