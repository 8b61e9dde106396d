r"""Will it fit? Compile an experiment's steps for a TPU slice, on this machine.

  pip install -e '.[tpu-compile]'      # libtpu: the TPU compiler, no TPU needed
  python -m experiments.compile --config configs/dpo.py:rewrites,llama3_8b \
      --topology v5litepod-64 --config.batch_size=128

Compiles (never runs) each program the experiment runs on that slice, with the
config's mesh, batch, sequence length, remat policy and gradient accumulation, and
prints per step: HBM per chip (arguments, outputs, temps, aliased, peak) against the
chip's, whether it fits, the compile time, an estimated step time and MFU (a
roofline, labelled as an estimate), and the collectives with their bytes. Exits with
status 1 when a step does not fit or does not compile.

  --topology   v5litepod-N / v5e-N, v5p-N (TensorCores: v5p-128 is 64 chips), v6e-N,
               or a shape such as v5e:8x8, v5p:4x4x8
  --steps      sft, reward, reference, dpo_cached, dpo_live, prefill, decode
               (default: what the config's experiments run; rlhi/aot/programs.py)
  --search     try meshes (all chips on fsdp x tensor 1/2/4/8, and the config's),
               remat policies and accumulation; print the settings that fit, fastest
               estimate first (--search_meshes, --search_remat to narrow it)

docs/tpu.md has the table for Llama-3.1-8B and 70B, and what the estimate leaves out.
"""

import json
import os
import sys

# This tool compiles for TPU devices that need not exist; nothing runs, so the runtime
# platform is the CPU (on a TPU VM this leaves the TPU to the job that holds it).
os.environ["JAX_PLATFORMS"] = "cpu"

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from ml_collections import config_flags

from rlhi import cli
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None,
                                "TPU slice: v5litepod-64, v5e-256, v5p-128, v6e-64, "
                                "or a shape such as v5e:8x8.")
_STEPS = flags.DEFINE_list("steps", [], "Programs to compile (default: the config's).")
_SEARCH = flags.DEFINE_bool("search", False,
                            "Search meshes, remat policies and accumulation.")
_SEARCH_MESHES = flags.DEFINE_string(
    "search_meshes", "", "Meshes to try, ';'-separated, e.g. 'fsdp=64;fsdp=16,tensor=4' "
    "(default: the config's and fsdp x tensor 1/2/4/8).")
_SEARCH_REMAT = flags.DEFINE_list(
    "search_remat", ["full", "dots_with_no_batch_dims_saveable"],
    "Remat policies to try (training steps).")
_MAX_ACCUM = flags.DEFINE_integer("max_accum", 64, "Most accumulation steps to try.")
_JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "Write each step's compiled HLO here.")
flags.mark_flags_as_required(["config", "topology"])


def _parse_meshes(text: str) -> list[dict[str, int]]:
  meshes = []
  for spec in filter(None, (m.strip() for m in text.split(";"))):
    try:
      meshes.append({k.strip(): int(v) for k, v in
                     (kv.split("=") for kv in spec.split(","))})
    except ValueError as e:
      raise ValueError(f"--search_meshes: {spec!r}; expected axis=size pairs such as "
                       f"'fsdp=16,tensor=4'") from e
  return meshes


def _write_hlo(name: str, text: str) -> None:
  if not _HLO_DIR.value or not text:
    return
  from rlhi.aot import check  # pylint: disable=g-import-not-at-top
  os.makedirs(_HLO_DIR.value, exist_ok=True)
  with open(os.path.join(_HLO_DIR.value, check.hlo_file_name(name)), "w") as f:
    f.write(text)


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from rlhi import sharding
  from rlhi.aot import check
  from rlhi.aot import programs
  from rlhi.aot import topology
  cfg = _CONFIG.value
  try:
    s = topology.parse(_TOPOLOGY.value)
    steps = tuple(_STEPS.value) or programs.default_steps(cfg)
    unknown = [step for step in steps if step not in programs.STEPS]
    if unknown:
      raise ValueError(f"--steps: unknown {unknown}; known: {', '.join(programs.STEPS)}")
    devices = topology.devices(s)
  except (ValueError, RuntimeError) as e:  # says what to fix; no traceback
    sys.stderr.write(f"ERROR: {e}\n")
    sys.exit(2)
  print(f"Compiling {', '.join(steps)} ({programs.experiment_kind(cfg)} config, model "
        f"{cfg.model.init or cfg.model.name}) for {s.accelerator} ({s.topology}); the "
        f"TPU compiler runs on this host's CPU.", flush=True)

  if _SEARCH.value:
    config, _ = programs.model_configs(cfg)
    meshes = (_parse_meshes(_SEARCH_MESHES.value) or
              check.default_meshes(s.chips, dict(cfg.mesh), config.num_kv_heads))
    ok = True
    found = {}
    for step in steps:
      print(f"\n{step}:", flush=True)
      candidates = check.search(cfg, step, s, devices, meshes=meshes,
                                remats=_SEARCH_REMAT.value, max_accum=_MAX_ACCUM.value,
                                log=lambda line: print(line, flush=True))
      print("\n" + check.format_search(candidates, step), flush=True)
      found[step] = candidates
      for c in candidates:
        if c.result.fits:
          _write_hlo(f"{step} {c.label()}", c.result.hlo_text)
      ok &= any(c.result.fits for c in candidates)
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump({step: [dict(setting=c.label(), **check.results_json([c.result])[0])
                          for c in cands] for step, cands in found.items()}, f, indent=1)
    sys.exit(0 if ok else 1)

  mesh = sharding.make_mesh(dict(cfg.mesh), devices=devices)
  results = []
  for program in programs.build(cfg, mesh, steps):
    print(f"  {program.name}: {program.description} ...", flush=True)
    results.append(check.compile_program(program, s))
    _write_hlo(program.name, results[-1].hlo_text)
  print("\n" + check.format_results(results, s), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(check.results_json(results), f, indent=1)
  failed = [r.name for r in results if not r.fits]
  if failed:
    print(f"\nDoes not fit or does not compile on {s.accelerator}: {', '.join(failed)}. "
          f"Try --search, more chips, or config.accum_steps / model.remat_policy / "
          f"mesh.", flush=True)
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
