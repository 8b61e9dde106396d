"""The persona-conditioned reward model: the trainer behind experiments/train_reward.py
(configs/reward_model.py).

Bradley-Terry on the rewrite pairs (rlhi.train.objectives.reward_loss); writes
checkpoints, metrics, eval_report.{md,json} (held-out users' pairs with and without
persona) and the model to <workdir>/reward_model (rlhi.models.reward_io).
"""

from __future__ import annotations

import os

import jax

from rlhi import inputs
from rlhi import reports
from rlhi import sharding
from rlhi.data import files
from rlhi.models import builder
from rlhi.models import llama
from rlhi.models import reward_io
from rlhi.models import reward as reward_lib
from rlhi.models import tokenizer as tok_lib
from rlhi.train import loop
from rlhi.train import objectives
from rlhi.train import step as step_lib


def run(cfg, workdir: str) -> None:
  """Trains the reward model on `cfg.data.dir`'s pairs; see configs/reward_model.py.
  Call `sharding.initialize_distributed()` first."""
  # ---- Tokenizer and data ------------------------------------------------------------
  fmt = tok_lib.ChatFormatter(tok_lib.load_tokenizer(builder.tokenizer_name(cfg)),
                              cfg.data.system_template)
  sets, input_stats = inputs.pair_sets(
      fmt, cfg.data.dir, [(files.PAIRS, "train", cfg.data.with_persona)] + [
          (files.PAIRS, s, p) for s in cfg.eval_splits for p in (True, False)],
      max_length=cfg.data.max_length, max_response_length=cfg.data.max_response_length)
  train_examples = sets.pop(("train", cfg.data.with_persona))
  evals = sets

  # ---- Model -------------------------------------------------------------------------
  mconfig = builder.model_config(cfg.model)
  lm_abstract = llama.abstract_params(mconfig)

  def init_params(shardings):
    mesh = jax.tree.leaves(shardings)[0].mesh
    lm = builder.init_params(
        cfg.model, mconfig, sharding.logical_shardings(lm_abstract, mesh), cfg.seed)
    return jax.jit(lambda p: reward_lib.init_params(mconfig, None, backbone=p),
                   out_shardings=shardings)(lm)

  # ---- Loss and evaluators -----------------------------------------------------------
  loss_fn = objectives.reward_loss(mconfig, cfg.loss.margin, cfg.loss.center_coef)
  eval_step = jax.jit(step_lib.make_eval_step(loss_fn))

  def evaluate(params, step):
    del step
    return loop.evaluate_held_out(eval_step, params, evals, batch_size=cfg.batch_size,
                                  pad_id=fmt.pad_id,
                                  bucket_lengths=cfg.data.bucket_lengths,
                                  post=objectives.with_reward_std)

  result = loop.train(cfg, workdir, loop.Task(
      name="reward", loss_fn=loss_fn, abstract_params=reward_lib.abstract_params(mconfig),
      init_params=init_params, train_examples=train_examples, pad_id=fmt.pad_id,
      evaluate=evaluate))

  # ---- Report ------------------------------------------------------------------------
  if sharding.is_main_process() and not result.preempted:
    write_report(workdir, cfg, result.final_eval, len(train_examples), input_stats)

  # ---- Export ------------------------------------------------------------------------
  # For experiments/evaluate.py. Every process calls it (the gathers are collective, as
  # in train_sft's export); only process 0 writes.
  if not result.preempted:
    reward_io.save(result.state.params, mconfig, os.path.join(workdir, "reward_model"),
                   tokenizer=fmt.tok, system_template=cfg.data.system_template,
                   with_persona=cfg.data.with_persona)


def write_report(workdir, cfg, final, n_train, input_stats):
  stats = loop.input_stats_by_tag(input_stats)
  rows = loop.held_out_rows(final, cfg.eval_splits,
                            [("accuracy", ".3f"), ("margin", ".3f"), ("loss", ".4f")],
                            input_stats=stats, accuracy="accuracy")
  md = "\n".join([
      "# Reward model evaluation", "",
      f"Model: {cfg.model.name} (init: {cfg.model.init or 'random'}); trained "
      f"{cfg.total_steps} steps on {n_train} train pairs "
      f"({'with' if cfg.data.with_persona else 'without'} persona).", "",
      loop.inputs_line(stats, loop.persona_tag("train", cfg.data.with_persona),
                       max_length=cfg.data.max_length,
                       max_response_length=cfg.data.max_response_length), "",
      "Held-out users' pairs, scored with the persona in the prompt and without it:", "",
      *loop.held_out_header(["accuracy", "mean margin", "loss"], accuracy="accuracy"),
      *rows, ""])
  reports.write_report(workdir, "eval", dict(final) | {"inputs": stats}, md)

