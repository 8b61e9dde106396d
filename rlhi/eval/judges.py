"""UserEval judges: an LLM through the inference client, or the reward model offline.

Both judge a list of `Pair`s (an item and the two systems' answers) in both orders:
order 'ab' shows system A's answer as "Response A", order 'ba' shows system B's answer
there. A judgement record says which *system* won each dimension:

    {"item_id", "turn_type", "order": "ab" | "ba", "shown_first": "a" | "b",
     "winners": {dimension: "a" | "b" | "tie"} or None, "error": None or the reason,
     ...judge-specific fields: "choices" and "rationale" (llm), "scores" (reward_model)}

LLM judge: prompt rlhi/eval/prompts/judge.txt, a JSON object with "A", "B" or "tie" for
each dimension; an answer that does not parse or misses a dimension is re-asked once
(rlhi.data.prompting.ask_json), then recorded as a failure with both reasons, never
guessed. Requests go through the client's SQLite cache, so a re-run asks nothing twice.

Reward-model judge: scores each answer with the persona in the system slot (the
template the RM was trained with), the two answers of a pair after the same (possibly
truncated) context; the higher score wins, equal scores tie. It judges
'overall' only. Its scores do not depend on the order, so each pair is judged once
(order 'any', rlhi.eval.stats.ANY_ORDER).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from rlhi import fileio
from rlhi.data import client as client_lib
from rlhi.data import prompting
from rlhi.eval import items as items_lib
from rlhi.eval import stats

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
DIMENSION_DESCRIPTIONS = {
    "personalization": "which response better fits this particular user: their "
                       "preferences, expertise, style and dislikes from the persona",
    "instruction_following": "which response better does what the last user message "
                             "asks, within the conversation, correctly and completely",
    "overall": "which response this user would prefer overall",
}
RM_DIMENSIONS = ("overall",)
_CHOICES = {"a": "A", "b": "B", "tie": "tie"}


@dataclasses.dataclass(frozen=True)
class Pair:
  item: items_lib.EvalItem
  answer_a: str
  answer_b: str

  def shown(self, order: str) -> tuple[str, str]:
    return (self.answer_a, self.answer_b) if order == "ab" else (self.answer_b,
                                                                 self.answer_a)


def judgement_key(item_id: str, order: str) -> str:
  return f"usereval/{item_id}/{order}"


def _clip(text: str, limit: int) -> str:
  if limit and len(text) > limit:
    return text[:limit] + f"\n[... {len(text) - limit} characters cut]"
  return text


def render_prompt(pair: Pair, order: str, *, dimensions: Sequence[str],
                  max_context_messages: int = 0, max_chars_per_message: int = 0,
                  max_answer_chars: int = 0) -> str:
  """The judge's prompt for one pair in one order."""
  context = pair.item.chat()
  omitted = 0
  if max_context_messages and len(context) > max_context_messages:
    omitted = len(context) - max_context_messages
    context = context[omitted:]
  context = [dict(m, content=_clip(m["content"], max_chars_per_message)) for m in context]
  first, second = pair.shown(order)
  return prompting.render(
      "judge", PROMPTS_DIR, persona=pair.item.persona, context=context, omitted=omitted,
      response_a=_clip(first, max_answer_chars), response_b=_clip(second,
                                                                  max_answer_chars),
      dimensions={d: DIMENSION_DESCRIPTIONS[d] for d in dimensions})


def parse_choices(obj: Mapping[str, Any], dimensions: Sequence[str]) -> dict[str, Any]:
  """The judge's JSON object -> {'choices': {dim: 'A'|'B'|'tie'}, 'rationale'}.

  Raises ValueError naming the field when a dimension is missing or is not one of
  A / B / tie (case and surrounding spaces are ignored; nothing else is interpreted).
  """
  choices = {}
  for d in dimensions:
    if d not in obj:
      raise ValueError(f"missing field '{d}'")
    value = obj[d]
    norm = value.strip().lower() if isinstance(value, str) else None
    if norm not in _CHOICES:
      raise ValueError(f"field '{d}': expected \"A\", \"B\" or \"tie\", got "
                       f"{str(value)[:40]!r}")
    choices[d] = _CHOICES[norm]
  rationale = obj.get("rationale", "")
  if not isinstance(rationale, str):
    rationale = ""
  return {"choices": choices, "rationale": rationale}


def _winner(choice: str, order: str) -> str:
  if choice == "tie":
    return "tie"
  first, second = ("a", "b") if order == "ab" else ("b", "a")
  return first if choice == "A" else second


def _record(pair: Pair, order: str, **fields: Any) -> dict[str, Any]:
  return {"item_id": pair.item.item_id, "turn_type": pair.item.turn_type,
          "order": order, "shown_first": order[0] if order in stats.ORDERS else None,
          **fields}


def judge_llm(client: client_lib.InferenceClient, pairs: Sequence[Pair], *,
              dimensions: Sequence[str] = stats.DIMENSIONS, max_tokens: int = 512,
              temperature: float = 0.0, max_context_messages: int = 0,
              max_chars_per_message: int = 0, max_answer_chars: int = 0
              ) -> list[dict[str, Any]]:
  """Both orders of every pair through the LLM; one record per (pair, order)."""
  unknown = [d for d in dimensions if d not in DIMENSION_DESCRIPTIONS]
  if unknown:
    raise ValueError(f"judge: unknown dimension(s) {unknown}; known: "
                     f"{list(DIMENSION_DESCRIPTIONS)}")
  jobs = [(p, o) for p in pairs for o in stats.ORDERS]
  requests = [prompting.JsonItem(
      key=judgement_key(p.item.item_id, o),
      prompt=render_prompt(p, o, dimensions=dimensions,
                           max_context_messages=max_context_messages,
                           max_chars_per_message=max_chars_per_message,
                           max_answer_chars=max_answer_chars)) for p, o in jobs]
  schema = prompting.object_schema(
      {**{d: {"type": "string", "enum": ["A", "B", "tie"]} for d in dimensions},
       "rationale": prompting.STRING})
  done, failed = prompting.ask_json(
      client, requests, lambda obj: parse_choices(obj, dimensions), desc="usereval judge",
      schema=schema, max_tokens=max_tokens, temperature=temperature)
  out = []
  for (pair, order), req in zip(jobs, requests):
    if req.key in done:
      got = done[req.key]
      winners = {d: _winner(c, order) for d, c in got["choices"].items()}
      out.append(_record(pair, order, choices=got["choices"], winners=winners,
                         rationale=got["rationale"], error=None))
    else:
      out.append(_record(pair, order, choices=None, winners=None, rationale="",
                         error=str(failed[req.key]),
                         answers=list(prompting.answers_of(failed[req.key]))))
  return out


# ----------------------------------------------------------------------------------------
# Reward-model judge (jax is imported here only).
# ----------------------------------------------------------------------------------------


class RewardModelJudge:
  """A reward model loaded with rlhi.models.reward_io, scoring (persona, context, answer).

  Args:
    path: a reward-model directory (reward_io.save; train_reward exports
      <workdir>/reward_model).
    tokenizer: '' = the one saved in `path`.
    system_template: '' = the template saved with the RM (what it was trained with).
    persona: put the persona in the system slot (False: the no-persona ablation).
    batch_size, max_length, max_response_length, bucket_lengths: scoring batches;
      each pair is fitted to max_length like a training pair (rlhi.inputs: both
      answers after the same context), and a pair that cannot fit is a failure,
      never a guess.
    mesh_axes: the device mesh.
  """

  dimensions = RM_DIMENSIONS

  def __init__(self, path: str, *, tokenizer: str = "", system_template: str = "",
               persona: bool = True, batch_size: int = 8, max_length: int = 2048,
               max_response_length: int = 1024,
               bucket_lengths: Sequence[int] = (512, 1024, 2048),
               mesh_axes: Mapping[str, int] | None = None):
    import jax  # pylint: disable=g-import-not-at-top  (heavy; only this judge needs it)
    from rlhi import sharding  # pylint: disable=g-import-not-at-top
    from rlhi.models import reward  # pylint: disable=g-import-not-at-top
    from rlhi.models import reward_io  # pylint: disable=g-import-not-at-top
    from rlhi.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    if not path:
      raise ValueError("judge.kind='reward_model' needs config.judge.reward_model.path: "
                       "a directory written by rlhi.models.reward_io.save (e.g. "
                       "<train_reward workdir>/reward_model)")
    self.path = path if fileio.is_remote(path) else os.path.abspath(path)
    meta = reward_io.load_metadata(path)
    self.system_template = system_template or meta["system_template"]
    self.persona = persona
    self.batch_size = batch_size
    self.max_length = max_length
    self.max_response_length = max_response_length
    self.bucket_lengths = tuple(bucket_lengths)
    self.mesh = sharding.make_mesh(dict(mesh_axes or {"fsdp": -1}))
    self.config, self.params = reward_io.load(path, self.mesh)
    self.fmt = tok_lib.ChatFormatter(tok_lib.load_tokenizer(tokenizer or path),
                                     self.system_template)
    config = self.config
    self._score = jax.jit(lambda p, b: reward.scores(p, config, b["tokens"],
                                                     b["positions"], b["segment_ids"]))
    self.name = f"reward model {self.path}"

  def score_pairs(self, pairs: Sequence[Pair]) -> list[tuple[float, float] | str]:
    """(score of A's answer, score of B's) per pair, or the reason it could not be.

    Each pair is tokenized as a preference pair (rlhi.inputs.tokenize_pair), so both
    answers are scored after the same context, fitted to max_length as in training.
    """
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from rlhi import inputs  # pylint: disable=g-import-not-at-top
    from rlhi import sharding  # pylint: disable=g-import-not-at-top
    from rlhi.data import schema  # pylint: disable=g-import-not-at-top
    out: list[tuple[float, float] | str] = [""] * len(pairs)
    examples, where = [], []
    for k, pair in enumerate(pairs):
      item = pair.item
      t = inputs.tokenize_pair(self.fmt, schema.PreferencePair(
          pair_id=item.item_id, user_id=item.user_id, split="test", prompt=item.context,
          chosen=pair.answer_a, rejected=pair.answer_b, persona=item.persona,
          source="usereval"), with_persona=self.persona, max_length=self.max_length,
          max_response_length=self.max_response_length)
      if t.example is None:
        out[k] = (f"reward model input {t.truncation.dropped}: the context does not fit "
                  f"max_length {self.max_length} (config.judge.reward_model.max_length)")
        continue
      prompt = t.example["prompt_ids"]
      for side in ("chosen_ids", "rejected_ids"):
        tokens = np.concatenate([prompt, t.example[side]])
        examples.append({"tokens": tokens, "loss_mask": np.zeros_like(tokens)})
      where.append(k)
    if not examples:
      return out
    n_proc = jax.process_count()
    batches = inputs.make_batches(
        examples, per_host_batch_size=max(1, self.batch_size // n_proc),
        pad_id=self.fmt.pad_id, bucket_lengths=self.bucket_lengths, shuffle=False,
        num_epochs=1, drop_remainder=False, process_index=jax.process_index(),
        process_count=n_proc)
    scores, valid = [], []
    with sharding.use_mesh(self.mesh):
      for host_batch in batches:
        batch = sharding.global_batch(host_batch, self.mesh)
        scores.append(sharding.to_host(self._score(self.params, batch)))
        valid.append(sharding.to_host(batch["valid"]))
    flat = np.concatenate(scores)[np.concatenate(valid).astype(bool)]
    if len(flat) != len(examples):
      raise RuntimeError(f"reward-model judge: {len(flat)} scores for {len(examples)} "
                         f"inputs")
    for j, k in enumerate(where):
      out[k] = (float(flat[2 * j]), float(flat[2 * j + 1]))
    return out

  def judge(self, pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    """One record per pair, order 'any': the scores do not depend on the order."""
    out = []
    for pair, scores in zip(pairs, self.score_pairs(pairs)):
      if isinstance(scores, str):
        out.append(_record(pair, stats.ANY_ORDER, scores=None, winners=None,
                           error=scores))
        continue
      sa, sb = scores
      winner = "b" if sb > sa else "a" if sa > sb else "tie"
      out.append(_record(pair, stats.ANY_ORDER, scores={"a": sa, "b": sb},
                         winners={"overall": winner}, error=None))
    return out
