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


def main(argv):
  del argv
  from rlhi.aot import check  # pylint: disable=g-import-not-at-top  (after JAX_PLATFORMS)
  try:
    ok = check.run(_CONFIG.value, _TOPOLOGY.value, _STEPS.value,
                   search_settings=_SEARCH.value, search_meshes=_SEARCH_MESHES.value,
                   search_remat=_SEARCH_REMAT.value, max_accum=_MAX_ACCUM.value,
                   json_path=_JSON.value, hlo_dir=_HLO_DIR.value,
                   log=lambda line: print(line, flush=True))
  except check.SettingsError as e:  # says what to fix; no traceback
    sys.stderr.write(f"ERROR: {e}\n")
    sys.exit(2)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  cli.run(main)
