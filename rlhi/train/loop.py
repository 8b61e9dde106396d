"""The training loop shared by SFT, the reward model and DPO.

An objective (experiments/train_*.py) describes itself as a `Task`: its pure loss, its
parameters (abstract with logical axis names, and how to make them), its tokenized
training examples and its evaluators. `train` does the rest, in this order:

  mesh and rules -> optimizer -> state shardings -> checkpoint restore (state and
  input position) or init -> input iterator -> jitted update step -> loop: step, log,
  evaluate, checkpoint, preemption -> final checkpoint and evaluation.

Host/device transfers are explicit: host batches become global arrays through
`sharding.global_batch`, metrics come back with one `jax.device_get` per log step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from rlhi import inputs
from rlhi import sharding
from rlhi.train import checkpoint as ckpt_lib
from rlhi.train import metrics as metrics_lib
from rlhi.train import optimizer as opt_lib
from rlhi.train import step as step_lib


class NonFiniteError(RuntimeError):
  """A step produced a non-finite loss or gradient; nothing was saved from it."""


@dataclasses.dataclass
class Task:
  name: str  # 'sft', 'reward', 'dpo': the progress bar and log names
  loss_fn: step_lib.LossFn
  abstract_params: Any  # boxed with logical axis names (nn.LogicallyPartitioned)
  init_params: Callable[[Any], Any]  # (param shardings) -> params placed on them
  train_examples: Sequence[Mapping[str, Any]]  # tokenized (rlhi.inputs)
  pad_id: int
  # (params, step) -> {name: value}; run every eval_every steps and at the end.
  evaluate: Callable[[Any, int], Mapping[str, float]] | None = None
  # Arrays the loss reads but does not train (DPO's live reference params), already
  # placed on the mesh; passed as loss_fn's fourth argument (rlhi/train/step.py).
  frozen: Any = None
  # Pairs batches carry score_positions (inputs.score_columns): the LM head runs on
  # response targets only (DPO); off, a batch has one shape less to compile per bucket.
  score_positions: bool = False


@dataclasses.dataclass
class TrainResult:
  step: int
  state: step_lib.TrainState
  preempted: bool
  final_eval: Mapping[str, float]


def train(cfg, workdir: str, task: Task, mesh: jax.sharding.Mesh | None = None
          ) -> TrainResult:
  """Trains `task` with the config's optimizer, batch, mesh and checkpoint settings.

  `mesh` defaults to `sharding.make_mesh(cfg.mesh)`; pass the one the caller already
  built when it placed arrays (e.g. `task.frozen`) before training.
  """
  # ---- Mesh --------------------------------------------------------------------------
  # Model code is traced under the mesh and rules (activation constraints); parameter
  # init and loading run outside them and place arrays through explicit shardings.
  mesh = mesh or sharding.make_mesh(dict(cfg.mesh))
  rules = sharding.rules_from_config(cfg.get("sharding_rules", ()))
  return _train(cfg, workdir, task, mesh, rules)


@dataclasses.dataclass
class UpdateStep:
  """The optimizer, state layout and jitted update step that `train` runs."""
  optimizer: Any
  schedule: Callable[[int], Any]
  abstract_state: Any  # boxed with logical axis names
  state_shardings: Any
  jitted: Callable  # (state, batch[, frozen]) -> (state, metrics), state donated


def update_step(cfg, loss_fn: step_lib.LossFn, abstract_params: Any,
                mesh: jax.sharding.Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES,
                frozen_shardings: Any = None) -> UpdateStep:
  """Builds what `train` compiles; rlhi/aot compiles the same for a TPU topology.

  `frozen_shardings` are those of Task.frozen (None when the task has none).
  """
  optimizer, schedule = opt_lib.make_optimizer(cfg.optimizer, int(cfg.total_steps))
  abstract_state = jax.eval_shape(
      lambda: step_lib.init_state(abstract_params, optimizer, cfg.seed))
  state_shardings = sharding.logical_shardings(abstract_state, mesh, rules)
  update = step_lib.make_train_step(loss_fn, optimizer, cfg.accum_steps)
  if frozen_shardings is None:
    jitted = jax.jit(update, in_shardings=(state_shardings, None),
                     out_shardings=(state_shardings, None), donate_argnums=0)
  else:
    jitted = jax.jit(update, in_shardings=(state_shardings, None, frozen_shardings),
                     out_shardings=(state_shardings, None), donate_argnums=0)
  return UpdateStep(optimizer, schedule, abstract_state, state_shardings, jitted)


def _train(cfg, workdir, task, mesh, rules) -> TrainResult:
  total = int(cfg.total_steps)
  # ---- Optimizer and state shardings ---------------------------------------------------
  frozen_shardings = (None if task.frozen is None else
                      jax.tree.map(lambda x: x.sharding, task.frozen))
  built = update_step(cfg, task.loss_fn, task.abstract_params, mesh, rules,
                      frozen_shardings)
  optimizer, schedule = built.optimizer, built.schedule
  abstract_state, state_shardings = built.abstract_state, built.state_shardings

  # ---- Checkpoint restore, or init -----------------------------------------------------
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               keep=cfg.checkpoint.keep,
                               keep_every=cfg.checkpoint.keep_every,
                               use_async=cfg.checkpoint.use_async)
  restored = ckpt.restore(ckpt_lib.abstract_like(sharding.strip_boxes(abstract_state),
                                                 state_shardings))
  if restored is None:
    params = task.init_params(state_shardings.params)
    state = jax.jit(lambda p: step_lib.init_state(p, optimizer, cfg.seed),
                    out_shardings=state_shardings)(params)
    start, data_state = 0, None
  else:
    start, state, data_state = restored
    logging.info("resumed %s from step %d", task.name, start)

  # ---- Input pipeline ----------------------------------------------------------------
  n_proc, proc = jax.process_count(), jax.process_index()
  if cfg.batch_size % n_proc:
    raise ValueError(f"config.batch_size={cfg.batch_size} must be divisible by the "
                     f"{n_proc} processes")
  batches = inputs.make_iterator(
      task.train_examples, per_host_batch_size=cfg.batch_size // n_proc,
      pad_id=task.pad_id, bucket_lengths=tuple(cfg.data.bucket_lengths),
      seed=cfg.seed, shuffle=True, num_epochs=None, process_index=proc,
      process_count=n_proc, packing=bool(cfg.data.get("packing", False)),
      row_multiple=sharding.row_multiple(mesh, cfg.accum_steps, rules),
      score_positions=task.score_positions)
  if data_state:
    batches.set_state(data_state)

  # ---- Update step -------------------------------------------------------------------
  if task.frozen is None:
    train_step = built.jitted
  else:
    train_step = lambda state, batch: built.jitted(state, batch, task.frozen)

  # ---- Loop --------------------------------------------------------------------------
  writer = metrics_lib.MetricWriter(workdir, total, initial_step=start, desc=task.name)
  preempt = ckpt_lib.SigtermFlag()
  pending = None  # (step, metrics) of the previous step, checked one step late
  tokens, t0 = 0, time.perf_counter()
  step = saved = start
  preempted = False
  stack = contextlib.ExitStack()
  try:
    stack.enter_context(sharding.use_mesh(mesh, rules))
    while step < total:
      host_batch = next(batches)
      tokens += _count_tokens(host_batch)
      state, metrics = train_step(state, sharding.global_batch(host_batch, mesh, rules))
      step += 1
      if pending is not None:
        _check_finite(*pending)
      pending = (step, metrics)
      writer.advance()

      if step % cfg.log_every == 0 or step == total:
        _check_finite(*pending)
        dt = time.perf_counter() - t0
        writer.write(step, {**metrics, "learning_rate": schedule(step - 1),
                            "tokens_per_s": tokens * n_proc / max(dt, 1e-9)})
        tokens, t0 = 0, time.perf_counter()
      if task.evaluate and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
        writer.write(step, task.evaluate(state.params, step), prefix="eval")
      if step % cfg.checkpoint.every == 0 or step == total:
        _check_finite(*pending)  # never checkpoint the state of a failed step
        ckpt.save(step, state, batches.get_state(), force=step == total)
        saved = step
      if preempt.requested or ckpt.reached_preemption(step):
        _check_finite(*pending)
        if saved != step:
          ckpt.save(step, state, batches.get_state(), force=True)
        ckpt.wait()
        logging.warning("preempted: saved step %d; re-run the same command to resume",
                        step)
        preempted = True
        break
    if pending is not None:
      _check_finite(*pending)
    final_eval = {}
    if task.evaluate and not preempted:
      final_eval = dict(task.evaluate(state.params, step))
      writer.write(step, final_eval, prefix="eval")
  finally:
    stack.close()
    ckpt.close()
    writer.close()
    preempt.restore_handler()
  return TrainResult(step, state, preempted, final_eval)


def _check_finite(step: int, metrics: Mapping[str, Any]) -> None:
  if int(jax.device_get(metrics["finite"])) == 0:
    loss = float(jax.device_get(metrics["loss"]))
    raise NonFiniteError(
        f"step {step}: non-finite loss ({loss}) or gradient norm; the step was not "
        f"applied and nothing after the last checkpoint was saved. Lower "
        f"config.optimizer.lr, set config.optimizer.clip_norm, or check the data.")


def _count_tokens(batch: Mapping[str, np.ndarray]) -> int:
  return int(sum(np.count_nonzero(v) for k, v in batch.items()
                 if k.endswith("segment_ids")))


def evaluate_examples(eval_step: Callable, params: Any,
                      examples: Sequence[Mapping[str, Any]], *, batch_size: int,
                      pad_id: int, bucket_lengths: Sequence[int], frozen: Any = None,
                      score_positions: bool = False) -> dict[str, float]:
  """Means of `eval_step`'s metrics (step.Metric: sum, count) over every example, once.

  `eval_step` is jitted by the caller (rlhi.train.step.make_eval_step). Runs inside
  the mesh of `train`; the last batch is padded with rows marked invalid. `frozen` is
  passed on to the loss (see Task.frozen); `score_positions` as in Task.
  """
  totals = None
  for batch, _ in inputs.host_batches(examples, batch_size=batch_size, pad_id=pad_id,
                                      bucket_lengths=bucket_lengths,
                                      score_positions=score_positions):
    extra = () if frozen is None else (frozen,)
    sums = eval_step(params, batch, jax.random.PRNGKey(0), *extra)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  if totals is None:
    return {}
  totals = jax.device_get(totals)
  out = {name: float(m.sum) / max(float(m.count), 1e-9) for name, m in totals.items()}
  out["count"] = float(totals["loss"].count)
  return out


def persona_tag(split: str, with_persona: bool) -> str:
  """'val_persona' / 'val_no_persona': the metric prefix of a held-out set."""
  return f"{split}_{'persona' if with_persona else 'no_persona'}"


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion (95% by default).

  Unlike the normal approximation it stays inside [0, 1] and is honest at the small n
  of held-out pair sets (8 pairs at 100% accuracy: [0.68, 1.00]).
  """
  if n <= 0:
    return float("nan"), float("nan")
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return max(0.0, centre - half), min(1.0, centre + half)


def held_out_header(columns: Sequence[str], *, accuracy: str = "",
                    with_inputs: bool = True) -> list[str]:
  """The header lines of `held_out_rows`' table, for `columns` (display names)."""
  names = ["split", "input", "pairs", *columns]
  if accuracy:
    names.insert(4, "95% CI (Wilson)")
  if with_inputs:
    names += ["truncated", "dropped"]
  return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def held_out_rows(metrics: Mapping[str, float], splits: Sequence[str],
                  columns: Sequence[tuple[str, str]], *,
                  input_stats: Mapping[str, Mapping[str, Any]] | None = None,
                  accuracy: str = "") -> list[str]:
  """Markdown rows '| split | persona | count | values | truncated | dropped |' of
  `evaluate_held_out`'s metrics, one per held-out set that was read; `columns` are
  (metric, format spec), e.g. ('accuracy', '.3f'). `accuracy` names the column (the
  first of `columns`) that gets a Wilson interval next to it; `input_stats`
  ({persona_tag: InputStats.to_dict()}, see `input_stats_by_tag`) gives the truncated
  and dropped counts, dropped by reason, so that every pair of a set is accounted for."""
  rows = []
  for split in splits:
    for with_persona in (True, False):
      tag = persona_tag(split, with_persona)
      st = (input_stats or {}).get(tag)
      n = int(metrics.get(f"{tag}/count", 0))
      if not n and st is None:
        continue
      values = [format(metrics[f"{tag}/{k}"], spec) if n else "n/a"
                for k, spec in columns]
      if accuracy:
        lo, hi = wilson_interval(metrics[f"{tag}/{accuracy}"] * n, n) if n else (0, 0)
        values.insert(1, f"[{lo:.2f}, {hi:.2f}]" if n else "n/a")
      if input_stats is not None:
        dropped = (", ".join(f"{k} {v}" for k, v in sorted(st["dropped"].items()))
                   or "0") if st else "?"
        values += [str(st["truncated"]) if st else "?", dropped]
      rows.append(f"| {split} | {'persona' if with_persona else 'no persona'} | {n} | "
                  + " | ".join(values) + " |")
  return rows


def input_stats_by_tag(input_stats: Mapping[tuple[str, bool], Any]
                       ) -> dict[str, dict[str, Any]]:
  """{(split, with_persona): InputStats} (inputs.pair_sets) -> {persona_tag: dict}."""
  return {persona_tag(*k): st.to_dict() for k, st in input_stats.items()}


def inputs_line(input_stats: Mapping[str, Mapping[str, Any]], train_tag: str, *,
                max_length: int, max_response_length: int | None) -> str:
  """One sentence on how pairs were fitted to the model's input, for the reports;
  `input_stats` as for `held_out_rows`, `train_tag` the training set's key."""
  st = input_stats[train_tag]
  dropped = ", ".join(f"{k} {v}" for k, v in sorted(st["dropped"].items())) or "none"
  return (f"Inputs fitted to max_length {max_length} tokens (responses to "
          f"{max_response_length or max_length}): older context turns go first, then "
          f"responses are cut; a pair whose last user turn cannot fit is dropped "
          f"(counted). Train pairs: {st['examples']} read, {st['kept']} used "
          f"({st['truncated']} truncated), dropped: {dropped}.")


def evaluate_held_out(eval_step: Callable, params: Any,
                      sets: Mapping[tuple[str, bool], Sequence[Mapping[str, Any]]], *,
                      batch_size: int, pad_id: int, bucket_lengths: Sequence[int],
                      frozen: Any = None,
                      post: Callable[[dict[str, float]], dict[str, float]] | None = None,
                      score_positions: bool = False) -> dict[str, float]:
  """`evaluate_examples` on held-out sets keyed (split, with_persona), as one dict
  {'<split>_<persona|no_persona>/<metric>': value}; an empty set gets count 0 only.
  `post` maps each set's metrics (e.g. objectives.with_reward_std)."""
  out = {}
  for (split, with_persona), examples in sets.items():
    tag = persona_tag(split, with_persona)
    if not len(examples):  # pylint: disable=g-explicit-length-test  (may be a Dataset)
      out[f"{tag}/count"] = 0.0
      continue
    m = evaluate_examples(eval_step, params, examples, batch_size=batch_size,
                          pad_id=pad_id, bucket_lengths=bucket_lengths, frozen=frozen,
                          score_positions=score_positions)
    out.update({f"{tag}/{k}": v for k, v in (post(m) if post else m).items()})
  return out
