r"""Decode throughput of rlhi.sampling vs HF transformers `generate` (torch).

Same weights (ours exported with hf_io and loaded by transformers), same
prompts, same run, interleaved trials (the best of each is reported, which is
robust to other processes on a shared machine). Both sample at temperature 1
without top-k/top-p and without early stopping, so every row produces exactly
`--new_tokens` tokens.

Also reports the forward pass's achieved FLOP/s (prefill of batch x length
tokens, `llama.flops_per_token`) as a fraction of a float32 matmul measured in
the same run.

  .venv/bin/python bench/decode.py                        # tiny + small
  .venv/bin/python bench/decode.py --configs=tiny --trials=2
  .venv/bin/python bench/decode.py --output=docs/bench_model.md
"""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from rlhi import sampling
from rlhi.models import hf_io
from rlhi.models import llama

_CONFIGS = flags.DEFINE_list("configs", ["tiny", "small"], "Model configs.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 256, "Tokens per row.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Padded prompt length.")
_TRIALS = flags.DEFINE_integer("trials", 3, "Interleaved trials per case.")
_FWD_BATCH = flags.DEFINE_integer("fwd_batch", 8, "Forward FLOP/s batch.")
_FWD_LEN = flags.DEFINE_integer("fwd_len", 256, "Forward FLOP/s length.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write markdown here.")


def _prompts(batch: int, vocab: int, max_len: int, seed: int):
  """Left-padded prompts of different lengths in [max_len // 2, max_len]."""
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(3, vocab, size=rng.integers(max_len // 2, max_len + 1))
          for _ in range(batch)]
  return sampling.left_pad([s.tolist() for s in seqs], pad_id=0,
                           length=max_len)


def _best_time(fn, trials: int) -> float:
  best = float("inf")
  for _ in range(trials):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _matmul_flops(n: int = 2048) -> float:
  """Achieved float32 FLOP/s of one n x n x n matmul in XLA (best of 10)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  mm(a, b).block_until_ready()
  t = _best_time(lambda: mm(a, b).block_until_ready(), 10)
  return 2 * n**3 / t


def _forward_flops(config: llama.LlamaConfig, params) -> tuple[float, float]:
  """(achieved FLOP/s, FLOPs per call) of the jitted forward + LM head."""
  b, t = _FWD_BATCH.value, _FWD_LEN.value
  tokens = jax.random.randint(jax.random.key(2), (b, t), 0, config.vocab_size)
  fwd = jax.jit(llama.forward_logits, static_argnums=1)
  fwd(params, config, tokens).block_until_ready()
  seconds = _best_time(
      lambda: fwd(params, config, tokens).block_until_ready(), 5)
  flops = llama.flops_per_token(config, t) * b * t
  return flops / seconds, flops


def _bench_config(name: str, rows: list[str]) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  config = llama.get_config(name, eos_token_ids=(), bos_token_id=None)
  params = llama.init_params(config, jax.random.key(0))
  with tempfile.TemporaryDirectory() as tmp:
    hf_io.save_checkpoint(params, config, tmp)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, dtype=torch.float32).eval()
  new = _NEW_TOKENS.value
  for batch in map(int, _BATCHES.value):
    tokens, lengths = _prompts(batch, config.vocab_size, _PROMPT_LEN.value,
                               seed=batch)
    stop = jnp.full((1,), -1, jnp.int32)

    seeds = itertools.count()

    def ours():
      out = sampling.generate(
          params, config, tokens, lengths, jax.random.key(next(seeds)),
          max_new_tokens=new, temperature=1.0, stop_token_ids=stop)
      out = jax.device_get(out)
      assert (out.lengths == new).all(), out.lengths

    ids = torch.from_numpy(tokens.astype(np.int64))
    n_pad = tokens.shape[1] - lengths
    mask = torch.from_numpy(
        (np.arange(tokens.shape[1])[None] >= n_pad[:, None]).astype(np.int64))

    def theirs(max_new=new):
      with torch.no_grad():
        out = hf_model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new,
            min_new_tokens=max_new, pad_token_id=0)
      assert out.shape[1] == tokens.shape[1] + max_new

    ours()                # Compile.
    theirs(max_new=4)     # Warm up.
    # Torch's OpenMP threads degrade badly when another process holds a
    # core; give HF its better thread count, probed on a short generation.
    probe = {}
    for threads in (os.cpu_count(), 1):
      torch.set_num_threads(threads)
      probe[threads] = _best_time(lambda: theirs(max_new=32), 2)
    hf_threads = min(probe, key=probe.get)
    torch.set_num_threads(hf_threads)
    t_ours, t_hf = float("inf"), float("inf")
    for _ in range(_TRIALS.value):
      t_ours = min(t_ours, _best_time(ours, 1))
      t_hf = min(t_hf, _best_time(theirs, 1))
    ours_tps, hf_tps = batch * new / t_ours, batch * new / t_hf
    rows.append(f"| {name} | {batch} | {new} | {ours_tps:,.0f} | "
                f"{hf_tps:,.0f} ({hf_threads} thr) | "
                f"{ours_tps / hf_tps:.1f}x |")
    print(rows[-1], flush=True)


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  load_before = os.getloadavg()[0]
  peak = _matmul_flops()
  decode_rows, forward = [], []
  for name in _CONFIGS.value:
    config = llama.get_config(name)
    params = llama.init_params(config, jax.random.key(0))
    achieved, flops = _forward_flops(config, params)
    forward.append((name, llama.param_count(config), flops, achieved))
    print(name, f"forward {achieved / 1e9:.0f} GFLOP/s", flush=True)
    del params
    _bench_config(name, decode_rows)

  peak = max(peak, _matmul_flops())
  flop_rows = [
      f"| {name} | {count / 1e6:.1f}M | {_FWD_BATCH.value}x{_FWD_LEN.value} | "
      f"{flops / 1e9:.1f} | {achieved / 1e9:.0f} | {achieved / peak:.0%} |"
      for name, count, flops, achieved in forward]
  lines = [
      f"Run {datetime.date.today().isoformat()} on {platform.machine()}, "
      f"{os.cpu_count()} CPU cores, jax {jax.__version__}, torch "
      f"{torch.__version__}, float32; float32 matmul 2048^3: "
      f"{peak / 1e9:.0f} GFLOP/s (best of two measurements, at the start "
      f"and the end); 1-min load average {load_before:.1f} at "
      f"start, {os.getloadavg()[0]:.1f} at end (other processes share the "
      "cores).",
      "",
      "Decode (prompts left-padded to "
      f"{_PROMPT_LEN.value}, lengths {_PROMPT_LEN.value // 2}.."
      f"{_PROMPT_LEN.value}; sampling at temperature 1; best of "
      f"{_TRIALS.value} interleaved trials):",
      "",
      "| model | batch | new tokens | rlhi tokens/s | HF generate tokens/s "
      "| speed-up |",
      "|---|---|---|---|---|---|",
      *decode_rows,
      "",
      "Forward pass (hidden states + LM head, FLOPs from "
      "`llama.flops_per_token`: 2 x matmul params + 4 x layers x heads x "
      "head_dim x length per token):",
      "",
      "| model | params | batch x length | GFLOP | achieved GFLOP/s "
      "| of matmul peak |",
      "|---|---|---|---|---|---|",
      *flop_rows,
  ]
  text = "\n".join(lines)
  print("\n" + text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
