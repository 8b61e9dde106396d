r"""rlhi's DPO step side by side with TRL's DPOTrainer: same weights, tokens and shapes.

  python bench/dpo_vs_trl.py --model tiny                  # 8 pairs x (256 + 256)
  python bench/dpo_vs_trl.py --model small --pairs 4 --steps 3 --modes live
  python bench/dpo_vs_trl.py --model small --pairs 4 --steps 3 --modes cached

One process, float32, CPU:

  1. Random `--model` params (rlhi init), written with hf_io.save_checkpoint; TRL's
     policy and reference are LlamaForCausalLM.from_pretrained of that directory and
     rlhi keeps the same params, so both hold identical weights (checked: the
     reference log-probs of the first batch agree to float32 rounding, printed as
     "max |logp diff|").
  2. A synthetic plain-text data set of prompt/chosen/rejected strings made of words
     that are single tokens of the bundled tokenizer (saved with save_pretrained,
     loaded with AutoTokenizer), so that TRL's tokenization gives exactly
     `--prompt_length` prompt tokens and `length - prompt_length` response tokens
     (TRL appends EOS to each response; it is counted). All tokens are real: the
     collator pads nothing. rlhi's batch is TRL's first `pairs` tokenized rows, so
     both train on the same token ids.
  3. TRL: DPOTrainer with DPOConfig(loss_type sigmoid, beta 0.1,
     per_device_train_batch_size=pairs, max_length=length, use_cpu, bf16=False,
     activation_checkpointing=False (TRL defaults both to True; rlhi runs float32
     without remat), constant learning rate, no eval, no saving, report_to none) and
     precompute_ref_log_probs False ("live": a reference model forward every step) or
     True ("cached": computed once in the constructor, timed apart).
     torch.set_num_threads(os.cpu_count()).
  4. rlhi: the DPO train step of bench/dpo_step.py (sigmoid, beta 0.1, AdamW, no
     remat, compiled ahead of time) with the same reference mode, one step run after
     each TRL step from a TrainerCallback: the two alternate step by step, so that load
     from other jobs on a shared machine falls on both alike.

TRL's step is the time from the end of the previous rlhi step (or the start of
training) to `on_step_end` (batch collation, forward, reference forward, backward,
optimizer, as in a real run); rlhi's is its step alone. Each reports the median over
`--steps` steps after `--warmup`. tokens/s counts real tokens (attention mask ones):
2 x pairs x length per step for both. GFLOP/s uses the same model FLOP count for both
(bench/dpo_step.py: policy forward + backward, plus a forward for a live reference),
although TRL's fused LM head projects only the response positions and rlhi's all of
them (see docs/bench_dpo.md); "of own matmul" divides it by a float32 4096^3 matmul in
the framework's own library (torch for TRL, XLA for rlhi), the mean of one timing
before and one after the steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# Run as a script: the repository root must be importable for `bench.dpo_step`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from bench import dpo_step
from bench import train_step
from rlhi import sharding
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.models import tokenizer as tokenizer_lib
from rlhi.train import objectives
from rlhi.train import reference


def single_token_words(tok) -> list[str]:
  """' word' strings that the tokenizer encodes as exactly one token each.

  The byte-level pre-tokenizer splits text before every ' word', so a string of such
  words encodes to one token per word: lengths are then exact by construction.
  """
  words = []
  for i in range(len(tok)):
    s = tok.decode([i])
    if (len(s) > 1 and s[0] == " " and s[1:].isascii() and s[1:].isalpha()
        and tok(s, add_special_tokens=False)["input_ids"] == [i]):
      words.append(s)
  return words


def text_pairs(words: list[str], n: int, prompt_length: int, response_length: int,
               seed: int = 0) -> dict[str, list[str]]:
  """Columns prompt/chosen/rejected; responses are one word short (TRL adds EOS)."""
  r = np.random.default_rng(seed)
  text = lambda k: "".join(words[i] for i in r.integers(0, len(words), size=k))
  cols = {"prompt": [], "chosen": [], "rejected": []}
  for _ in range(n):
    cols["prompt"].append(text(prompt_length))
    cols["chosen"].append(text(response_length - 1))
    cols["rejected"].append(text(response_length - 1))
  return cols


class RlhiSide:
  """rlhi's DPO step on the pairs TRL tokenized, one step per call, in TRL's gaps."""

  def __init__(self, config: llama.LlamaConfig, mesh, length: int):
    self.config, self.length = config, length
    self.setup = dpo_step.Setup(config, mesh)
    self.ref_params = self.setup.params()  # the weights TRL loads, in rlhi's layout
    self.ref_fn = self.setup.ref_fn()
    self.ref = None  # reference log-probs [2B] of the last batch

  def batch(self, examples):
    """Global pairs batch of `examples` with their reference log-probs."""
    pairs = len(examples)
    host = dpo_step.pairs_batch(examples, self.length)
    ref = np.asarray(jax.device_get(
        self.ref_fn(self.ref_params, sharding.global_batch(host))), np.float32)
    host[reference.CHOSEN], host[reference.REJECTED] = ref[:pairs], ref[pairs:]
    self.ref = ref
    return sharding.global_batch(host)

  def stepper(self, mode: str, batch) -> dpo_step.Stepper:
    """A compiled DPO train step with a fresh state: live or cached reference."""
    live = mode == "live"
    loss = objectives.dpo_loss(self.config, loss_type="sigmoid", beta=dpo_step.BETA,
                               chunk=dpo_step.CHUNK, live_reference=live)
    args = (batch, self.ref_params) if live else (batch,)
    return dpo_step.Stepper(self.setup.step(loss), self.setup.state(), *args)

  def ref_pass_times(self, batch, calls: int) -> list[float]:
    """Seconds of the one-off reference pass over `batch` (compiled first)."""
    compiled = self.ref_fn.lower(self.ref_params, batch).compile()
    fn = lambda: jax.block_until_ready(compiled(self.ref_params, batch))
    return dpo_step.round_robin({"ref": fn}, calls)["ref"]


def trl_trainer(model_dir: str, tok_dir: str, cols, pairs: int, length: int,
                steps: int, precompute: bool, work_dir: str, callback):
  """A DPOTrainer as configured in the module docstring, and its one-off seconds."""
  import datasets  # pylint: disable=g-import-not-at-top  (heavy; only this side)
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top

  class TimedDPOTrainer(trl.DPOTrainer):
    """DPOTrainer that times its one-off reference pass (precompute_ref_log_probs)."""

    precompute_s = 0.0

    def _precompute_ref_logps(self, *a, **kw):
      t = time.perf_counter()
      out = super()._precompute_ref_logps(*a, **kw)
      self.precompute_s += time.perf_counter() - t
      return out

  # Progress bars and info logs would bury the results; timing is unaffected.
  datasets.disable_progress_bars()
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  torch.manual_seed(0)
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  config = trl.DPOConfig(
      output_dir=work_dir, loss_type=["sigmoid"], beta=dpo_step.BETA,
      per_device_train_batch_size=pairs, max_length=length, max_steps=steps,
      learning_rate=1e-5, lr_scheduler_type="constant",
      precompute_ref_log_probs=precompute, use_cpu=True, bf16=False,
      # transformers 5 renamed gradient_checkpointing (TRL defaults it to True);
      # setting the new name makes it win over the old default.
      activation_checkpointing=False, eval_strategy="no", save_strategy="no",
      report_to="none", logging_steps=10_000, disable_tqdm=True,
      dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
  trainer = TimedDPOTrainer(model=model, args=config, processing_class=tok,
                            train_dataset=datasets.Dataset.from_dict(cols),
                            callbacks=[callback])
  if trainer.model.is_activation_checkpointing:
    raise RuntimeError("TRL's policy has activation checkpointing on; rlhi has none")
  rows = trainer.train_dataset
  lengths = {(len(p), len(c), len(r)) for p, c, r in
             zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])}
  if len(lengths) != 1 or sum(next(iter(lengths))[:2]) != length:
    raise ValueError(f"TRL tokenized (prompt, chosen, rejected) lengths {lengths}, "
                     f"want one shape summing to {length}")
  return trainer


def step_callback():
  """A TrainerCallback that times TRL's steps and runs `.other()` between them."""
  import transformers  # pylint: disable=g-import-not-at-top

  class Alternate(transformers.TrainerCallback):

    def __init__(self):
      self.other, self.trl, self.rlhi, self.start = None, [], [], 0.0

    def on_train_begin(self, args, state, control, **kwargs):
      self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      t = time.perf_counter()
      self.trl.append(t - self.start)
      if self.other is not None:
        self.other()
        self.rlhi.append(time.perf_counter() - t)
      self.start = time.perf_counter()

  return Alternate()


def interleaved(trainer, callback, other) -> tuple[list[float], list[float]]:
  """Runs `trainer` with `other()` (one rlhi step) after each of its steps.

  TRL's step is the time from the end of the previous `other()` (or the start of
  training) to `on_step_end`: batch collation, forward, reference forward, backward and
  optimizer, as in a real run. Alternating step by step puts both frameworks under the
  same load from other jobs, so the ratio of their medians holds on a shared machine.
  Returns (TRL step times, rlhi step times).
  """
  callback.other = other
  trainer.train()
  return callback.trl, callback.rlhi


def hf_reference_logps(model_dir: str, examples) -> np.ndarray:
  """Summed response log-probs of `examples` under the HF model: [2B], chosen first."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  out = []
  for side in ("chosen_ids", "rejected_ids"):
    for e in examples:
      ids = torch.tensor(np.concatenate([e["prompt_ids"], e[side]]))[None].long()
      with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
      picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
      out.append(float(picked[len(e["prompt_ids"]) - 1:].sum()))
  return np.asarray(out, np.float32)


def torch_matmul_flops_per_s(n: int = dpo_step.MATMUL_N, reps: int = 3) -> float:
  """train_step.matmul_flops_per_s in torch: TRL's yardstick, as XLA's is rlhi's."""
  import torch  # pylint: disable=g-import-not-at-top
  a = torch.ones(n, n)
  a @ a  # pylint: disable=pointless-statement  (warm up)
  t = time.perf_counter()
  for _ in range(reps):
    a @ a  # pylint: disable=pointless-statement
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


def matmuls() -> dict[str, float]:
  """float32 4096^3 matmul FLOP/s of each framework, measured now."""
  return {"TRL": torch_matmul_flops_per_s(),
          "rlhi": train_step.matmul_flops_per_s(dpo_step.MATMUL_N, reps=3)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="tiny")
  p.add_argument("--pairs", type=int, default=8)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--prompt_length", type=int, default=256)
  p.add_argument("--warmup", type=int, default=1, help="steps of each not timed")
  p.add_argument("--steps", type=int, default=5, help="timed steps of each")
  p.add_argument("--modes", default="live,cached",
                 help="reference modes, both frameworks: live, cached or both (one "
                 "per invocation keeps `small` under 10 minutes)")
  a = p.parse_args()
  # TRL's own tqdm bars (reference precompute) read this.
  os.environ.setdefault("TQDM_DISABLE", "1")
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())

  config = llama.get_config(a.model)
  n_params = llama.param_count(config)
  tokens = 2 * a.pairs * a.length
  train_flops = dpo_step.policy_flops(config, 2 * a.pairs, a.length)
  flops = {"cached": train_flops, "live": train_flops * 4 / 3}
  modes = a.modes.split(",")
  print(f"{a.model} ({n_params / 1e6:.1f}M), {a.pairs} pairs x ({a.prompt_length} + "
        f"{a.length - a.prompt_length}) tokens, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start",
        flush=True)

  times = {}  # (framework, mode) -> timed step seconds
  per_pair = {}  # framework -> seconds per pair of the one-off reference pass
  with tempfile.TemporaryDirectory() as tmp:
    model_dir, tok_dir = os.path.join(tmp, "model"), os.path.join(tmp, "tokenizer")
    hf_io.save_checkpoint(llama.init_params(config, jax.random.PRNGKey(0)), config,
                          model_dir)
    tok = tokenizer_lib.load_tokenizer("bundled")
    tok.save_pretrained(tok_dir)
    n = a.pairs * (a.warmup + a.steps)
    cols = text_pairs(single_token_words(tok), n, a.prompt_length,
                      a.length - a.prompt_length)
    # Each framework's own matmul, before and after, as the yardstick of its FLOP/s.
    peaks = [matmuls()]
    mesh = sharding.make_mesh({"fsdp": -1})
    with sharding.use_mesh(mesh):
      rlhi = RlhiSide(config, mesh, a.length)
      for mode in modes:
        callback = step_callback()
        trainer = trl_trainer(model_dir, tok_dir, cols, a.pairs, a.length,
                              a.warmup + a.steps, mode == "cached",
                              os.path.join(tmp, mode), callback)
        if mode == "cached":
          per_pair["TRL"] = trainer.precompute_s / n
        rows = trainer.train_dataset
        examples = [{k: np.asarray(rows[i][k], np.int32) for k in
                     ("prompt_ids", "chosen_ids", "rejected_ids")}
                    for i in range(a.pairs)]
        batch = rlhi.batch(examples)
        trl_t, rlhi_t = interleaved(trainer, callback, rlhi.stepper(mode, batch))
        del trainer
        for fw, t in (("TRL", trl_t), ("rlhi", rlhi_t)):
          times[(fw, mode)] = t[a.warmup:]
          print(f"  {fw} {mode}: " + ", ".join(f"{x:.3f}" for x in t) + " s (first "
                f"{a.warmup} not timed)", flush=True)
      per_pair["rlhi"] = statistics.median(rlhi.ref_pass_times(batch, 3)) / a.pairs
    peaks.append(matmuls())
    diff = np.abs(hf_reference_logps(model_dir, examples) - rlhi.ref).max()
    print(f"  max |logp diff| rlhi vs transformers, reference log-probs of the first "
          f"batch: {diff:.2e} (sums over {a.length - a.prompt_length} tokens, "
          f"|logp| ~ {np.abs(rlhi.ref).mean():.0f})")

  peak = {fw: statistics.mean(p[fw] for p in peaks) for fw in peaks[0]}
  print("  float32 matmul 4096^3 GFLOP/s, before / after: " + "; ".join(
      f"{'torch' if fw == 'TRL' else 'XLA'} " + " / ".join(
          f"{p[fw] / 1e9:.0f}" for p in peaks) for fw in peak))
  print("  one-off reference pass per pair: " + ", ".join(
      f"{fw} {s * 1e3:.0f} ms" for fw, s in per_pair.items()))
  print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
  print("| model | params | framework | reference | batch (pairs x len) | step s | "
        "pairs/s | tokens/s | GFLOP/s | of own matmul | rlhi / TRL tokens/s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for mode in modes:
    dt = {fw: statistics.median(times[(fw, mode)]) for fw in ("TRL", "rlhi")}
    for fw in ("TRL", "rlhi"):
      ratio = f"{dt['TRL'] / dt['rlhi']:.2f}x" if fw == "rlhi" else ""
      print(f"| {a.model} | {n_params / 1e6:.1f}M | {fw} | {mode} | "
            f"{a.pairs} x {a.length} | {dt[fw]:.3f} | {a.pairs / dt[fw]:.2f} | "
            f"{tokens / dt[fw]:,.0f} | {flops[mode] / dt[fw] / 1e9:.0f} | "
            f"{flops[mode] / dt[fw] / peak[fw]:.0%} | {ratio} |")


if __name__ == "__main__":
  main()
