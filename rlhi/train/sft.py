"""Supervised fine-tuning on training users' conversations or chosen rewrites: the
trainer behind experiments/train_sft.py (configs/sft.py).

Writes checkpoints and metrics, and at the end the policy with its tokenizer to
<workdir>/hf (an HF safetensors directory).
"""

from __future__ import annotations

import os

import jax

from rlhi import inputs
from rlhi import sharding
from rlhi.data import files
from rlhi.data import schema
from rlhi.models import builder
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.models import tokenizer as tok_lib
from rlhi.train import loop
from rlhi.train import objectives
from rlhi.train import step as step_lib


def load_examples(cfg, fmt, splits):
  """Tokenized SFT examples of the users in `splits`, persona in the system slot:
  their conversations (every assistant turn a target), or with data.source='rewrites'
  the chosen answers of their rewrite pairs (the paper's SFT-on-rewrites baseline)."""
  path = lambda name: files.input_path(cfg.data.dir, name)
  if cfg.data.get("source", "conversations") == "rewrites":
    return _rewrite_examples(cfg, fmt, splits)
  users = schema.read_jsonl(path(files.USERS), schema.User)
  keep = {u.user_id for u in users if u.split in splits}
  convs = [c for c in schema.read_jsonl(path(files.CONVERSATIONS), schema.Conversation)
           if c.user_id in keep]
  personas = {}
  if cfg.data.with_persona:
    personas = {p.user_id: p.to_text() for p in schema.read_jsonl(
        path(files.PERSONAS), schema.Persona)}
  examples, stats = inputs.tokenize_conversations(
      fmt, convs, max_length=cfg.data.max_length,
      max_response_length=cfg.data.max_response_length, personas=personas)
  return examples, stats


def _rewrite_examples(cfg, fmt, splits):
  pairs = [p for split in splits for p in schema.read_jsonl(
      files.input_path(cfg.data.dir, files.PAIRS.format(split=split)),
      schema.PreferencePair)]
  stats = inputs.InputStats()
  examples = []
  for p in pairs:
    t = inputs.tokenize_completion(
        fmt, [m.to_chat() for m in p.prompt], p.chosen,
        max_length=cfg.data.max_length,
        max_response_length=cfg.data.max_response_length,
        persona=p.persona if cfg.data.with_persona else None,
        example_id=p.pair_id, user_id=p.user_id)
    stats.add(t.truncation)
    if t.example is not None:
      examples.append(t.example)
  return examples, stats


def run(cfg, workdir: str) -> None:
  """SFT of `cfg.model` on the training users' conversations or chosen rewrites
  (cfg.data.source); see configs/sft.py.
  Call `sharding.initialize_distributed()` first."""
  # ---- Tokenizer and data ------------------------------------------------------------
  tokenizer = tok_lib.load_tokenizer(builder.tokenizer_name(cfg))
  fmt = tok_lib.ChatFormatter(tokenizer, cfg.data.system_template)
  train_examples, _ = load_examples(cfg, fmt, (cfg.data.train_split,))
  val_examples, _ = load_examples(cfg, fmt, ("val",))

  # ---- Model, loss, evaluator --------------------------------------------------------
  mconfig = builder.model_config(cfg.model)
  loss_fn = objectives.sft_loss(mconfig, cfg.logprob_chunk)
  eval_step = jax.jit(step_lib.make_eval_step(loss_fn))

  def evaluate(params, step):
    del step
    return loop.evaluate_examples(eval_step, params, val_examples,
                                  batch_size=cfg.batch_size, pad_id=fmt.pad_id,
                                  bucket_lengths=cfg.data.bucket_lengths)

  result = loop.train(cfg, workdir, loop.Task(
      name="sft", loss_fn=loss_fn, abstract_params=llama.abstract_params(mconfig),
      init_params=lambda s: builder.init_params(cfg.model, mconfig, s, cfg.seed),
      train_examples=train_examples, pad_id=fmt.pad_id,
      evaluate=evaluate if val_examples else None))

  # ---- Export ------------------------------------------------------------------------
  if not result.preempted:
    export = os.path.join(workdir, "hf")
    hf_io.save_checkpoint(result.state.params, mconfig, export)
    if sharding.is_main_process():
      tok_lib.save_tokenizer(tokenizer, export)

