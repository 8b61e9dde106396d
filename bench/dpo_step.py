r"""DPO train-step throughput (cached and live reference) against SFT on the same data.

  python bench/dpo_step.py --models tiny                  # 8 pairs x 512
  python bench/dpo_step.py --models small --pairs 4       # 4 pairs x 512
  python bench/dpo_step.py --models tiny --steps 3 --prompt_length 64

Each model gets one batch of `pairs` preference pairs, every sequence `length` real
tokens (a prompt of `prompt_length` shared by chosen and rejected, then the response),
and four timed programs, all jitted, AdamW, one device, no remat:

  * sft         objectives.sft_loss on the same 2 x pairs sequences (stack_pairs), loss
                on the response tokens: the yardstick for a policy forward + backward.
  * dpo cached  objectives.dpo_loss with the reference log-probs in the batch.
  * dpo live    objectives.dpo_loss(live_reference=True): plus a reference forward.
  * ref pass    the one-off reference pass of the cached mode (the jitted
                sequence_logps that reference.compute runs per batch), per pair.

FLOPs, counted as in bench/train_step.py (`train_step._flops`): a policy step is
6 x (non-embedding params) x tokens + attention 12 x layers x heads x head_dim x T^2
per sequence + LM head 6 x E x vocab x tokens; SFT and cached DPO count exactly this.
The live reference adds a forward, a third of each term (2 x N x tokens, 4 x ... x T^2,
2 x E x vocab x tokens); cached DPO counts no reference FLOPs (they were paid once, in
the ref pass row, itself a forward). Recomputation (the LM head chunks are
rematerialised in the backward) is not counted: FLOPs are the model's, not the
implementation's. "Of matmul" divides GFLOP/s by a float32 4096^3 matmul timed in the
same run (`train_step.matmul_flops_per_s`).

The programs run in turn, one call each per round (matmul, ref pass, sft, dpo cached,
dpo live), for `--steps` rounds; every program is compiled ahead of time (the matmul
helper warms itself up), so no timed call compiles. Each row reports the median of its
calls. On a shared machine the load from other jobs then falls on all rows alike, so
the ratios (cached / SFT, of matmul) hold even where the absolute times drift, and the
median drops stray slow calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

# Run as a script (python bench/dpo_step.py): the repository root must be importable
# for `bench.train_step`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
import optax

from bench import train_step
from rlhi import inputs
from rlhi import sharding
from rlhi.models import llama
from rlhi.train import objectives
from rlhi.train import reference
from rlhi.train import step as step_lib

BETA = 0.1
CHUNK = 256  # LM-head chunk, as the training configs use
MATMUL_N = 4096  # the yardstick matmul's size, as bench/train_step.py


def synthetic_examples(config: llama.LlamaConfig, pairs: int, length: int,
                       prompt_length: int, seed: int = 0
                       ) -> list[dict[str, np.ndarray]]:
  """`pairs` tokenized pairs (inputs.PAIR_KEYS), every sequence `length` tokens."""
  r = np.random.default_rng(seed)
  ids = lambda n: r.integers(4, config.vocab_size, size=n).astype(np.int32)
  return [{"prompt_ids": ids(prompt_length), "chosen_ids": ids(length - prompt_length),
           "rejected_ids": ids(length - prompt_length)} for _ in range(pairs)]


def pairs_batch(examples, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Host pairs batch of `examples` in one bucket of exactly `length`."""
  return inputs.pad_batch(examples, batch_size=len(examples), pad_id=pad_id,
                          bucket_lengths=(length,), score_positions=True)


class Stepper:
  """A train step with its own state; each call runs one step to completion.

  The step is compiled ahead of time here, so that no timed call includes compilation
  and no untimed warm-up step is needed (one `small` step is ~20 s on 2 cores).
  """

  def __init__(self, step, state, *args):
    self.step = step.lower(state, *args).compile()
    self.state, self.args = state, args

  def __call__(self):
    self.state, m = self.step(self.state, *self.args)
    jax.block_until_ready(m)


def round_robin(programs: dict[str, Callable[[], object]], rounds: int
                ) -> dict[str, list[float]]:
  """Seconds of each call of each program, the programs taken in turn, `rounds` times.

  Programs come compiled (Stepper, jit(...).lower(...).compile()). Taking them in turn
  rather than one after the other means that load from other jobs on a shared machine
  falls on all of them alike, so their ratios hold even when the absolute times drift.
  """
  times = {name: [] for name in programs}
  for _ in range(rounds):
    for name, fn in programs.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return times


class Setup:
  """A model's params, optimizer and shardings on a one-axis mesh, as train_step.py."""

  def __init__(self, config: llama.LlamaConfig, mesh, lr: float = 1e-5):
    self.config = config
    self.mesh = mesh
    self.opt = optax.adamw(lr)
    abstract = jax.eval_shape(lambda: step_lib.init_state(
        llama.abstract_params(config), self.opt, 0))
    self.state_shardings = sharding.logical_shardings(abstract, mesh)
    self.param_shardings = self.state_shardings.params

  def state(self, seed: int = 0):
    """A fresh TrainState (its buffers are donated to the step, so one per program)."""
    return jax.jit(lambda k: step_lib.init_state(llama.init_params(self.config, k),
                                                 self.opt, 0),
                   out_shardings=self.state_shardings)(jax.random.PRNGKey(seed))

  def params(self, seed: int = 0):
    """The values of state(seed).params in buffers of their own (the reference)."""
    return llama.init_params(self.config, jax.random.PRNGKey(seed),
                             self.param_shardings)

  def step(self, loss_fn):
    return jax.jit(step_lib.make_train_step(loss_fn, self.opt), donate_argnums=0)

  def ref_fn(self):
    """The reference pass of reference.compute: summed response log-probs, [2B]."""
    return jax.jit(lambda p, b: objectives.sequence_logps(p, self.config, b, CHUNK)[0])


def policy_flops(config: llama.LlamaConfig, seqs: int, length: int) -> float:
  """Forward + backward FLOPs of the policy on `seqs` sequences (with the LM head)."""
  # pylint: disable-next=protected-access
  return train_step._flops(config, llama.param_count(config), seqs, length, True)


def bench(name: str, pairs: int, length: int, prompt_length: int, steps: int
          ) -> tuple[float, list[tuple[str, float, float, list[float]]]]:
  """(matmul FLOP/s, rows of (mode, median step s, FLOPs, step times))."""
  config = llama.get_config(name)
  mesh = sharding.make_mesh({"fsdp": -1})
  train_flops = policy_flops(config, 2 * pairs, length)
  fwd_flops = train_flops / 3  # every term of the count is 3x its forward
  with sharding.use_mesh(mesh):
    s = Setup(config, mesh)
    host = pairs_batch(synthetic_examples(config, pairs, length, prompt_length), length)
    ref_params = s.params()
    ref_fn = s.ref_fn()
    # The cached mode's batch carries the reference log-probs of the one-off pass.
    ref = np.asarray(jax.device_get(ref_fn(ref_params, sharding.global_batch(host))))
    host[reference.CHOSEN], host[reference.REJECTED] = ref[:pairs], ref[pairs:]
    batch = sharding.global_batch(host)
    sft_batch = sharding.global_batch(inputs.stack_pairs(host))
    dpo = lambda live: s.step(objectives.dpo_loss(
        config, loss_type="sigmoid", beta=BETA, chunk=CHUNK, live_reference=live))
    ref_pass = ref_fn.lower(ref_params, batch).compile()
    matmul_rates = []

    def matmul():
      # train_step's yardstick, one matmul per round so that it sees the same load.
      matmul_rates.append(train_step.matmul_flops_per_s(MATMUL_N, reps=1))

    times = round_robin({
        "matmul": matmul,
        "ref pass (once)": lambda: jax.block_until_ready(ref_pass(ref_params, batch)),
        "sft": Stepper(s.step(objectives.sft_loss(config, CHUNK)), s.state(),
                       sft_batch),
        "dpo cached": Stepper(dpo(False), s.state(), batch),
        "dpo live": Stepper(dpo(True), s.state(), batch, ref_params),
    }, steps)
  flops = {"ref pass (once)": fwd_flops, "sft": train_flops, "dpo cached": train_flops,
           "dpo live": train_flops + fwd_flops}
  rows = [(mode, statistics.median(times[mode]), f, times[mode])
          for mode, f in flops.items()]
  return statistics.median(matmul_rates), rows


HEADER = ("| model | params | mode | batch (pairs x len) | step s | pairs/s | "
          "tokens/s | GFLOP/step | GFLOP/s | of matmul |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def format_row(name, n_params, mode, pairs, length, dt, flops, tokens, peak) -> str:
  return (f"| {name} | {n_params / 1e6:.1f}M | {mode} | {pairs} x {length} | "
          f"{dt:.3f} | {pairs / dt:.2f} | {tokens / dt:,.0f} | {flops / 1e9:.1f} | "
          f"{flops / dt / 1e9:.0f} | {flops / dt / peak:.0%} |")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="tiny")
  p.add_argument("--pairs", type=int, default=8)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--prompt_length", type=int, default=256)
  p.add_argument("--steps", type=int, default=5, help="timed rounds")
  a = p.parse_args()
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
        f"prompt {a.prompt_length} + response {a.length - a.prompt_length} tokens\n")
  results = []
  for name in a.models.split(","):
    peak, rows = bench(name, a.pairs, a.length, a.prompt_length, a.steps)
    results.append((name, peak, rows))
    print(f"  {name} float32 matmul {MATMUL_N}^3: {peak / 1e9:.0f} GFLOP/s (median)")
    for mode, _, _, times in rows:
      print(f"  {name} {mode}: " + ", ".join(f"{t:.3f}" for t in times) + " s",
            flush=True)
  print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
  print(HEADER)
  tokens = 2 * a.pairs * a.length
  for name, peak, rows in results:
    n = llama.param_count(llama.get_config(name))
    for mode, dt, flops, _ in rows:
      print(format_row(name, n, mode, a.pairs, a.length, dt, flops, tokens, peak))
  print()
  for name, peak, rows in results:
    by = {r[0]: r[1] for r in rows}
    print(f"- {name}: float32 matmul {peak / 1e9:.0f} GFLOP/s; cached DPO / SFT step "
          f"time = {by['dpo cached'] / by['sft']:.3f}; live / cached = "
          f"{by['dpo live'] / by['dpo cached']:.3f}; reference pass "
          f"{by['ref pass (once)'] / a.pairs * 1e3:.0f} ms per pair (once)")


if __name__ == "__main__":
  main()
