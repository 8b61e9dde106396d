"""Simulated users with known preferences: weights, persona cards, true rewards, reactions.

    users = sim_users.make_users(n=48, seed=0)
    u = users[0]
    u.reward(answer)                 # the ground truth: w_u . features.of(answer)
    u.card                           # the persona card, natural text from w_u
    u.react(answer, rng)             # the user's follow-up and what it means

A user belongs to one of CLUSTERS, preference profiles that disagree (length, lists,
code and tone point in opposite directions), so that no persona-blind model can be
right for everyone. Their weights are the cluster's centre plus Gaussian noise
(`spread`). The persona card states the strong preferences with phrasings drawn at
random, mixed with facts that carry no preference (a city, a job, a hobby), and is a
valid persona record (rlhi.data.persona.validate_card).

Never imports jax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Sequence

import numpy as np

from rlhi import fileio
from rlhi.sim import features as features_lib

FEATURES = features_lib.FEATURES

# Preference profiles: weight per feature (features are in [0, 1]).
CLUSTERS: dict[str, dict[str, float]] = {
    "terse_engineer": dict(length=-1.0, lists=-0.3, code=1.0, formality=0.0,
                           reading_level=0.4, hedging=-1.0),
    "thorough_learner": dict(length=1.0, lists=0.8, code=0.0, formality=0.0,
                             reading_level=-0.8, hedging=0.3),
    "formal_professional": dict(length=0.3, lists=0.4, code=-0.6, formality=1.0,
                                reading_level=0.6, hedging=-0.4),
    "casual_chatter": dict(length=-0.7, lists=-0.8, code=-0.6, formality=-1.0,
                           reading_level=-0.6, hedging=0.0),
}

# How a card states a preference: (feature, sign) -> phrasings.
_LIKES = {
    ("length", -1): ["short answers, no preamble", "answers kept to a few lines",
                     "brevity: just the essentials", "concise replies without filler"],
    ("length", 1): ["long, thorough explanations", "detailed answers that cover every "
                    "step", "in-depth replies with background", "complete, extensive "
                    "write-ups"],
    ("lists", -1): ["flowing paragraphs rather than bullet points", "prose, not lists",
                    "answers written as normal sentences"],
    ("lists", 1): ["bullet points and numbered steps", "answers structured as lists",
                   "step-by-step numbered instructions"],
    ("code", -1): ["plain-language explanations without code", "no code snippets unless "
                   "asked", "answers in words rather than code"],
    ("code", 1): ["code first: a runnable snippet", "answers that show the code or the "
                  "command", "copy-pasteable code blocks"],
    ("formality", -1): ["a casual, friendly tone", "relaxed, chatty replies",
                        "informal language, like talking to a friend"],
    ("formality", 1): ["a formal, professional tone", "polished business language",
                       "courteous, formal wording"],
    ("reading_level", -1): ["simple words and short sentences", "plain language a "
                            "beginner can follow", "easy-to-read explanations"],
    ("reading_level", 1): ["technical, precise vocabulary", "expert-level language",
                           "dense, sophisticated prose"],
    ("hedging", -1): ["direct answers without caveats", "confident, decisive replies",
                      "no hedging or disclaimers"],
    ("hedging", 1): ["nuance and caveats where things are uncertain", "answers that "
                     "note exceptions and uncertainty", "careful, qualified claims"],
}
_DISLIKES = {
    ("length", -1): "long-winded answers", ("length", 1): "terse, one-line replies",
    ("lists", -1): "bullet-point walls", ("lists", 1): "unstructured blocks of text",
    ("code", -1): "code dumps", ("code", 1): "explanations with no code",
    ("formality", -1): "stiff corporate language", ("formality", 1): "slang and "
    "exclamation marks",
    ("reading_level", -1): "jargon", ("reading_level", 1): "oversimplified answers",
    ("hedging", -1): "disclaimers and 'it depends'", ("hedging", 1): "overconfident "
    "claims",
}
# Facts that carry no preference (the same for every cluster).
_JOBS = ["a nurse", "a high-school teacher", "a logistics planner", "a graduate student",
         "a small-business owner", "a software developer", "an accountant",
         "a retired engineer", "a marketing analyst", "a chef", "a lab technician",
         "a freelance designer"]
_CITIES = ["Austin", "Leeds", "Toronto", "Melbourne", "Denver", "Dublin", "Chicago",
           "Seattle", "Manchester", "Auckland", "Portland", "Boston"]
_HOBBIES = ["plays chess", "runs half-marathons", "keeps bees", "restores old bikes",
            "bakes sourdough", "hikes on weekends", "plays the cello", "grows tomatoes",
            "paints watercolours", "climbs indoors"]
_TOPICS = ["travel planning", "home repairs", "personal finance", "cooking",
           "job applications", "spreadsheets", "fitness plans", "gardening",
           "python scripts", "email drafts", "history questions", "gift ideas"]

# What a user says when an answer misses a preference: (feature, direction the answer
# should move) -> (phrasings, the instruction as the classifier would restate it).
_COMPLAINTS = {
    ("length", -1): (["way too long, just give me the short version",
                      "can you cut this down? I only need the key point",
                      "too much text. a couple of lines please"],
                     "Make the answer much shorter: only the essential point."),
    ("length", 1): (["that's too brief, can you explain in more detail?",
                     "I need a much more thorough answer than this",
                     "please expand on this, walk me through it fully"],
                    "Make the answer longer and more detailed."),
    ("lists", -1): (["please drop the bullet points and just write it out",
                     "no lists please, write it as a paragraph"],
                    "Rewrite as prose paragraphs without bullet points."),
    ("lists", 1): (["can you put this in bullet points?",
                    "break it into numbered steps please",
                    "hard to scan, make it a list"],
                   "Restructure the answer as a bulleted or numbered list."),
    ("code", -1): (["I don't want code, explain it in words",
                    "skip the code, just tell me in plain language"],
                   "Remove the code and explain in words."),
    ("code", 1): (["just show me the code",
                   "can you give me the actual snippet/command?",
                   "less talk, more code"],
                  "Give the answer as a code block (the command or snippet)."),
    ("formality", -1): (["lol you sound like a lawyer, say it normally",
                         "way too stiff, talk to me like a person"],
                        "Use a casual, friendly tone."),
    ("formality", 1): (["Please use a more professional tone.",
                        "This is for work; the wording should be formal."],
                       "Use a formal, professional tone."),
    ("reading_level", -1): (["I don't understand half these words, simpler please",
                             "can you explain it like I'm new to this?"],
                            "Use simpler words and shorter sentences."),
    ("reading_level", 1): (["this is too basic, give me the technical version",
                            "I'm an expert, you can use the proper terms"],
                           "Use precise technical language."),
    ("hedging", -1): (["stop hedging, just tell me the answer",
                       "too many caveats. what's the actual answer?"],
                      "Answer directly, without hedges or caveats."),
    ("hedging", 1): (["are you sure? what are the caveats?",
                      "this seems overconfident, mention where it might not hold"],
                     "Add the relevant caveats and uncertainty."),
}
_THANKS = ["thanks, that's exactly what I needed", "perfect, thank you", "great, that "
           "works", "thanks!", "nice, that helps a lot"]
_MORE = ["ok, and what would you do next?", "makes sense. can you give one more "
         "example?", "good. what's the most common mistake here?", "got it, how do I "
         "check that it worked?"]


@dataclasses.dataclass(frozen=True)
class Reaction:
  """A simulated user's follow-up to an answer, and what it means (ground truth)."""
  text: str  # what the user writes
  label: str  # the classify label it is (rlhi.data.classify.DEFAULT_LABELS)
  actionable: bool
  feedback: str  # the instruction it gives ('' when not actionable)
  feature: str  # the feature it complains about ('' when satisfied)


@dataclasses.dataclass(frozen=True)
class SimUser:
  """A simulated user: weights over FEATURES, a cluster, and a persona card."""
  user_id: str  # the WildChat hashed_ip of their rows (= the pipeline's user id)
  index: int
  cluster: str
  weights: tuple[float, ...]  # in FEATURES order
  card: dict[str, Any]  # summary, preferences, expertise, recurring_topics, dislikes
  noise: float = 0.0  # std of the noise the user adds to a judgement (labels)
  tolerance: float = 0.35  # a preference missed by more than this draws a complaint

  def reward(self, text: str) -> float:
    """The true reward r_u(text) = w_u . f(text) (no noise)."""
    return float(np.dot(self.weights, features_lib.vector(text)))

  def deficits(self, text: str) -> dict[str, float]:
    """How far `text` is from what the user wants, per feature: |w| times the
    distance of the feature from the end the user prefers (1 if w > 0, else 0)."""
    f = features_lib.of(text)
    return {k: abs(w) * ((1.0 - f[k]) if w > 0 else f[k])
            for k, w in zip(FEATURES, self.weights)}

  def react(self, text: str, rng: np.random.Generator) -> Reaction:
    """The follow-up: a complaint about the worst-missed preference if it is missed by
    more than `tolerance`, else thanks or a continuation."""
    deficits = self.deficits(text)
    worst = max(FEATURES, key=lambda k: (deficits[k], k))
    if deficits[worst] > self.tolerance:
      sign = 1 if self.weights[FEATURES.index(worst)] > 0 else -1
      phrasings, instruction = _COMPLAINTS[worst, sign]
      return Reaction(text=str(rng.choice(phrasings)), label="style_feedback",
                      actionable=True, feedback=instruction, feature=worst)
    if rng.random() < 0.5:
      return Reaction(text=str(rng.choice(_THANKS)), label="positive",
                      actionable=False, feedback="", feature="")
    return Reaction(text=str(rng.choice(_MORE)), label="continuation",
                    actionable=False, feedback="", feature="")

  def prefers(self, a: str, b: str, rng: np.random.Generator | None = None) -> int:
    """0 if the user prefers answer `a`, 1 if `b`: the argmax of the true reward, or
    with `noise` > 0 a Bradley-Terry draw with that temperature. A tie goes to `a`."""
    ra, rb = self.reward(a), self.reward(b)
    if self.noise > 0:
      if rng is None:
        raise ValueError("SimUser.prefers: noise > 0 needs an rng")
      z = (rb - ra) / self.noise  # a logistic that cannot overflow
      p_b = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
      return int(rng.random() < p_b)
    return int(rb > ra)

  def to_json(self) -> dict[str, Any]:
    return {"user_id": self.user_id, "index": self.index, "cluster": self.cluster,
            "weights": dict(zip(FEATURES, self.weights)), "card": self.card,
            "noise": self.noise, "tolerance": self.tolerance}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "SimUser":
    return cls(user_id=d["user_id"], index=d["index"], cluster=d["cluster"],
               weights=tuple(float(d["weights"][k]) for k in FEATURES),
               card=d["card"], noise=d["noise"], tolerance=d["tolerance"])


def user_id(index: int, seed: int) -> str:
  """A hashed_ip-like id (64 hex digits), stable for (seed, index)."""
  return hashlib.sha256(f"rlhi-sim\x1f{seed}\x1f{index}".encode()).hexdigest()


def persona_card(cluster_weights: Sequence[float], rng: np.random.Generator,
                 min_weight: float = 0.35) -> dict[str, Any]:
  """A persona card in natural text: the preferences with |w| >= min_weight, strongest
  first, each in a phrasing drawn at random; dislikes for the two strongest; and
  facts that carry no preference (job, city, hobby, topics)."""
  strong = sorted((k for k, w in zip(FEATURES, cluster_weights) if abs(w) >= min_weight),
                  key=lambda k: -abs(cluster_weights[FEATURES.index(k)]))
  sign = {k: 1 if cluster_weights[FEATURES.index(k)] > 0 else -1 for k in FEATURES}
  preferences = []
  for k in strong:
    phrase = str(rng.choice(_LIKES[k, sign[k]]))
    w = abs(cluster_weights[FEATURES.index(k)])
    preferences.append(("strongly prefers " if w >= 0.8 else "prefers ") + phrase)
  job, city, hobby = (str(rng.choice(x)) for x in (_JOBS, _CITIES, _HOBBIES))
  summary = str(rng.choice([
      f"{job[0].upper()}{job[1:]} in {city} who {hobby}.",
      f"Lives in {city}, works as {job} and {hobby}.",
      f"Based in {city}; {job} by day, {hobby} in spare time."]))
  topics = [str(t) for t in rng.choice(_TOPICS, size=2, replace=False)]
  return {"summary": summary, "preferences": preferences,
          "expertise": str(rng.choice(["beginner in most technical topics",
                                       "comfortable with computers", "knows their own "
                                       "field well", "self-taught in many things"])),
          "recurring_topics": topics,
          "dislikes": [_DISLIKES[k, sign[k]] for k in strong[:2]]}


def make_users(n: int, seed: int = 0, *, clusters: Sequence[str] = tuple(CLUSTERS),
               spread: float = 0.2, noise: float = 0.0, tolerance: float = 0.35
               ) -> list[SimUser]:
  """`n` users, assigned to `clusters` in turn (balanced), each with the cluster's
  weights plus N(0, spread^2) noise and a card drawn from its own seed."""
  unknown = [c for c in clusters if c not in CLUSTERS]
  if unknown or not clusters:
    raise ValueError(f"sim users: clusters must be a non-empty subset of "
                     f"{list(CLUSTERS)}, got {list(clusters)}")
  users = []
  for i in range(n):
    rng = np.random.default_rng([seed, i])
    cluster = clusters[i % len(clusters)]
    centre = np.array([CLUSTERS[cluster][k] for k in FEATURES])
    weights = centre + spread * rng.standard_normal(len(FEATURES))
    users.append(SimUser(user_id=user_id(i, seed), index=i, cluster=cluster,
                         weights=tuple(float(w) for w in weights),
                         card=persona_card(tuple(weights), rng), noise=noise,
                         tolerance=tolerance))
  return users


def save_users(path: str, users: Sequence[SimUser]) -> None:
  with fileio.open(path, "w") as f:
    for u in users:
      f.write(json.dumps(u.to_json(), sort_keys=True) + "\n")


def load_users(path: str) -> dict[str, SimUser]:
  """{user_id: SimUser} from a file save_users wrote; errors name file:line."""
  out = {}
  with fileio.open(path, "r") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        u = SimUser.from_json(json.loads(line))
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{lineno}: not a simulated user record "
                         f"(rlhi.sim.users.save_users writes them): {e!r}") from e
      out[u.user_id] = u
  return out
