"""Follow-up likelihood as a reward (FLR-style): how likely a language model finds a
positive rather than a negative user reply after an answer.

    scorer = FollowUpScorer.from_generator(gen, positive=("Thanks, that's exactly what
                                           I needed.",), negative=("That's not what I
                                           asked for.",))
    scorer.score([scorer_lib.Row(context, persona, answers=(a, b))])
    # -> [(r(a), r(b))], or the reason a row could not be scored

r(answer) = mean_i [log p(positive_i | conversation, answer)
                    - log p(negative_i | conversation, answer)],
summed over the tokens of each follow-up's user turn (through its end-of-turn token),
under the model's own chat template; positive_i and negative_i are paired, so the
tokens they share (the user header, a common first word) cancel exactly. The reward
needs no reward model and no labels: it is the baseline of Zhang et al. 2024 ("Aligning
language models using follow-up likelihood as reward signal"), which the RLHI paper
compares against. Same interface as rlhi.models.scorer.Scorer, so user_rewards uses
either.

Each (conversation + answer, positive_i, negative_i) is one preference-pair example
scored by the DPO reference pass (rlhi/train/reference.py `compute`, packed: the
shared prefix once for both follow-ups), so the log-probs are the ones DPO uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rlhi.models import llama
from rlhi.models import scorer as scorer_lib
from rlhi.train import reference


class FollowUpScorer:
  """A causal LM's preference for positive over negative follow-ups, per answer.

  Args:
    params, config, fmt, mesh: the model (e.g. a ChatGenerator's), its ChatFormatter
      (its system template puts the persona in) and device mesh.
    positive, negative: follow-up texts, paired in order (equal, non-zero counts).
    with_persona: the persona in the system slot (the model sees the user's persona).
    batch_size, max_length, bucket_lengths: scoring batches (global) and the longest
      conversation + answer + paired follow-ups scored (packed: the conversation and
      answer once); a longer one is reported, not cut.
    settings: the config section these come from, named in failure reasons.
  """

  def __init__(self, params: Any, config: llama.LlamaConfig, fmt, *,
               mesh: jax.sharding.Mesh, positive: Sequence[str],
               negative: Sequence[str], with_persona: bool = True, batch_size: int = 8,
               max_length: int = 2048, bucket_lengths: Sequence[int] = (2048,),
               settings: str = "config"):
    if not positive or len(positive) != len(negative):
      raise ValueError(f"{settings}: follow-ups are paired: {len(positive)} positive "
                       f"and {len(negative)} negative; give the same non-zero number")
    self.params, self.config, self.fmt, self.mesh = params, config, fmt, mesh
    self.pairs = list(zip(positive, negative))
    self.with_persona = with_persona
    self.batch_size = batch_size
    self.max_length = max_length
    buckets = tuple(b for b in bucket_lengths if b < max_length)
    self.bucket_lengths = buckets + (max_length,)
    self.settings = settings

  @classmethod
  def from_generator(cls, gen, **kwargs) -> "FollowUpScorer":
    """The model a `rlhi.generate.ChatGenerator` holds: no second load."""
    return cls(gen.params, gen.config, gen.fmt, mesh=gen.mesh, **kwargs)

  def score(self, rows: Sequence[scorer_lib.Row]) -> list[tuple[float, ...] | str]:
    """The reward of each answer of each row, or why the row could not be scored."""
    out: list[tuple[float, ...] | str] = [""] * len(rows)
    examples, where = [], []
    for k, row in enumerate(rows):
      persona = row.persona if self.with_persona else None
      context = [m.to_chat() for m in row.context]
      row_examples = []
      for answer in row.answers:
        for pos, neg in self.pairs:
          prompt, (chosen, rejected) = self.fmt.encode_follow_ups(
              context, answer, (pos, neg), persona=persona)
          row_examples.append({"prompt_ids": prompt, "chosen_ids": chosen,
                               "rejected_ids": rejected})
      # Packed: the shared prefix once, then both follow-ups.
      longest = max(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                    for e in row_examples)
      if longest > self.max_length:
        out[k] = (f"conversation + answer + two follow-ups is {longest} tokens, over "
                  f"max_length {self.max_length} ({self.settings}.max_length)")
        continue
      examples += row_examples
      where.append((k, len(row.answers)))
    if not examples:
      return out
    chosen, rejected = reference.compute(
        self.params, self.config, examples, mesh=self.mesh,
        batch_size=self.batch_size, pad_id=self.fmt.pad_id,
        bucket_lengths=self.bucket_lengths, packing=True)
    gaps = (np.asarray(chosen, np.float64) - rejected).reshape(-1, len(self.pairs))
    rewards = gaps.mean(axis=1)
    start = 0
    for k, n in where:
      out[k] = tuple(float(r) for r in rewards[start:start + n])
      start += n
    return out
