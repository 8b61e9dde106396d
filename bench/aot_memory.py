r"""Will it fit? AOT-compile a big train step on simulated devices, print per-device memory.

  python bench/aot_memory.py                         # llama3_8b RM, seq 4096, 64 devices
  python bench/aot_memory.py --model llama3_1b --devices 8 --meshes fsdp=8

Compiles (never runs) the reward-model train step with `jax.jit(...).lower(...)
.compile()` for abstract sharded inputs on `--devices` simulated CPU devices and prints
XLA's `memory_analysis()`: argument (params + optimizer state + batch), output, temp
(activations, gradients) and the per-device peak estimate (arguments + outputs + temps
- donated aliases). The CPU compiler's buffer assignment stands in for the TPU's; treat
the figure as an estimate within some tens of percent.

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
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from rlhi import sharding  # pylint: disable=g-import-not-at-top
  from rlhi.models import llama  # pylint: disable=g-import-not-at-top
  from rlhi.models import reward  # pylint: disable=g-import-not-at-top
  from rlhi.train import objectives  # pylint: disable=g-import-not-at-top
  from rlhi.train import step as step_lib  # pylint: disable=g-import-not-at-top

  config = llama.get_config(a.model, remat_policy=a.remat, flatten_dense=False)
  n_params = llama.param_count(config)
  pairs = max(1, int(a.pairs_per_device * a.devices))
  gib = 2.0 ** 30
  print(f"{a.model}: {n_params / 1e9:.2f}B params ({config.param_dtype} params, "
        f"{config.dtype} compute), reward-model train step, AdamW (float32 moments "
        f"of bf16 params), remat={a.remat}, {pairs} pairs x 2 x {a.length} tokens, "
        f"{a.devices} simulated devices, gradient accumulation {a.accum_steps}\n")
  print("| mesh | arguments GiB | outputs GiB | temps GiB | aliased GiB | "
        "peak per device GiB | fits 16 GiB (v5e) |")
  print("|---|---|---|---|---|---|---|")
  for spec in a.meshes.split(";"):
    axes = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    mesh = sharding.make_mesh(axes)
    opt = optax.adamw(1e-6, mu_dtype=jnp.float32)
    with sharding.use_mesh(mesh):
      abstract = jax.eval_shape(lambda: step_lib.init_state(  # pylint: disable=cell-var-from-loop
          reward.abstract_params(config), opt, 0))
      shardings = sharding.logical_shardings(abstract, mesh)
      state = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(
              getattr(x, "value", x).shape, getattr(x, "value", x).dtype, sharding=s),
          abstract, shardings, is_leaf=lambda x: hasattr(x, "names"))
      batch_spec = sharding.logical_to_spec(("batch", None), (pairs, a.length), mesh)
      bs = jax.sharding.NamedSharding(mesh, batch_spec)
      batch = {f"{side}_{k}": jax.ShapeDtypeStruct((pairs, a.length), jnp.int32,
                                                   sharding=bs)
               for side in ("chosen", "rejected")
               for k in ("tokens", "positions", "segment_ids")}
      batch["valid"] = jax.ShapeDtypeStruct(
          (pairs,), jnp.bool_, sharding=jax.sharding.NamedSharding(
              mesh, jax.sharding.PartitionSpec(*batch_spec[:1])))
      step = jax.jit(step_lib.make_train_step(objectives.reward_loss(config), opt,
                                              a.accum_steps),
                     out_shardings=(shardings, None), donate_argnums=0)
      m = step.lower(state, batch).compile().memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    print(f"| {spec} | {m.argument_size_in_bytes / gib:.2f} | "
          f"{m.output_size_in_bytes / gib:.2f} | {m.temp_size_in_bytes / gib:.2f} | "
          f"{m.alias_size_in_bytes / gib:.2f} | {peak / gib:.2f} | "
          f"{'yes' if peak < 16 * gib else 'no'} |", flush=True)


if __name__ == "__main__":
  main()
