r"""Will it fit? The XLA:CPU estimate: a big train step compiled for simulated CPU devices.

  python bench/aot_memory.py                         # llama3_8b RM, seq 4096, 64 devices
  python bench/aot_memory.py --model llama3_1b --devices 8 --meshes fsdp=8

Compiles (never runs) the reward-model train step of configs/reward_model.py (the
program rlhi/aot/programs.py builds, as experiments/compile.py does for TPU) for
abstract sharded inputs on `--devices` simulated CPU devices, and prints XLA's
`memory_analysis()`: argument (params + optimizer state + batch), output, temp
(activations, gradients) and the per-device total (arguments + outputs + temps - donated
aliases). The CPU compiler's buffer assignment stands in for the TPU's and is further
off than one would like (docs/training.md compares the two): with libtpu installed,
`python -m experiments.compile --topology v5litepod-64 ...` gives the TPU compiler's
own figures, on this same machine.

Must run in its own process: it sets XLA_FLAGS before importing jax.
"""

import argparse
import os
import sys


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="llama3_8b")
  p.add_argument("--devices", type=int, default=64)
  p.add_argument("--meshes", default="fsdp=64;fsdp=16,tensor=4")
  p.add_argument("--length", type=int, default=4096)
  p.add_argument("--pairs_per_device", type=float, default=0.5,
                 help="pairs (2 sequences each) per device in the global batch")
  p.add_argument("--remat", default="full")
  p.add_argument("--accum_steps", type=int, default=1,
                 help="gradient accumulation: activations of 1/k of the batch at a time")
  a = p.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  # pylint: disable=g-import-not-at-top
  from configs import reward_model
  from rlhi import sharding
  from rlhi.aot import check
  from rlhi.aot import programs
  from rlhi.aot import topology
  from rlhi.models import llama

  cfg = reward_model.get_config(a.model)
  pairs = max(1, int(a.pairs_per_device * a.devices))
  cfg.batch_size = pairs
  cfg.data.max_length = a.length
  cfg.data.bucket_lengths = (a.length,)
  cfg.model.remat_policy = a.remat
  cfg.accum_steps = a.accum_steps
  config, _ = programs.model_configs(cfg)
  gib = 2.0 ** 30
  print(f"{a.model}: {llama.param_count(config) / 1e9:.2f}B params ({config.param_dtype} "
        f"params, {config.dtype} compute), reward-model train step of "
        f"configs/reward_model.py (its optimizer: AdamW, moments in the params' dtype), "
        f"remat={a.remat}, {pairs} pairs x 2 x {a.length} tokens, {a.devices} simulated "
        f"devices, gradient accumulation {a.accum_steps}\n")
  print("| mesh | arguments GiB | outputs GiB | temps GiB | aliased GiB | "
        "total per device GiB | fits 15.75 GiB (v5e) |")
  print("|---|---|---|---|---|---|---|")
  v5e = topology.parse("v5e:8x8")  # only the capacity is used
  for spec in a.meshes.split(";"):
    with cfg.unlocked():
      cfg.mesh = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    mesh = sharding.make_mesh(dict(cfg.mesh))
    (program,) = programs.build(cfg, mesh, ("reward",))
    m = check.compile_program(program, v5e).memory
    print(f"| {spec} | {m.arguments / gib:.2f} | {m.outputs / gib:.2f} | "
          f"{m.temps / gib:.2f} | {m.aliased / gib:.2f} | {m.total / gib:.2f} | "
          f"{'yes' if m.total < v5e.chip.hbm_bytes else 'no'} |", flush=True)


if __name__ == "__main__":
  main()
