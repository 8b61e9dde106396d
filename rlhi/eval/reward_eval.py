"""Reward-model evaluation: accuracy and margin on held-out users' preference pairs.

Scores `pairs_rewrites.<split>.jsonl` of the data-prep workdir (val / test users) with a
reward model saved by rlhi.models.reward_io, once with the persona in the system slot
and once without it, through the same code as training's evaluation: rlhi.inputs
tokenization, objectives.reward_loss and loop.evaluate_examples. So the numbers are
comparable with train_reward's eval_report.md.

    out = reward_eval.evaluate_reward_model(path, data_dir, splits=("val", "test"))
    out["metrics"]["test_persona/accuracy"]

Metrics per '<split>_<persona|no_persona>': accuracy (share of pairs with r(chosen) >
r(rejected)), margin (mean r(chosen) - r(rejected)), loss (Bradley-Terry), reward_mean,
reward_std, count (pairs scored). Pairs that cannot fit max_length are counted in
`inputs` (rlhi.inputs.InputStats), never silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from rlhi import fileio
from rlhi import reports
from rlhi.data import files

REPORT_NAME = "reward_eval"  # -> reward_eval_report.{json,md}


def evaluate_reward_model(path: str, data_dir: str, *,
                          splits: Sequence[str] = ("val", "test"), batch_size: int = 8,
                          max_length: int = 2048, max_response_length: int = 1024,
                          bucket_lengths: Sequence[int] = (512, 1024, 2048),
                          system_template: str = "", tokenizer: str = "",
                          mesh_axes: Mapping[str, int] | None = None
                          ) -> dict[str, Any]:
  """Accuracy and margin of the reward model in `path` on held-out pairs.

  Args:
    path: a reward-model directory (reward_io.save).
    data_dir: the data-prep workdir holding pairs_rewrites.<split>.jsonl.
    splits: which splits to score (held-out users: val, test).
    batch_size, max_length, max_response_length, bucket_lengths: as in training.
    system_template: '' = the template saved with the reward model.
    tokenizer: '' = the tokenizer saved with the reward model.
    mesh_axes: the device mesh.

  Returns:
    {'metrics': {'<split>_<persona|no_persona>/<name>': value}, 'inputs': {tag:
    InputStats dict}, 'reward_model', 'system_template', 'trained_with_persona'}.
  """
  import jax  # pylint: disable=g-import-not-at-top  (heavy)
  from rlhi import inputs  # pylint: disable=g-import-not-at-top
  from rlhi import sharding  # pylint: disable=g-import-not-at-top
  from rlhi.models import reward_io  # pylint: disable=g-import-not-at-top
  from rlhi.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from rlhi.train import loop  # pylint: disable=g-import-not-at-top
  from rlhi.train import objectives  # pylint: disable=g-import-not-at-top
  from rlhi.train import step as step_lib  # pylint: disable=g-import-not-at-top

  if not path:
    raise ValueError("config.reward_eval.path is empty: set it to a reward-model "
                     "directory (e.g. <train_reward workdir>/reward_model)")
  meta = reward_io.load_metadata(path)
  template = system_template or meta["system_template"]
  fmt = tok_lib.ChatFormatter(tok_lib.load_tokenizer(tokenizer or path), template)
  mesh = sharding.make_mesh(dict(mesh_axes or {"fsdp": -1}))
  config, params = reward_io.load(path, mesh)
  eval_step = jax.jit(step_lib.make_eval_step(objectives.reward_loss(config)))

  sets, input_stats = inputs.pair_sets(
      fmt, data_dir, [(files.PAIRS, s, p) for s in splits for p in (True, False)],
      max_length=max_length, max_response_length=max_response_length)
  with sharding.use_mesh(mesh):
    metrics = loop.evaluate_held_out(eval_step, params, sets, batch_size=batch_size,
                                     pad_id=fmt.pad_id, bucket_lengths=bucket_lengths,
                                     post=objectives.with_reward_std)
  return {"metrics": metrics,
          "inputs": loop.input_stats_by_tag(input_stats),
          "max_length": max_length, "max_response_length": max_response_length,
          "reward_model": path if fileio.is_remote(path) else os.path.abspath(path),
          "system_template": template,
          "trained_with_persona": meta.get("with_persona")}


def markdown(result: Mapping[str, Any], splits: Sequence[str]) -> str:
  from rlhi.train import loop  # pylint: disable=g-import-not-at-top
  rows = loop.held_out_rows(result["metrics"], splits,
                            [("accuracy", ".3f"), ("margin", ".3f"), ("loss", ".4f")],
                            input_stats=result["inputs"], accuracy="accuracy")
  trained = result.get("trained_with_persona")
  return "\n".join([
      "# Reward model evaluation", "",
      (f"Reward model: `{result['reward_model']}` (trained "
       f"{'with' if trained else 'without' if trained is not None else 'with unknown'} "
       f"persona)."), "",
      ("Held-out users' preference pairs (pairs_rewrites.<split>.jsonl; chosen = the "
       "user-guided rewrite), scored with the persona in the system slot and without it. "
       "Accuracy: share of pairs where r(chosen) > r(rejected); margin: mean "
       "r(chosen) - r(rejected)."), "",
      (f"Inputs fitted to max_length {result['max_length']} tokens (responses to "
       f"{result['max_response_length'] or result['max_length']}); truncated pairs are "
       f"scored on what fits, dropped ones not at all (counted below)."), "",
      *loop.held_out_header(["accuracy", "mean margin", "loss"], accuracy="accuracy"),
      *rows, ""])


def run_reward_eval(cfg, workdir: str) -> dict[str, Any]:
  """evaluate_reward_model with config.reward_eval (configs/eval.py); process 0 writes
  reward_eval_report.{json,md} to `workdir`. Returns the result on every process."""
  from rlhi import sharding  # pylint: disable=g-import-not-at-top
  r = cfg.reward_eval
  result = evaluate_reward_model(
      r.path, cfg.data.dir, splits=tuple(r.splits), batch_size=r.batch_size,
      max_length=r.max_length, max_response_length=r.max_response_length,
      bucket_lengths=tuple(r.bucket_lengths), system_template=r.system_template,
      tokenizer=r.tokenizer, mesh_axes=dict(cfg.mesh))
  if sharding.is_main_process():
    fileio.makedirs(workdir)
    reports.write_report(workdir, REPORT_NAME, result, markdown(result, r.splits))
  return result
