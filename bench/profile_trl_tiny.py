r"""torch.profiler of TRL's DPO step, on the files bench/dpo_vs_trl.py prepared.

  python bench/dpo_vs_trl.py --model tiny --keep /tmp/dvt --rounds 1 --steps 1
  python bench/profile_trl_tiny.py --spec /tmp/dvt/spec_cached.json

Runs the TRL worker's trainer (same weights, ids, config) for warm-up + profiled
steps, profiles the last `--profiled` steps, and prints torch's op table (self CPU
time, top `--top`), then times the tiny model's GEMM shapes in torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import torch


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--spec", required=True)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--profiled", type=int, default=2)
  p.add_argument("--top", type=int, default=30)
  a = p.parse_args()
  os.environ.setdefault("TQDM_DISABLE", "1")
  torch.set_num_threads(os.cpu_count())
  import datasets
  import transformers
  import trl
  from bench import dpo_vs_trl
  dpo_vs_trl._trl_quiet()  # pylint: disable=protected-access
  spec = json.load(open(a.spec))
  n_steps = a.warmup + a.profiled
  data = json.load(open(spec["data"]))
  data = {k: v[:spec["pairs"] * n_steps] for k, v in data.items()}
  prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True)

  class Cb(transformers.TrainerCallback):

    def __init__(self):
      self.n, self.t = 0, 0.0

    def on_step_begin(self, args, state, control, **kw):
      if self.n == a.warmup:
        prof.__enter__()
      self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      self.n += 1
      print(f"  step {self.n}: {time.perf_counter() - self.t:.3f} s (begin->end)",
            flush=True)
      if self.n == n_steps:
        prof.__exit__(None, None, None)

  class IdsDPOTrainer(trl.DPOTrainer):

    def _prepare_dataset(self, dataset, *x, **kw):
      return dataset

  tok = transformers.AutoTokenizer.from_pretrained(spec["tok_dir"])
  model = transformers.LlamaForCausalLM.from_pretrained(spec["model_dir"],
                                                        dtype=torch.float32)
  print(f"attn_implementation: {model.config._attn_implementation}")  # pylint: disable=protected-access
  trainer = IdsDPOTrainer(
      model=model, processing_class=tok, callbacks=[Cb()],
      args=dpo_vs_trl._dpo_config(trl, "/tmp/prof_trl", spec["pairs"], spec["length"],  # pylint: disable=protected-access
                                  n_steps, spec["mode"] == "cached"),
      train_dataset=datasets.Dataset.from_dict(data))
  trainer.train()
  print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top,
                                  max_name_column_width=50))
  print(prof.key_averages(group_by_input_shape=True).table(
      sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=40,
      max_shapes_column_width=60))
  for k, n in ((256, 256), (256, 128), (256, 768), (768, 256), (256, 4096)):
    x, w = torch.ones(8192, k), torch.ones(k, n)
    x @ w  # pylint: disable=pointless-statement
    t = time.perf_counter()
    for _ in range(5):
      x @ w  # pylint: disable=pointless-statement
    dt = (time.perf_counter() - t) / 5
    print(f"  torch matmul [8192,{k}]x[{k},{n}]: {dt * 1e3:.1f} ms = "
          f"{2 * 8192 * k * n / dt / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
  main()
