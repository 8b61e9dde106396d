r"""Train-step throughput of SFT and the reward model, as a fraction of a matmul.

  python bench/train_step.py                 # tiny and small, prints a markdown table
  python bench/train_step.py --models tiny --steps 3

FLOPs per step are counted as 6 x (non-embedding params) x tokens for the matmuls of
forward and backward, plus the attention scores and values (12 x layers x heads x
head_dim x T^2 per sequence, forward + backward), plus, for SFT, the LM head
(6 x E x vocab x tokens). The reward model has no LM head; its score head is negligible.
Achieved FLOP/s is divided by the FLOP/s of a float32 [4096 x 4096] @ [4096 x 4096]
matmul timed in the same run, so the fraction does not depend on the machine's clock.
Tokens are all real (no padding), one bucket, batch and sequence as printed.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhi import sharding
from rlhi.models import llama
from rlhi.models import reward
from rlhi.train import objectives
from rlhi.train import step as step_lib


def matmul_flops_per_s(n: int = 4096, reps: int = 5) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    f(a).block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


def _timed(step, state, batch, steps):
  state, m = step(state, batch)  # compile + warm up
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return (time.perf_counter() - t) / steps


def _flops(config, total, seqs, length, lm_head):
  e, v = config.hidden_size, config.vocab_size
  embed = v * e * (1 if config.tie_embeddings else 2)
  dense = total - embed
  tokens = seqs * length
  attn = 12 * config.num_layers * config.num_heads * config.head_dim * length ** 2 * seqs
  head = 6 * e * v * tokens if lm_head else 0
  return 6 * dense * tokens + attn + head


def bench(name, batch_pairs, length, steps):
  config = llama.get_config(name)
  total = llama.param_count(config)
  mesh = sharding.make_mesh({"fsdp": -1})
  opt = optax.adamw(1e-5)
  r = np.random.default_rng(0)
  rows = []
  with sharding.use_mesh(mesh):
    # ---- SFT: 2 * batch_pairs sequences, the same tokens as the RM step.
    seqs = 2 * batch_pairs
    toks = r.integers(4, config.vocab_size, size=(seqs, length)).astype(np.int32)
    sft_batch = sharding.global_batch({
        "tokens": toks, "targets": np.roll(toks, -1, 1),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), toks.shape),
        "segment_ids": np.ones_like(toks), "loss_mask": np.ones(toks.shape, np.float32),
        "valid": np.ones(seqs, bool)})
    abstract = jax.eval_shape(lambda: step_lib.init_state(
        llama.abstract_params(config), opt, 0))
    shard = sharding.logical_shardings(abstract, mesh)
    state = jax.jit(lambda k: step_lib.init_state(llama.init_params(config, k), opt, 0),
                    out_shardings=shard)(jax.random.PRNGKey(0))
    step = jax.jit(step_lib.make_train_step(objectives.sft_loss(config, 256), opt),
                   donate_argnums=0)
    dt = _timed(step, state, sft_batch, steps)
    rows.append(("sft", dt, _flops(config, total, seqs, length, True), seqs * length))
    del state

    # ---- Reward model: batch_pairs pairs, chosen and rejected in one forward.
    half = {k: v for k, v in {
        "tokens": toks, "positions": np.broadcast_to(np.arange(length, dtype=np.int32),
                                                     toks.shape),
        "segment_ids": np.ones_like(toks)}.items()}
    rm_batch = {f"chosen_{k}": v[:batch_pairs] for k, v in half.items()}
    rm_batch |= {f"rejected_{k}": v[batch_pairs:] for k, v in half.items()}
    rm_batch["valid"] = np.ones(batch_pairs, bool)
    rm_batch = sharding.global_batch(rm_batch)
    abstract = jax.eval_shape(lambda: step_lib.init_state(
        reward.abstract_params(config), opt, 0))
    shard = sharding.logical_shardings(abstract, mesh)
    state = jax.jit(lambda k: step_lib.init_state(reward.init_params(config, k), opt, 0),
                    out_shardings=shard)(jax.random.PRNGKey(0))
    step = jax.jit(step_lib.make_train_step(objectives.reward_loss(config, 0.0, 0.0),
                                            opt), donate_argnums=0)
    dt = _timed(step, state, rm_batch, steps)
    rows.append(("reward", dt, _flops(config, total, seqs, length, False), seqs * length))
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="tiny,small")
  p.add_argument("--pairs", type=int, default=8)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--steps", type=int, default=5)
  a = p.parse_args()
  peak = matmul_flops_per_s()
  print(f"float32 matmul 4096^3 on {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s): {peak / 1e9:.0f} GFLOP/s\n")
  print("| model | params | objective | batch (seqs x len) | step s | tokens/s | "
        "GFLOP/step | GFLOP/s | of matmul |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in a.models.split(","):
    n = llama.param_count(llama.get_config(name))
    for obj, dt, flops, tokens in bench(name, a.pairs, a.length, a.steps):
      print(f"| {name} | {n / 1e6:.1f}M | {obj} | {2 * a.pairs} x {a.length} | "
            f"{dt:.3f} | {tokens / dt:,.0f} | {flops / 1e9:.1f} | "
            f"{flops / dt / 1e9:.0f} | {flops / dt / peak:.0%} |", flush=True)


if __name__ == "__main__":
  main()
