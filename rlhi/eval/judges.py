"""UserEval judges behind one interface: an LLM through the inference client, the
reward model offline, or (simulated users only) the ground truth.

    judge = judges.make_judge(cfg.judge, workdir=workdir, cache_name=CACHE_FILE,
                              mesh_axes=dict(cfg.mesh))
    verdicts = judge.judge(pairs)       # judge.dimensions, judge.orders, ...

A `Judge` judges a list of `Pair`s (an item and the two systems' answers); order 'ab'
shows system A's answer as "Response A", order 'ba' shows system B's answer there. A
judgement record says which *system* won each dimension:

    {"item_id", "turn_type", "order": "ab" | "ba" | "any", "shown_first": "a" | "b" |
     None, "winners": {dimension: "a" | "b" | "tie"} or None, "error": None or the
     reason, ...judge-specific fields: "choices" and "rationale" (llm), "scores"
     (reward_model, ground_truth)}

`make_judge` builds the judge that config.judge.kind names from the table `JUDGES`
(kind -> factory of (config.judge, workdir, mesh axes, cache name)); a new judge is
one class and one entry there.

LLM judge (`LLMJudge`, kind 'llm'): prompt rlhi/eval/prompts/judge.txt, both orders of
every pair, a JSON object with "A", "B" or "tie" for each dimension; an answer that
does not parse or misses a dimension is re-asked once (rlhi.data.prompting.ask_json),
then recorded as a failure with both reasons, never guessed. Requests go through the
client's SQLite cache, so a re-run asks nothing twice. Only process 0 asks.

Reward-model judge (`RewardModelJudge`, kind 'reward_model'): scores each answer with
rlhi.models.scorer (the persona in the system slot, the template the RM was trained
with; the two answers of a pair after the same, possibly truncated, context); the
higher score wins, equal scores tie. It judges 'overall' only. Its scores do not
depend on the order, so each pair is judged once (order 'any',
rlhi.eval.stats.ANY_ORDER). Every process scores (the model is sharded over all
devices).

Ground-truth judge (`GroundTruthJudge`, kind 'ground_truth'): the simulator's truth, for
rlhi/sim experiments only. Each answer is scored with the true reward of the item's
simulated user, `SimUser.reward` (w_u . features of the answer, rlhi.sim.users), read
from the users file experiments/simulate.py writes (<workdir>/data/sim_users.jsonl);
the higher reward wins, equal rewards (within 1e-12) tie. Like the reward model it
judges 'overall' only, once per pair (order 'any'). An item whose user is not in the
file is a failure naming the user and the file, never a guess: on data that
experiments/simulate.py did not make the judge means nothing. No model: only process 0
judges.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ContextManager, Protocol

from rlhi import fileio
from rlhi.data import client as client_lib
from rlhi.data import items as items_lib
from rlhi.data import pipeline
from rlhi.data import prompting
from rlhi.eval import stats
from rlhi.sim import users as sim_users

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
DIMENSION_DESCRIPTIONS = {
    "personalization": "which response better fits this particular user: their "
                       "preferences, expertise, style and dislikes from the persona",
    "instruction_following": "which response better does what the last user message "
                             "asks, within the conversation, correctly and completely",
    "overall": "which response this user would prefer overall",
}
RM_DIMENSIONS = ("overall",)
TIE_TOLERANCE = 1e-12  # ground truth: rewards this close tie
_CHOICES = {"a": "A", "b": "B", "tie": "tie"}


@dataclasses.dataclass(frozen=True)
class Pair:
  """An item and the two systems' answers to it."""
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


def score_records(pairs: Sequence[Pair], scores: Sequence[tuple[float, float] | str],
                  tie: float = 0.0) -> list[dict[str, Any]]:
  """Records of a judge that scores each answer alone (order 'any'): the higher score
  wins 'overall', scores within `tie` tie; a string in `scores` is that pair's failure."""
  out = []
  for pair, s in zip(pairs, scores):
    if isinstance(s, str):
      out.append(_record(pair, stats.ANY_ORDER, scores=None, winners=None, error=s))
      continue
    sa, sb = s
    winner = "tie" if abs(sa - sb) <= tie else "b" if sb > sa else "a"
    out.append(_record(pair, stats.ANY_ORDER, scores={"a": sa, "b": sb},
                       winners={"overall": winner}, error=None))
  return out


class Judge(Protocol):
  """Judges pairs; what `make_judge` returns and UserEval uses."""

  kind: str  # the config.judge.kind it implements (the report's judge.kind)
  dimensions: tuple[str, ...]  # what it judges, of DIMENSION_DESCRIPTIONS
  orders: tuple[str, ...]  # the orders each pair is judged in: stats.ORDERS or ANY_ORDER
  # True: every process must call `judge` (a model sharded over all devices) and gets
  # every verdict; False: only process 0 calls it.
  collective: bool
  description: str  # one line for the report (complete once `judge` has run)
  requests: Mapping[str, int] | None  # request counts of the last `judge` (LLM)

  def judge(self, pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    """One record per (pair, order), in the order of `pairs` (see the module doc)."""
    ...


class LLMJudge:
  """An LLM through the inference client judges both orders of every pair.

  Args:
    client: an open InferenceClient; or None and `open_client`, called once per `judge`
      (a context manager: closing it writes the request cache back).
    dimensions: what to judge, of DIMENSION_DESCRIPTIONS.
    max_tokens, temperature: of each request.
    max_context_messages, max_chars_per_message, max_answer_chars: prompt caps (0: none).
  """

  kind = "llm"
  orders = stats.ORDERS
  collective = False

  def __init__(self, client: client_lib.InferenceClient | None = None, *,
               open_client: Callable[[], ContextManager[client_lib.InferenceClient]]
               | None = None, dimensions: Sequence[str] = stats.DIMENSIONS,
               max_tokens: int = 512, temperature: float = 0.0,
               max_context_messages: int = 0, max_chars_per_message: int = 0,
               max_answer_chars: int = 0):
    if (client is None) == (open_client is None):
      raise ValueError("LLMJudge: give either an open client or open_client")
    self._open = open_client or (lambda: contextlib.nullcontext(client))
    self.dimensions = tuple(dimensions)
    self.max_tokens = max_tokens
    self.temperature = temperature
    self.max_context_messages = max_context_messages
    self.max_chars_per_message = max_chars_per_message
    self.max_answer_chars = max_answer_chars
    self.description = "LLM through the inference client"
    self.requests: Mapping[str, int] | None = None

  def judge(self, pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    """Both orders of every pair through the LLM; one record per (pair, order)."""
    dimensions = self.dimensions
    unknown = [d for d in dimensions if d not in DIMENSION_DESCRIPTIONS]
    if unknown:
      raise ValueError(f"judge: unknown dimension(s) {unknown}; known: "
                       f"{list(DIMENSION_DESCRIPTIONS)}")
    jobs = [(p, o) for p in pairs for o in stats.ORDERS]
    requests = [prompting.JsonItem(
        key=judgement_key(p.item.item_id, o),
        prompt=render_prompt(p, o, dimensions=dimensions,
                             max_context_messages=self.max_context_messages,
                             max_chars_per_message=self.max_chars_per_message,
                             max_answer_chars=self.max_answer_chars)) for p, o in jobs]
    schema = prompting.object_schema(
        {**{d: {"type": "string", "enum": ["A", "B", "tie"]} for d in dimensions},
         "rationale": prompting.STRING})
    with self._open() as client:
      done, failed = prompting.ask_json(
          client, requests, lambda obj: parse_choices(obj, dimensions),
          desc="usereval judge", schema=schema, max_tokens=self.max_tokens,
          temperature=self.temperature)
      self.requests = client.stats()
      self.description = f"LLM {client.name} through the inference client"
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


class RewardModelJudge:
  """A reward model (rlhi.models.scorer) scores both answers; the higher one wins.

  Args:
    path: a reward-model directory (reward_io.save; train_reward exports
      <workdir>/reward_model).
    tokenizer: '' = the one saved in `path`.
    system_template: '' = the template saved with the RM (what it was trained with).
    with_persona: put the persona in the system slot (False: the no-persona ablation).
    batch_size, max_length, max_response_length, bucket_lengths: scoring batches;
      each pair is fitted to max_length like a training pair (rlhi.inputs: both
      answers after the same context), and a pair that cannot fit is a failure,
      never a guess.
    mesh_axes: the device mesh.
  """

  kind = "reward_model"
  dimensions = RM_DIMENSIONS
  orders = (stats.ANY_ORDER,)
  collective = True
  requests = None

  def __init__(self, path: str, *, tokenizer: str = "", system_template: str = "",
               with_persona: bool = True, batch_size: int = 8, max_length: int = 2048,
               max_response_length: int = 1024,
               bucket_lengths: Sequence[int] = (512, 1024, 2048),
               mesh_axes: Mapping[str, int] | None = None):
    # jax and the model: imported here, by the one judge that needs them.
    from rlhi.models import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
    if not path:
      raise ValueError("judge.kind='reward_model' needs config.judge.reward_model.path: "
                       "a directory written by rlhi.models.reward_io.save (e.g. "
                       "<train_reward workdir>/reward_model)")
    self._rows = lambda pairs: [scorer_lib.Row(p.item.context, p.item.persona,
                                               (p.answer_a, p.answer_b)) for p in pairs]
    self.scorer = scorer_lib.Scorer(
        path, tokenizer=tokenizer, system_template=system_template,
        with_persona=with_persona, batch_size=batch_size, max_length=max_length,
        max_response_length=max_response_length, bucket_lengths=bucket_lengths,
        mesh_axes=mesh_axes, settings="config.judge.reward_model")
    self.path = self.scorer.path
    how = "with the persona in the system slot" if with_persona else "without the persona"
    self.description = (f"reward model {self.path} (offline; scores each answer {how}; "
                        f"higher wins, equal ties; it judges only 'overall')")

  def score_pairs(self, pairs: Sequence[Pair]) -> list[tuple[float, float] | str]:
    """(score of A's answer, score of B's) per pair, or the reason it could not be."""
    return self.scorer.score(self._rows(pairs))

  def judge(self, pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    """One record per pair, order 'any': the scores do not depend on the order."""
    return score_records(pairs, self.score_pairs(pairs))


class GroundTruthJudge:
  """The simulated users' true rewards (rlhi.sim) judge: the higher reward wins.

  For rlhi/sim experiments only: the items' users must be simulated users, whose true
  reward of an answer is `SimUser.reward(answer)`.

  Args:
    users: the simulated users file (rlhi.sim.users.save_users; experiments/simulate.py
      writes <workdir>/data/sim_users.jsonl).
  """

  kind = "ground_truth"
  dimensions = RM_DIMENSIONS
  orders = (stats.ANY_ORDER,)
  collective = False
  requests = None

  def __init__(self, users: str):
    if not users:
      raise ValueError("judge.kind='ground_truth' needs "
                       "config.judge.ground_truth.users: the simulated users file "
                       "(experiments/simulate.py writes <workdir>/data/sim_users.jsonl)")
    if not fileio.exists(users):
      raise FileNotFoundError(
          f"config.judge.ground_truth.users: no file {users}; it is the simulated "
          f"users file experiments/simulate.py writes (<workdir>/data/sim_users.jsonl)")
    self.path = users
    self.users = sim_users.load_users(users)
    self.description = (f"ground truth of the {len(self.users)} simulated users in "
                        f"{users} (rlhi/sim: each answer's true reward for the item's "
                        f"user; higher wins, equal ties; it judges only 'overall')")

  def score_answers(self, pairs: Sequence[Pair]) -> list[tuple[float, float] | str]:
    """(true reward of A's answer, of B's) for the item's user, per pair; or, for an
    item whose user is not in the file, the reason."""
    out: list[tuple[float, float] | str] = []
    for pair in pairs:
      user = self.users.get(pair.item.user_id)
      if user is None:
        out.append(f"unknown user: user {pair.item.user_id!r} of item "
                   f"{pair.item.item_id} is not in the simulated users file "
                   f"{self.path} (the ground-truth judge needs data made by "
                   f"experiments/simulate.py with this users file)")
      else:
        out.append((user.reward(pair.answer_a), user.reward(pair.answer_b)))
    return out

  def judge(self, pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    """One record per pair, order 'any': the rewards do not depend on the order."""
    return score_records(pairs, self.score_answers(pairs), tie=TIE_TOLERANCE)


# ----------------------------------------------------------------------------------------
# config.judge -> a Judge.
# ----------------------------------------------------------------------------------------


def _llm_judge(cfg, workdir: str, mesh_axes, cache_name: str) -> LLMJudge:
  del mesh_axes  # the LLM runs elsewhere
  return LLMJudge(
      open_client=lambda: pipeline.make_client(cfg.client, workdir,
                                               cache_name=cache_name),
      dimensions=tuple(cfg.dimensions), max_tokens=cfg.max_tokens,
      temperature=cfg.temperature, max_context_messages=cfg.max_context_messages,
      max_chars_per_message=cfg.max_chars_per_message,
      max_answer_chars=cfg.max_answer_chars)


def _reward_model_judge(cfg, workdir: str, mesh_axes, cache_name: str
                        ) -> RewardModelJudge:
  del workdir, cache_name  # offline: no requests to cache
  rm = cfg.reward_model
  return RewardModelJudge(
      rm.path, tokenizer=rm.tokenizer, system_template=rm.system_template,
      with_persona=rm.with_persona, batch_size=rm.batch_size, max_length=rm.max_length,
      max_response_length=rm.max_response_length, bucket_lengths=rm.bucket_lengths,
      mesh_axes=mesh_axes)


def _ground_truth_judge(cfg, workdir: str, mesh_axes, cache_name: str
                        ) -> GroundTruthJudge:
  del workdir, mesh_axes, cache_name  # no model, no requests
  return GroundTruthJudge(cfg.ground_truth.users)


# kind -> (config.judge, workdir, mesh axes, request-cache file name) -> Judge
JUDGES: dict[str, Callable[..., Judge]] = {
    "llm": _llm_judge,
    "reward_model": _reward_model_judge,
    "ground_truth": _ground_truth_judge,
}


def check_kind(kind: str) -> None:
  """Raises ValueError unless `kind` names a judge of `JUDGES`."""
  if kind not in JUDGES:
    raise ValueError(f"config.judge.kind: expected one of {tuple(JUDGES)}, got {kind!r}")


def make_judge(cfg, *, workdir: str, cache_name: str,
               mesh_axes: Mapping[str, int] | None = None) -> Judge:
  """The judge config.judge (configs/eval.py) describes.

  `workdir` holds the LLM judge's request cache `cache_name`; `mesh_axes` is the mesh
  of a judge that runs a model here. Building the reward-model judge loads the model
  (on every process); the LLM judge opens its client only when it judges; the
  ground-truth judge reads the simulated users file.
  """
  check_kind(cfg.kind)
  return JUDGES[cfg.kind](cfg, workdir, dict(mesh_axes or {"fsdp": -1}), cache_name)
