"""Reward-model scoring: answers to a user's conversation, by a saved reward model.

    scorer = Scorer("<train_reward workdir>/reward_model", with_persona=True)
    scorer.score([Row(context=item.context, persona=item.persona,
                      answers=("first answer", "second answer"))])
    # -> [(score of the first, score of the second)], or for a row that cannot fit
    #    max_length, the reason (a string), never a guess

A row's answers (one or two) are scored after the same context, fitted to max_length
as a preference pair is in training (rlhi.inputs.tokenize_pair: both answers after the
same, possibly truncated, context), so two answers are compared on equal terms. The
persona goes into the system slot through the template the reward model was trained
with (reward_io metadata) unless `with_persona` is False (the no-persona ablation).
Rows are scored in one ordered pass of global batches (rlhi.inputs.host_batches) by a
program jitted once; every process must call `score` with the same rows (the model is
sharded over all devices) and gets every score.

Used by the reward-model judge of UserEval (rlhi/eval/judges.py) and by user-based
rewards (rlhi/train/user_rewards.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from rlhi import fileio
from rlhi import inputs
from rlhi import sharding
from rlhi.data import schema
from rlhi.models import reward
from rlhi.models import reward_io
from rlhi.models import tokenizer as tok_lib


@dataclasses.dataclass(frozen=True)
class Row:
  """Answers to one conversation, for one user."""
  context: tuple[schema.Message, ...]  # the conversation, ending with the user message
  persona: str | None  # Persona.to_text(), or None
  answers: tuple[str, ...]  # one or two, fitted after the same context


class Scorer:
  """A reward model loaded with rlhi.models.reward_io, scoring `Row`s.

  Args:
    path: a reward-model directory (reward_io.save; train_reward exports
      <workdir>/reward_model).
    tokenizer: '' = the one saved in `path`.
    system_template: '' = the template saved with the reward model (what it was
      trained with).
    with_persona: put the persona in the system slot (False: the no-persona ablation).
    batch_size, max_length, max_response_length, bucket_lengths: scoring batches
      (global batch size, over all processes) and how a row is fitted.
    mesh_axes: the device mesh.
    settings: the config section these come from, named in failure reasons.
  """

  def __init__(self, path: str, *, tokenizer: str = "", system_template: str = "",
               with_persona: bool = True, batch_size: int = 8, max_length: int = 2048,
               max_response_length: int = 1024,
               bucket_lengths: Sequence[int] = (512, 1024, 2048),
               mesh_axes: Mapping[str, int] | None = None, settings: str = "config"):
    if not path:
      raise ValueError("Scorer: no reward-model path: give a directory written by "
                       "rlhi.models.reward_io.save (e.g. <train_reward "
                       "workdir>/reward_model)")
    self.path = path if fileio.is_remote(path) else os.path.abspath(path)
    meta = reward_io.load_metadata(path)
    self.system_template = system_template or meta["system_template"]
    self.with_persona = with_persona
    self.batch_size = batch_size
    self.max_length = max_length
    self.max_response_length = max_response_length
    self.bucket_lengths = tuple(bucket_lengths)
    self.settings = settings
    self.mesh = sharding.make_mesh(dict(mesh_axes or {"fsdp": -1}))
    self.config, self.params = reward_io.load(path, self.mesh)
    self.fmt = tok_lib.ChatFormatter(tok_lib.load_tokenizer(tokenizer or path),
                                     self.system_template)
    config = self.config
    self._score = jax.jit(lambda p, b: reward.scores(p, config, b["tokens"],
                                                     b["positions"], b["segment_ids"]))

  def score(self, rows: Sequence[Row]) -> list[tuple[float, ...] | str]:
    """The score of each answer of each row, or why the row could not be scored."""
    out: list[tuple[float, ...] | str] = [""] * len(rows)
    examples, where = [], []
    for k, row in enumerate(rows):
      if len(row.answers) not in (1, 2):
        raise ValueError(f"Scorer.score: row {k} has {len(row.answers)} answers; a row "
                         f"holds one or two (scored after the same context)")
      first, second = row.answers[0], row.answers[-1]
      t = inputs.tokenize_pair(self.fmt, schema.PreferencePair(
          pair_id="", user_id="", split="test", prompt=tuple(row.context),
          chosen=first, rejected=second, persona=row.persona, source="scorer"),
          with_persona=self.with_persona, max_length=self.max_length,
          max_response_length=self.max_response_length)
      if t.example is None:
        out[k] = (f"reward model input {t.truncation.dropped}: the context does not fit "
                  f"max_length {self.max_length} ({self.settings}.max_length)")
        continue
      prompt = t.example["prompt_ids"]
      sides = ("chosen_ids", "rejected_ids")[:len(row.answers)]
      for side in sides:
        tokens = np.concatenate([prompt, t.example[side]])
        examples.append({"tokens": tokens, "loss_mask": np.zeros_like(tokens)})
      where.append((k, len(sides)))
    if not examples:
      return out
    scores, valid = [], []
    with sharding.use_mesh(self.mesh):
      for batch, _ in inputs.host_batches(examples, batch_size=self.batch_size,
                                          pad_id=self.fmt.pad_id,
                                          bucket_lengths=self.bucket_lengths,
                                          mesh=self.mesh):
        scores.append(sharding.to_host(self._score(self.params, batch)))
        valid.append(sharding.to_host(batch["valid"]))
    flat = np.concatenate(scores)[np.concatenate(valid).astype(bool)]
    if len(flat) != len(examples):
      raise RuntimeError(f"reward-model scorer: {len(flat)} scores for {len(examples)} "
                         f"inputs")
    start = 0
    for k, n in where:
      out[k] = tuple(float(s) for s in flat[start:start + n])
      start += n
    return out
