r"""rlhi's DPO step against TRL's DPOTrainer, each in a process of its own.

  python bench/dpo_vs_trl.py --model tiny                  # 8 pairs x (256 + 256), 3 rounds
  python bench/dpo_vs_trl.py --model small --pairs 4 --steps 3 --modes cached --rounds 2
  python bench/dpo_vs_trl.py --model tiny --rlhi rlhi,rlhi_packed   # more rlhi variants
  python bench/dpo_vs_trl.py --model smollm2 --pairs 2 --rounds 2 --modes cached
  python bench/dpo_vs_trl.py --data rlhi --length 4096 --pairs 2 --modes cached \
      --buckets 512,1024,1536,2048,2560,3072,3584,4096 --rlhi rlhi,rlhi_packed

The parent process prepares once, then launches worker processes one at a time:

  1. Random `--model` params (rlhi init; or, for a model source such as `smollm2`, its
     real weights in float32), written with hf_io.save_checkpoint to a temp dir, and
     the bundled tokenizer saved with save_pretrained (its ids are valid in SmolLM2's
     larger vocabulary; step time does not depend on which tokens they are). Both workers load that
     directory (rlhi: hf_io.load_checkpoint; TRL: LlamaForCausalLM.from_pretrained), so
     they hold identical weights.
  2. The data (`--data`, a name in DATA): plain-text prompt/chosen/rejected made of words
     that are single tokens of the tokenizer, tokenized by TRL's own DPOTrainer (built
     once in the parent, never stepped), so the ids are exactly what TRL trains on; they
     go to pairs.json as lists of ids per pair (lists may differ in length: ragged data
     is allowed; `fixed`, the default, gives every pair `--prompt_length` prompt tokens
     and `length - prompt_length` response tokens, TRL's EOS included; `rlhi` draws
     (prompt, chosen, rejected) lengths from the bundled sample's pairs, the prompt x8
     and the responses x2, see `rlhi_text`).
  3. For `--rounds` rounds, for each mode (live: a reference forward every step;
     cached: reference log-probs computed once before training), one worker per
     framework in turn (rlhi variant(s), then TRL):

       python bench/dpo_vs_trl.py --worker rlhi|<rlhi variant>|trl --spec <json file>

     Each worker times a float32 `--matmul_n`^3 matmul in its own library (XLA or
     torch), builds and warms up its step (`--warmup` steps, the first one compiling),
     times `--steps` steps on the same batches in the same order (batch i = pairs
     [i * pairs, (i + 1) * pairs)), times the matmul again, and prints one JSON line.
     rlhi workers run XLA with its defaults and never import torch; the TRL worker sets
     torch.set_num_threads(os.cpu_count()) and never imports jax.

TRL: DPOTrainer with DPOConfig(loss_type sigmoid, beta 0.1, per_device_train_batch_size
= pairs, max_length = the longest sequence, use_cpu, bf16=False,
activation_checkpointing=False (TRL defaults both to True; rlhi runs float32 without
remat), sequential sampling (same batches as rlhi), constant learning rate, no eval, no
saving, report_to none), precompute_ref_log_probs = (mode == cached). Its dataset is
the token ids of pairs.json (the tokenization step is skipped: the ids are what it
produced in the parent); its collator pads each batch to its longest row as usual. A
TRL step is the time between two `on_step_end` callbacks (collation, forward, reference
forward, backward, optimizer, as in a real run).

rlhi: RLHI_STEPS maps a variant name to a builder (config, params, pairs, options) ->
BuiltStep; "rlhi" is the DPO train step with one row per response (sigmoid, beta 0.1,
AdamW, no remat, every batch padded to the bucket of its longest sequence, `--buckets`,
default one bucket of `--length`), "rlhi_packed" the same step on packed batches (the
prompt shared by both responses, several pairs per row: inputs.pack_batch),
"rlhi_dense" the unpacked step without attention blocks and with the LM head on every
column (the step before issue 17, an ablation). Each
distinct batch shape is compiled ahead of time and the batches are put on device
before timing. Add a variant by adding a builder.

Table: per framework and mode, the median over rounds of each worker's step (its
median step on fixed data, its mean step on ragged data, whose batches differ),
the spread (min-max) of those medians, pairs/s, real tokens/s (attention-mask ones),
GFLOP/s with the same model FLOP count for both (bench/train_step.py's count per
sequence at its real length: policy forward + backward, plus a forward for a live
reference; both LM heads project every position: TRL's fused head scores only the
response positions on Triton devices, on CPU all of them, trl/trainer/utils.py),
the median over rounds of the fraction of the worker's own matmul (mean of before and
after), and rlhi / TRL = TRL's median step / rlhi's (above 1: rlhi faster), with the
median of the per-round ratios in brackets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script: the repository root must be importable for `bench.*`.
sys.path.insert(0, ROOT)

BETA = 0.1
CHUNK = 256  # rlhi's LM-head chunk, as the training configs use
LR = 1e-5
RESULT = "RESULT "  # prefix of a worker's JSON line
PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")


# ---------------------------------------------------------------------------
# Data: plain text of single-token words, tokenized by TRL in the parent.
# ---------------------------------------------------------------------------


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


def _text(words, r, k: int) -> str:
  return "".join(words[i] for i in r.integers(0, len(words), size=k))


def fixed_text(words, n: int, prompt_length: int, length: int, seed: int = 0):
  """Every pair: `prompt_length` prompt tokens, `length - prompt_length` per response.

  Responses are one word short: TRL appends EOS.
  """
  r = np.random.default_rng(seed)
  cols = {"prompt": [], "chosen": [], "rejected": []}
  for _ in range(n):
    cols["prompt"].append(_text(words, r, prompt_length))
    cols["chosen"].append(_text(words, r, length - prompt_length - 1))
    cols["rejected"].append(_text(words, r, length - prompt_length - 1))
  return cols


def ragged_text(words, n: int, prompt_length: int, length: int, seed: int = 0):
  """Prompt lengths uniform in [prompt_length / 4, prompt_length], each response in
  [R / 4, R] (R = length - prompt_length), drawn apart: a stand-in until an RLHI-shaped
  generator replaces it. Sequences never exceed `length`."""
  r = np.random.default_rng(seed)
  resp = length - prompt_length
  cols = {"prompt": [], "chosen": [], "rejected": []}
  for _ in range(n):
    cols["prompt"].append(_text(words, r, int(r.integers(prompt_length // 4,
                                                         prompt_length + 1))))
    for k in ("chosen", "rejected"):
      cols[k].append(_text(words, r, int(r.integers(max(resp // 4, 2), resp + 1)) - 1))
  return cols


# RLHI-shaped data: the bundled sample's pairs, contexts scaled to WildChat lengths.
PROMPT_SCALE = 8
RESPONSE_SCALE = 2


def sample_pair_lengths() -> np.ndarray:
  """int [N, 3]: (prompt, chosen, rejected) tokens of every preference pair of the
  bundled sample (all splits), persona card included, tokenized by the bundled
  tokenizer's chat format as the DPO trainer does (no truncation). The data stages
  run with the reference client, as the demo and the tests run them (~2 s)."""
  # pylint: disable=g-import-not-at-top
  from configs import data_prep
  from rlhi import inputs
  from rlhi.data import files
  from rlhi.data import pipeline
  from rlhi.data import schema
  from rlhi.models import tokenizer as tok_lib
  fmt = tok_lib.ChatFormatter(tok_lib.load_tokenizer("bundled"))
  rows = []
  with tempfile.TemporaryDirectory() as d:
    cfg = data_prep.get_config("sample")
    for stage in pipeline.STAGES:
      pipeline.run_stage(stage, cfg, d)
    for split in schema.SPLITS:
      path = os.path.join(d, files.PAIRS.format(split=split))
      if os.path.exists(path):
        examples, _ = inputs.pairs_source(path, fmt, with_persona=True,
                                          max_length=1 << 20)
        rows += [(len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"]))
                 for e in examples]
  return np.asarray(rows)


def rlhi_text(words, n: int, prompt_length: int, length: int, seed: int = 0):
  """RLHI-shaped pairs: (prompt, chosen, rejected) lengths drawn together (bootstrap)
  from the bundled sample's pairs (`sample_pair_lengths`), the prompt (persona card +
  conversation so far) times PROMPT_SCALE and each response times RESPONSE_SCALE, to
  reach WildChat's multi-turn contexts; a draw whose prompt + longer response exceeds
  `length` is drawn again. `prompt_length` is unused."""
  del prompt_length
  r = np.random.default_rng(seed)
  table = sample_pair_lengths() * np.array([PROMPT_SCALE, RESPONSE_SCALE,
                                            RESPONSE_SCALE])
  table = table[table[:, 0] + table[:, 1:].max(1) <= length]
  cols = {"prompt": [], "chosen": [], "rejected": []}
  for p, c, x in table[r.integers(0, len(table), size=n)]:
    cols["prompt"].append(_text(words, r, p))
    # One word short: TRL appends EOS (an empty response is EOS alone).
    cols["chosen"].append(_text(words, r, max(c - 1, 0)))
    cols["rejected"].append(_text(words, r, max(x - 1, 0)))
  return cols


# name -> (words, n, prompt_length, length) -> text columns prompt/chosen/rejected
DATA: dict[str, Callable[..., dict[str, list[str]]]] = {
    "fixed": fixed_text, "ragged": ragged_text, "rlhi": rlhi_text}


def _trl_quiet():
  import datasets  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  datasets.disable_progress_bars()
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()


def _dpo_config(trl, work_dir: str, pairs: int, max_length: int, steps: int,
                precompute: bool):
  return trl.DPOConfig(
      output_dir=work_dir, loss_type=["sigmoid"], beta=BETA,
      per_device_train_batch_size=pairs, max_length=max_length, max_steps=steps,
      learning_rate=LR, lr_scheduler_type="constant",
      precompute_ref_log_probs=precompute, use_cpu=True, bf16=False,
      # transformers 5 renamed gradient_checkpointing (TRL defaults it to True);
      # setting the new name makes it win over the old default.
      activation_checkpointing=False, eval_strategy="no", save_strategy="no",
      report_to="none", logging_steps=10_000, disable_tqdm=True,
      dataloader_num_workers=0, dataloader_pin_memory=False, seed=0,
      # The same batches in the same order as rlhi's worker.
      train_sampling_strategy="sequential")


def trl_tokenized(model_dir: str, tok_dir: str, cols, work_dir: str, max_length: int
                  ) -> dict[str, list[list[int]]]:
  """The token ids TRL's DPOTrainer makes of text columns (its own _prepare_dataset)."""
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top
  _trl_quiet()
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  trainer = trl.DPOTrainer(
      model=model, args=_dpo_config(trl, work_dir, 1, max_length, 1, False),
      processing_class=tok, train_dataset=datasets.Dataset.from_dict(cols))
  rows = trainer.train_dataset
  out = {k: [list(map(int, x)) for x in rows[k]] for k in PAIR_KEYS}
  if len(out["prompt_ids"]) != len(cols["prompt"]):
    raise ValueError(f"TRL kept {len(out['prompt_ids'])} of {len(cols['prompt'])} pairs")
  return out


def hf_reference_logps(model_dir: str, pairs: list[dict[str, list[int]]]) -> np.ndarray:
  """Summed response log-probs of `pairs` under the HF model: [2B], chosen first."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  out = []
  for side in ("chosen_ids", "rejected_ids"):
    for e in pairs:
      ids = torch.tensor(e["prompt_ids"] + e[side])[None].long()
      with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
      picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
      out.append(float(picked[len(e["prompt_ids"]) - 1:].sum()))
  return np.asarray(out, np.float32)


def rows_of(data: dict[str, list[list[int]]]) -> list[dict[str, list[int]]]:
  return [dict(zip(PAIR_KEYS, t)) for t in zip(*(data[k] for k in PAIR_KEYS))]


# ---------------------------------------------------------------------------
# rlhi workers: named step builders.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class BuiltStep:
  """What a builder returns.

  step(i): runs train step i (batch i % batches) to completion (blocks).
  ref_logps_first: the reference log-probs of batch 0, chosen rows then rejected
    ([2 x pairs] summed response log-probs), for the agreement check with HF.
  ref_pass_s_per_pair: seconds per pair of the one-off reference pass (cached mode).
  compile_s: seconds spent compiling in the builder.
  """
  step: Callable[[int], None]
  ref_logps_first: list[float] | None = None
  ref_pass_s_per_pair: float | None = None
  compile_s: float = 0.0


def _host_batch(examples, options: dict[str, Any], packed: bool,
                score_positions: bool = True):
  """One batch as rlhi's trainers make it: unpacked pads every row to the bucket of
  the batch's longest sequence (`inputs.pad_batch`); packed lays pairs in rows of a
  bucket, the prompt shared by both responses (`inputs.pack_batch`)."""
  from rlhi import inputs  # pylint: disable=g-import-not-at-top
  buckets = tuple(options.get("buckets") or (options["length"],))
  if packed:
    return inputs.pack_batch(examples, pad_id=0, bucket_lengths=buckets,
                             score_positions=score_positions)
  return inputs.pad_batch(examples, batch_size=len(examples), pad_id=0,
                          bucket_lengths=buckets, score_positions=score_positions)


def _shape_key(batch) -> tuple:
  return tuple(sorted((k, np.shape(v)) for k, v in batch.items()))


def build_rlhi(config, params, pairs: list[dict[str, list[int]]],
               options: dict[str, Any], packed: bool = False, dense: bool = False
               ) -> BuiltStep:
  """rlhi's DPO step (objectives.dpo_loss in step_lib.make_train_step, as
  experiments/train_dpo.py runs it): chosen and rejected in one forward pass, one row
  each (`packed=False`) or packed with the shared prompt (`packed=True`). `dense`: the
  step as it was before issue 17's two changes, for an ablation: attention over the
  whole [T, T] square (attention_block=None) and the LM head on every column (no
  score_positions).

  options: mode ('live' or 'cached'), pairs (per batch), batches (how many distinct
  batches), length (the longest sequence), buckets (row lengths; default one bucket of
  `length`), beta, chunk, lr. Every distinct batch shape is compiled here, before any
  timed step (a real run compiles each shape once and reuses it).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from rlhi import sharding  # pylint: disable=g-import-not-at-top
  from rlhi.train import objectives  # pylint: disable=g-import-not-at-top
  from rlhi.train import reference  # pylint: disable=g-import-not-at-top
  from rlhi.train import step as step_lib  # pylint: disable=g-import-not-at-top

  mode, b = options["mode"], options["pairs"]
  live = mode == "live"
  if dense:
    config = dataclasses.replace(config, attention_block=None)
  batch_of = lambda ex: _host_batch(ex, options, packed, score_positions=not dense)
  opt = optax.adamw(options.get("lr", LR))
  # The policy's buffers are donated to the step: they must not be the reference's.
  state = jax.jit(lambda p: step_lib.init_state(p, opt, 0))(
      jax.tree.map(lambda x: jnp.array(x, copy=True), params))
  ref_params = params
  chunk = options.get("chunk", CHUNK)
  ref_fn = jax.jit(lambda p, bt: objectives.sequence_logps(p, config, bt, chunk)[0])
  compile_s = 0.0

  def compiled(fn, cache, *args):
    nonlocal compile_s
    key = _shape_key(args[1])
    if key not in cache:
      t = time.perf_counter()
      cache[key] = fn.lower(*args).compile()
      compile_s += time.perf_counter() - t
    return cache[key]

  ref_cache, step_cache = {}, {}
  ref_s, batches, first = [], [], None
  for i in range(options["batches"]):
    examples = [{k: np.asarray(e[k], np.int32) for k in PAIR_KEYS}
                for e in pairs[i * b:(i + 1) * b]]
    dev = sharding.global_batch(batch_of(examples))
    fn = compiled(ref_fn, ref_cache, ref_params, dev)
    t = time.perf_counter()
    ref = np.asarray(jax.device_get(fn(ref_params, dev)), np.float32)
    ref_s.append(time.perf_counter() - t)
    if packed:  # slot order -> the examples' order
      index = np.asarray(dev["example_index"]).reshape(-1)
      chosen, rejected = np.split(ref, 2)
      ref = np.zeros(2 * b, np.float32)
      ref[index[index >= 0]] = chosen[index >= 0]
      ref[b + index[index >= 0]] = rejected[index >= 0]
    first = ref if first is None else first
    for j, e in enumerate(examples):
      e[reference.CHOSEN], e[reference.REJECTED] = ref[j], ref[b + j]
    batches.append(sharding.global_batch(batch_of(examples)))
  loss = objectives.dpo_loss(config, loss_type="sigmoid",
                             beta=options.get("beta", BETA), chunk=chunk,
                             live_reference=live)
  step = jax.jit(step_lib.make_train_step(loss, opt), donate_argnums=0)
  extra = (ref_params,) if live else ()
  for batch in batches:
    compiled(step, step_cache, state, batch, *extra)
  holder = {"state": state}

  def run(i: int):
    batch = batches[i % len(batches)]
    fn = step_cache[_shape_key(batch)]
    holder["state"], m = fn(holder["state"], batch, *extra)
    jax.block_until_ready(m)

  return BuiltStep(run, first.tolist(),
                   statistics.median(ref_s) / b if not live else None, compile_s)


# name -> builder(config, params, pairs, options) -> BuiltStep. A new variant is one
# more entry; run several with --rlhi rlhi,rlhi_packed.
RLHI_STEPS: dict[str, Callable[..., BuiltStep]] = {
    "rlhi": build_rlhi,
    "rlhi_packed": lambda *a: build_rlhi(*a, packed=True),
    "rlhi_dense": lambda *a: build_rlhi(*a, dense=True)}


def model_config(name: str, model_dir: str | None = None):
  """float32 LlamaConfig of `--model`: a named config of rlhi.models.llama (random
  weights), or a model source (rlhi.models.sources: 'smollm2', a .gguf file, an HF
  directory) whose real weights the parent exports; a worker reads the export."""
  # pylint: disable=g-import-not-at-top
  from rlhi.models import hf_io
  from rlhi.models import llama
  from rlhi.models import sources
  f32 = dict(param_dtype="float32", dtype="float32")
  if model_dir is not None and name not in llama.CONFIG_NAMES:
    return hf_io.load_config(model_dir, **f32)
  if name in llama.CONFIG_NAMES:
    return llama.get_config(name, **f32)
  return sources.load_config(name, **f32)


def xla_matmul_flops_per_s(n: int, reps: int = 3) -> float:
  from bench import train_step  # pylint: disable=g-import-not-at-top
  return train_step.matmul_flops_per_s(n, reps=reps)


def rlhi_worker(name: str, spec: dict[str, Any]) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from rlhi import sharding  # pylint: disable=g-import-not-at-top
  from rlhi.models import hf_io  # pylint: disable=g-import-not-at-top
  from rlhi.models import llama  # pylint: disable=g-import-not-at-top

  peaks = [xla_matmul_flops_per_s(spec["matmul_n"])]
  config = model_config(spec["model"], spec["model_dir"])
  pairs = rows_of(json.load(open(spec["data"])))
  mesh = sharding.make_mesh({"fsdp": -1})
  with sharding.use_mesh(mesh):
    shardings = sharding.logical_shardings(llama.abstract_params(config), mesh)
    _, params = hf_io.load_checkpoint(spec["model_dir"], config, shardings=shardings)
    options = dict(spec["options"], mode=spec["mode"], pairs=spec["pairs"],
                   batches=spec["warmup"] + spec["steps"], length=spec["length"])
    t = time.perf_counter()
    built = RLHI_STEPS[name](config, params, pairs, options)
    build_s = time.perf_counter() - t
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
      t = time.perf_counter()
      built.step(i)
      times.append(time.perf_counter() - t)
  peaks.append(xla_matmul_flops_per_s(spec["matmul_n"]))
  return {"framework": name, "mode": spec["mode"], "times": times, "peaks": peaks,
          "build_s": build_s, "compile_s": built.compile_s,
          "ref_pass_s_per_pair": built.ref_pass_s_per_pair,
          "ref_logps_first": built.ref_logps_first,
          "devices": f"{jax.device_count()} {jax.devices()[0].platform}"}


# ---------------------------------------------------------------------------
# TRL worker.
# ---------------------------------------------------------------------------


def torch_matmul_flops_per_s(n: int, reps: int = 3) -> float:
  """train_step.matmul_flops_per_s in torch: TRL's yardstick, as XLA's is rlhi's."""
  import torch  # pylint: disable=g-import-not-at-top
  a = torch.ones(n, n)
  a @ a  # pylint: disable=pointless-statement  (warm up)
  t = time.perf_counter()
  for _ in range(reps):
    a @ a  # pylint: disable=pointless-statement
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


def trl_worker(spec: dict[str, Any]) -> dict[str, Any]:
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  peaks = [torch_matmul_flops_per_s(spec["matmul_n"])]
  _trl_quiet()
  torch.manual_seed(0)

  class Timed(transformers.TrainerCallback):

    def __init__(self):
      self.times, self.start = [], 0.0

    def on_train_begin(self, args, state, control, **kwargs):
      self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      t = time.perf_counter()
      self.times.append(t - self.start)
      self.start = t

  class IdsDPOTrainer(trl.DPOTrainer):
    """DPOTrainer on ids it tokenized before (in the parent); times its ref pass."""

    precompute_s = 0.0

    def _prepare_dataset(self, dataset, *a, **kw):
      if all(k in dataset.column_names for k in PAIR_KEYS):
        return dataset
      return super()._prepare_dataset(dataset, *a, **kw)

    def _precompute_ref_logps(self, *a, **kw):
      t = time.perf_counter()
      out = super()._precompute_ref_logps(*a, **kw)
      self.precompute_s += time.perf_counter() - t
      return out

  data = json.load(open(spec["data"]))
  n_steps = spec["warmup"] + spec["steps"]
  data = {k: v[:spec["pairs"] * n_steps] for k, v in data.items()}
  tok = transformers.AutoTokenizer.from_pretrained(spec["tok_dir"])
  model = transformers.LlamaForCausalLM.from_pretrained(spec["model_dir"],
                                                        dtype=torch.float32)
  callback = Timed()
  t = time.perf_counter()
  trainer = IdsDPOTrainer(
      model=model, processing_class=tok, callbacks=[callback],
      args=_dpo_config(trl, spec["work_dir"], spec["pairs"], spec["length"], n_steps,
                       spec["mode"] == "cached"),
      train_dataset=datasets.Dataset.from_dict(data))
  build_s = time.perf_counter() - t
  if trainer.model.is_activation_checkpointing:
    raise RuntimeError("TRL's policy has activation checkpointing on; rlhi has none")
  rows = trainer.train_dataset
  if [list(map(int, x)) for x in rows["chosen_ids"]] != data["chosen_ids"]:
    raise RuntimeError("TRL's train_dataset is not the ids of the spec")
  trainer.train()
  peaks.append(torch_matmul_flops_per_s(spec["matmul_n"]))
  n = len(data["prompt_ids"])
  return {"framework": "TRL", "mode": spec["mode"], "times": callback.times,
          "peaks": peaks, "build_s": build_s,
          "ref_pass_s_per_pair": trainer.precompute_s / n if trainer.precompute_s
          else None, "torch_threads": torch.get_num_threads()}


def worker_main(name: str, spec_path: str):
  # TRL's own tqdm bars (reference precompute) read this.
  os.environ.setdefault("TQDM_DISABLE", "1")
  spec = json.load(open(spec_path))
  out = trl_worker(spec) if name == "trl" else rlhi_worker(name, spec)
  out["load_avg"] = os.getloadavg()[0]
  print(RESULT + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------
# Parent.
# ---------------------------------------------------------------------------


def run_worker(name: str, spec_path: str, log) -> dict[str, Any]:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--spec",
         spec_path]
  p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                     check=False, cwd=ROOT)
  log.write(f"==== {' '.join(cmd)} (rc {p.returncode})\n{p.stdout}\n")
  log.flush()
  lines = [l for l in p.stdout.splitlines() if l.startswith(RESULT)]
  if p.returncode or not lines:
    raise RuntimeError(f"worker {name} failed (rc {p.returncode}):\n{p.stdout[-4000:]}")
  return json.loads(lines[-1][len(RESULT):])


def seq_flops(config, n_params: int, lengths: list[int]) -> float:
  """Policy forward + backward FLOPs of sequences of these real lengths."""
  from bench import train_step  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=protected-access
  return sum(train_step._flops(config, n_params, 1, t, True) for t in lengths)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--worker", help="internal: rlhi variant name or 'trl'")
  p.add_argument("--spec", help="internal: the worker's JSON spec")
  p.add_argument("--model", default="tiny")
  p.add_argument("--pairs", type=int, default=8, help="pairs per batch")
  p.add_argument("--length", type=int, default=512, help="longest sequence")
  p.add_argument("--prompt_length", type=int, default=256)
  p.add_argument("--data", default="fixed", choices=sorted(DATA))
  p.add_argument("--buckets", default="", help="rlhi's row lengths, commas (default: "
                 "--length only); TRL pads each batch to its longest row")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps per worker")
  p.add_argument("--steps", type=int, default=5, help="timed steps per worker")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--modes", default="live,cached")
  p.add_argument("--rlhi", default="rlhi", help="rlhi variants (RLHI_STEPS), commas")
  p.add_argument("--matmul_n", type=int, default=4096)
  p.add_argument("--keep", default="", help="keep the prepared files in this dir")
  p.add_argument("--log", default="", help="workers' output (default: in the dir)")
  p.add_argument("--from_log", default="", help="print the table of the RESULT lines "
                 "of this worker log (an earlier run with the same flags); no workers")
  a = p.parse_args()
  if a.worker:
    worker_main(a.worker, a.spec)
    return
  os.environ.setdefault("TQDM_DISABLE", "1")
  variants = a.rlhi.split(",")
  for v in variants:
    if v not in RLHI_STEPS:
      raise SystemExit(f"--rlhi {v}: known variants {sorted(RLHI_STEPS)}")
  modes = a.modes.split(",")

  import jax  # pylint: disable=g-import-not-at-top
  from rlhi.models import hf_io  # pylint: disable=g-import-not-at-top
  from rlhi.models import llama  # pylint: disable=g-import-not-at-top
  from rlhi.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  config = model_config(a.model)
  n_params = llama.param_count(config)
  n_steps = a.warmup + a.steps
  tmp = None
  if a.keep:
    work = a.keep
    os.makedirs(work, exist_ok=True)
  else:
    tmp = tempfile.TemporaryDirectory()
    work = tmp.name
  model_dir, tok_dir = os.path.join(work, "model"), os.path.join(work, "tokenizer")
  if a.model in llama.CONFIG_NAMES:
    params = llama.init_params(config, jax.random.PRNGKey(0))
  else:  # real weights (e.g. SmolLM2's GGUF, dequantized to float32)
    from rlhi.models import sources  # pylint: disable=g-import-not-at-top
    config, params = sources.load_checkpoint(a.model, param_dtype="float32",
                                             dtype="float32")
  hf_io.save_checkpoint(params, config, model_dir)
  tok = tokenizer_lib.load_tokenizer("bundled")
  tok.save_pretrained(tok_dir)
  cols = DATA[a.data](single_token_words(tok), a.pairs * n_steps, a.prompt_length,
                      a.length)
  data = trl_tokenized(model_dir, tok_dir, cols, os.path.join(work, "prep"), a.length)
  pairs = rows_of(data)
  lengths = [len(e["prompt_ids"]) + len(e[s]) for e in pairs
             for s in ("chosen_ids", "rejected_ids")]
  if max(lengths) > a.length:
    raise ValueError(f"longest tokenized sequence {max(lengths)} > --length {a.length}")
  if a.data == "fixed" and set(lengths) != {a.length}:
    raise ValueError(f"TRL tokenized sequence lengths {sorted(set(lengths))}, want "
                     f"{a.length} each")
  data_path = os.path.join(work, "pairs.json")
  with open(data_path, "w") as f:
    json.dump(data, f)
  # Real tokens and model FLOPs of the timed steps (the batches after the warm-up).
  timed = lengths[2 * a.pairs * a.warmup:]
  tokens_per_step = sum(timed) / a.steps
  train_flops = seq_flops(config, n_params, timed) / a.steps
  flops = {"cached": train_flops, "live": train_flops * 4 / 3}
  hf_ref = hf_reference_logps(model_dir, pairs[:a.pairs])
  print(f"{a.model} ({n_params / 1e6:.1f}M), {a.data} data, {a.pairs} pairs per batch, "
        f"sequences {min(lengths)}-{max(lengths)} tokens (prompt "
        f"{min(len(e['prompt_ids']) for e in pairs)}-"
        f"{max(len(e['prompt_ids']) for e in pairs)}), {os.cpu_count()} CPUs, "
        f"{a.rounds} rounds x {modes} x {variants + ['trl']}, {a.warmup} + {a.steps} "
        f"steps per worker, load average {os.getloadavg()[0]:.1f} at start", flush=True)
  for k in PAIR_KEYS:
    n = [len(e[k]) for e in pairs]
    print(f"  {k[:-4]} tokens: median {np.median(n):.0f}, p10 {np.percentile(n, 10):.0f},"
          f" p90 {np.percentile(n, 90):.0f}, max {max(n)}")

  specs = {}
  for mode in modes:
    spec = dict(model=a.model, model_dir=model_dir, tok_dir=tok_dir, data=data_path,
                mode=mode, pairs=a.pairs, length=a.length, warmup=a.warmup,
                steps=a.steps, matmul_n=a.matmul_n, work_dir=os.path.join(work, mode),
                options={"beta": BETA, "chunk": CHUNK, "lr": LR,
                         "buckets": [int(x) for x in a.buckets.split(",") if x]})
    specs[mode] = os.path.join(work, f"spec_{mode}.json")
    with open(specs[mode], "w") as f:
      json.dump(spec, f)

  results: dict[tuple[str, str], list[dict[str, Any]]] = {}
  if a.from_log:  # re-render the table of an earlier run (same flags)
    log_path = a.from_log
    for line in open(a.from_log):
      if line.startswith(RESULT):
        out = json.loads(line[len(RESULT):])
        results.setdefault((out["framework"], out["mode"]), []).append(out)
  else:
    log_path = a.log or os.path.join(work, "workers.log")
  with open(os.devnull if a.from_log else log_path, "w") as log:
    for r in range(0 if a.from_log else a.rounds):
      for mode in modes:
        for name in variants + ["trl"]:
          t = time.perf_counter()
          out = run_worker(name, specs[mode], log)
          results.setdefault((out["framework"], mode), []).append(out)
          print(f"  round {r + 1} {out['framework']} {mode}: steps " + ", ".join(
              f"{x:.3f}" for x in out["times"]) + f" s (first {a.warmup} untimed); "
              f"matmul {' / '.join(f'{x / 1e9:.0f}' for x in out['peaks'])} GFLOP/s; "
              f"process {time.perf_counter() - t:.0f} s", flush=True)

  for (fw, mode), outs in results.items():
    if outs[0].get("ref_logps_first") is not None:
      mine = np.asarray(outs[0]["ref_logps_first"], np.float32)
      print(f"  max |logp diff| {fw} vs transformers, reference log-probs of the first "
            f"batch: {np.abs(mine - hf_ref).max():.2e} (|logp| ~ "
            f"{np.abs(hf_ref).mean():.0f})")
      break
  ref_pass = {fw: statistics.median(o["ref_pass_s_per_pair"] for o in outs)
              for (fw, mode), outs in results.items() if mode == "cached"
              and outs[0]["ref_pass_s_per_pair"] is not None}
  if ref_pass:
    print("  one-off reference pass per pair: " + ", ".join(
        f"{fw} {s * 1e3:.0f} ms" for fw, s in ref_pass.items()))
  print(f"\nload average {os.getloadavg()[0]:.1f} at the end; worker log {log_path}\n")

  # Fixed data: every batch has the same shape, the median step resists noise. Ragged
  # data: batches differ, so a worker's step time is its mean (total time / steps).
  step_stat = statistics.median if a.data == "fixed" else statistics.mean
  print("| model | data | framework | reference | batch | step s (median) | spread | "
        "pairs/s | tokens/s | GFLOP/s | of own matmul | rlhi / TRL |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for mode in modes:
    med = {}
    for name in ["TRL"] + variants:
      outs = results[(name, mode)]
      per_round = [step_stat(o["times"][a.warmup:]) for o in outs]
      med[name] = statistics.median(per_round)
      frac = statistics.median(flops[mode] / s / statistics.mean(o["peaks"])
                               for s, o in zip(per_round, outs))
      ratio = ""
      if name != "TRL":
        # Also the median of the per-round ratios (workers of one round ran minutes
        # apart, so they saw similar load): steadier than the ratio of medians when
        # the load drifts between rounds.
        trl_rounds = [step_stat(o["times"][a.warmup:])
                      for o in results[("TRL", mode)]]
        per = statistics.median(t / s for t, s in zip(trl_rounds, per_round))
        ratio = f"{med['TRL'] / med[name]:.2f}x (per round {per:.2f}x)"
      print(f"| {a.model} | {a.data} | {name} | {mode} | {a.pairs} x {max(lengths)} | "
            f"{med[name]:.3f} | {min(per_round):.3f}-{max(per_round):.3f} | "
            f"{a.pairs / med[name]:.2f} | {tokens_per_step / med[name]:,.0f} | "
            f"{flops[mode] / med[name] / 1e9:.0f} | {frac:.0%} | {ratio} |")
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
