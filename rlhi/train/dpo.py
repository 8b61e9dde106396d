"""Persona-conditioned DPO: the trainer behind experiments/train_dpo.py and each round
of experiments/user_rewards.py (configs/dpo.py).

Policy and reference load onto one mesh; reference log-probs are cached
(rlhi/train/reference.py) or computed live; the loss is rlhi.losses.dpo_loss through
objectives.dpo_loss; the loop is the shared one (rlhi/train/loop.py).
"""

from __future__ import annotations

import os

from absl import logging
import jax

from rlhi import inputs
from rlhi import losses
from rlhi import reports
from rlhi import sharding
from rlhi.models import builder
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.models import tokenizer as tok_lib
from rlhi.train import loop
from rlhi.train import objectives
from rlhi.train import reference
from rlhi.train import step as step_lib


# The config fields of rlhi.losses.dpo_loss's options, for error messages.
CONFIG_FIELDS = {"loss_type": "config.loss.type", "loss_weights": "config.loss.weights",
                 "beta": "config.loss.beta",
                 "label_smoothing": "config.loss.label_smoothing",
                 "rpo_alpha": "config.loss.rpo_alpha"}


def loss_options(cfg) -> dict:
  """config.loss -> keyword arguments of objectives.dpo_loss; ValueError naming the
  config field on a bad option."""
  types = tuple(t.strip() for t in cfg.loss.type.split(",") if t.strip())
  weights = None
  if cfg.loss.weights:
    weights = tuple(float(w) for w in cfg.loss.weights.split(","))
  losses.check_dpo_options(types, weights, cfg.loss.beta, cfg.loss.label_smoothing,
                           cfg.loss.rpo_alpha, fields=CONFIG_FIELDS)
  return dict(loss_type=types if len(types) > 1 else types[0], loss_weights=weights,
              beta=cfg.loss.beta, label_smoothing=cfg.loss.label_smoothing,
              rpo_alpha=cfg.loss.rpo_alpha, chunk=cfg.logprob_chunk)


def reference_model_cfg(cfg):
  """config.model with `init` replaced by the reference checkpoint."""
  ref = cfg.model.copy_and_resolve_references()
  with ref.unlocked():
    ref.init = cfg.reference.init or cfg.model.init
  return ref


def run(cfg, workdir: str, mesh: jax.sharding.Mesh | None = None) -> loop.TrainResult:
  """DPO of `cfg.model.init` on the pairs `cfg.data.pairs`; see configs/dpo.py.

  Writes checkpoints and metrics, and at the end the policy to <workdir>/hf and
  eval_report.{md,json} (process 0). Call `sharding.initialize_distributed()` first.
  """
  if cfg.reference.mode not in ("cached", "live"):
    raise ValueError(f"config.reference.mode={cfg.reference.mode!r}; expected 'cached' "
                     f"or 'live'")
  # ---- Tokenizer and data ------------------------------------------------------------
  tok_name = builder.tokenizer_name(cfg)
  tokenizer = tok_lib.load_tokenizer(tok_name)
  fmt = tok_lib.ChatFormatter(tokenizer, cfg.data.system_template)

  sets, input_stats = inputs.pair_sets(
      fmt, cfg.data.dir, [(cfg.data.pairs, "train", cfg.data.with_persona)] + [
          (cfg.data.eval_pairs, s, p) for s in cfg.eval_splits for p in (True, False)],
      max_length=cfg.data.max_length, max_response_length=cfg.data.max_response_length)
  train_examples = sets.pop(("train", cfg.data.with_persona))
  evals = sets

  # ---- Models: policy and reference --------------------------------------------------
  mconfig = builder.model_config(cfg.model)
  ref_model = reference_model_cfg(cfg)
  ref_config = builder.model_config(ref_model)
  mesh = mesh or sharding.make_mesh(dict(cfg.mesh))
  rules = sharding.rules_from_config(cfg.get("sharding_rules", ()))
  ref_params = builder.init_params(
      ref_model, ref_config,
      sharding.logical_shardings(llama.abstract_params(ref_config), mesh, rules),
      cfg.seed)
  options = loss_options(cfg)
  live = cfg.reference.mode == "live"
  if live:
    frozen = ref_params
  else:
    frozen = None
    cache_args = dict(
        cache_dir=cfg.reference.cache_dir or os.path.join(workdir, "reference_logps"),
        tokenizer=tok_name, system_template=cfg.data.system_template,
        params_fp=reference.params_fingerprint(ref_params), mesh=mesh,
        batch_size=cfg.batch_size, pad_id=fmt.pad_id,
        bucket_lengths=cfg.data.bucket_lengths, chunk=cfg.logprob_chunk,
        packing=bool(cfg.data.get("packing", False)), rules=rules)
    result = reference.cached(ref_params, ref_config, train_examples, **cache_args)
    logging.info("reference log-probs for %d train pairs: %s (%s)", len(train_examples),
                 result.path, "reused" if result.reused else "computed")
    train_examples = result.examples
    evals = {k: reference.cached(ref_params, ref_config, v, **cache_args).examples
             if len(v) else v for k, v in evals.items()}
    del ref_params  # only the cached numbers are needed from here on

  # ---- Loss and evaluators -----------------------------------------------------------
  loss_fn = objectives.dpo_loss(mconfig, ref_config=ref_config, live_reference=live,
                                **options)
  eval_step = jax.jit(step_lib.make_eval_step(loss_fn))

  def evaluate(params, step):
    del step
    return loop.evaluate_held_out(eval_step, params, evals, batch_size=cfg.batch_size,
                                  pad_id=fmt.pad_id,
                                  bucket_lengths=cfg.data.bucket_lengths, frozen=frozen,
                                  score_positions=True)

  result = loop.train(cfg, workdir, loop.Task(
      name="dpo", loss_fn=loss_fn, abstract_params=llama.abstract_params(mconfig),
      init_params=lambda s: builder.init_params(cfg.model, mconfig, s, cfg.seed),
      train_examples=train_examples, pad_id=fmt.pad_id, evaluate=evaluate,
      frozen=frozen, score_positions=True), mesh=mesh)

  # ---- Export and report -------------------------------------------------------------
  if not result.preempted:
    export = os.path.join(workdir, "hf")
    hf_io.save_checkpoint(result.state.params, mconfig, export)
    if sharding.is_main_process():
      tok_lib.save_tokenizer(tokenizer, export)
      write_report(workdir, cfg, result.final_eval, len(train_examples), input_stats)
  return result


def write_report(workdir, cfg, final, n_train, input_stats):
  stats = loop.input_stats_by_tag(input_stats)
  rows = loop.held_out_rows(final, cfg.eval_splits, [
      ("rewards/accuracies", ".3f"), ("rewards/margins", ".4f"),
      ("rewards/chosen", ".4f"), ("rewards/rejected", ".4f"), ("kl_proxy", ".4f"),
      ("loss", ".4f")], input_stats=stats, accuracy="rewards/accuracies")
  md = "\n".join([
      "# DPO evaluation", "",
      f"Policy: {cfg.model.name} from {cfg.model.init or 'random init'}; reference: "
      f"{cfg.reference.init or cfg.model.init or 'the initial policy'} "
      f"({cfg.reference.mode}); loss {cfg.loss.type} (beta={cfg.loss.beta}); "
      f"{cfg.total_steps} steps on {n_train} train pairs "
      f"({'with' if cfg.data.with_persona else 'without'} persona).", "",
      loop.inputs_line(stats, loop.persona_tag("train", cfg.data.with_persona),
                       max_length=cfg.data.max_length,
                       max_response_length=cfg.data.max_response_length), "",
      "Held-out users' pairs (rewards = beta x policy/reference log-ratio):", "",
      *loop.held_out_header(["reward accuracy", "margin", "chosen", "rejected",
                             "kl proxy", "loss"], accuracy="rewards/accuracies"),
      *rows, ""])
  reports.write_report(workdir, "eval", dict(final) | {"inputs": stats}, md)
