"""Candidate answers and simulated preference labels: the reward models' data.

    pairs = candidates.labelled_pairs(users, prompts, split_of, cfg)

AlpacaFarm-style: a simulated annotator labels pairs of candidate answers. The
candidates for a request are style variants of the answer its source conversation gave
(`variants`): the same content, shortened, as a list, as prose, without its code, only
its code, with hedges, formal, casual, or expanded. The transforms are plain text edits
(below), so that the answers differ in the features users care about
(rlhi/sim/features.py) and in nothing a persona-blind model could use to be right for
everyone. Each user labels `pairs_per_prompt` random pairs of the variants of each of
`prompts_per_user` requests: chosen = the variant with the higher true reward (or a
Bradley-Terry draw when the user has noise).

Every pair is a PreferencePair with the user's persona card as the persona, so the
reward-model trainer reads them unchanged. Never imports jax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Callable, Sequence

import numpy as np

from rlhi.data import schema
from rlhi.sim import features as features_lib
from rlhi.sim import users as users_lib
from rlhi.sim.logs import Prompt

_FENCED = re.compile(r"```.*?(?:```|$)", re.DOTALL)
_LIST_MARK = re.compile(r"^\s*(?:[-*•+]|\d{1,3}[.)])\s+")
_SENT = re.compile(r"(?<=[.!?])\s+")
_CONTRACTIONS = {"don't": "do not", "can't": "cannot", "it's": "it is",
                 "you're": "you are", "won't": "will not", "isn't": "is not",
                 "doesn't": "does not", "i'm": "I am", "let's": "let us",
                 "that's": "that is", "here's": "here is", "you'll": "you will"}


def _prose_sentences(answer: str) -> list[str]:
  """The answer's prose (code removed, list marks dropped) as sentences."""
  prose = _FENCED.sub(" ", answer)
  lines = [_LIST_MARK.sub("", l).strip() for l in prose.splitlines()]
  text = " ".join(l for l in lines if l)
  return [s.strip() for s in _SENT.split(text) if s.strip()]


def _code_blocks(answer: str) -> list[str]:
  return [b if b.rstrip().endswith("```") and b.count("```") >= 2 else b + "\n```"
          for b in _FENCED.findall(answer)]


def _expand_contractions(text: str) -> str:
  def repl(m: re.Match) -> str:
    word = m.group(0)
    full = _CONTRACTIONS[word.lower()]
    return full[0].upper() + full[1:] if word[0].isupper() else full
  return re.sub(r"\b(?:" + "|".join(re.escape(c) for c in _CONTRACTIONS) + r")\b", repl,
                text, flags=re.IGNORECASE)


def variants(answer: str) -> dict[str, str]:
  """{name: text} style variants of `answer`; variants equal to another or empty are
  left out (so a code-free answer has no 'code_only')."""
  sents = _prose_sentences(answer)
  code = _code_blocks(answer)
  short_prose = " ".join(sents[:2])
  out = {
      "original": answer.strip(),
      "short": (short_prose + ("\n\n" + code[0] if code else "")).strip(),
      "bulleted": "\n".join(f"- {s}" for s in sents) +
                  ("\n\n" + "\n\n".join(code) if code else ""),
      "prose": " ".join(sents) + ("\n\n" + "\n\n".join(code) if code else ""),
      "no_code": " ".join(sents),
      "code_only": "\n\n".join(code),
      "hedged": ("It depends on your situation, but generally: " + " ".join(sents) +
                 " This might not hold in every case, so you may want to check it "
                 "with someone who knows your setup." +
                 ("\n\n" + "\n\n".join(code) if code else "")),
      "formal": ("Regarding your request, please note the following. " +
                 _expand_contractions(" ".join(sents)) + " Should you require further "
                 "details, kindly let me know; I would be glad to elaborate "
                 "accordingly." + ("\n\n" + "\n\n".join(code) if code else "")),
      "casual": ("Hey! Okay so here's the deal: " + " ".join(sents[:3]) +
                 " Hope that helps, no worries if not! 🙂" +
                 ("\n\n" + code[0] if code else "")),
      "expanded": (answer.strip() + "\n\nTo go through it step by step:\n" +
                   "\n".join(f"{i}. {s} Take a moment to make sure this part is clear "
                             f"before moving on, since the next step builds on it."
                             for i, s in enumerate(sents, 1))),
  }
  seen, result = set(), {}
  for name, text in out.items():
    text = text.strip()
    if text and text not in seen:
      seen.add(text)
      result[name] = text
  return result


@dataclasses.dataclass(frozen=True)
class PairConfig:
  prompts_per_user: int = 6
  pairs_per_prompt: int = 2
  heldout_prompts_per_user: int = 2  # a seen user's prompts kept for evaluation
  # Only requests whose source answer has at most this many words (0: all): shorter
  # pairs train faster.
  max_answer_words: int = 0
  seed: int = 0

  @classmethod
  def from_config(cls, cfg) -> "PairConfig":
    return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})


@dataclasses.dataclass(frozen=True)
class LabelledPair:
  """A labelled pair and where it is used: 'train', 'seen' (a training user's held-out
  prompt) or 'unseen' (a held-out user)."""
  pair: schema.PreferencePair
  group: str
  reward_chosen: float
  reward_rejected: float


def persona_text(user: users_lib.SimUser) -> str:
  return schema.Persona(user_id=user.user_id, **{
      k: tuple(v) if isinstance(v, list) else v for k, v in user.card.items()}).to_text()


def labelled_pairs(users: Sequence[users_lib.SimUser], prompts: Sequence[Prompt],
                   split_of: Callable[[str], str], cfg: PairConfig
                   ) -> list[LabelledPair]:
  """Each user labels pairs of variants of `prompts_per_user` requests (module doc).

  `split_of(user_id)` is the user's split (the ingest's, wildchat.split_of): 'train'
  users' pairs are 'train', except those of their last `heldout_prompts_per_user`
  requests ('seen'); other users' pairs are all 'unseen'.
  """
  candidates = [(p, list(variants(p.source_answer).items())) for p in prompts
                if not cfg.max_answer_words or
                len(p.source_answer.split()) <= cfg.max_answer_words]
  candidates = [(p, v) for p, v in candidates if len(v) >= 2]
  if len(candidates) < cfg.prompts_per_user:
    raise ValueError(f"sim pairs: prompts_per_user={cfg.prompts_per_user} > "
                     f"{len(candidates)} requests with at least two variants")
  out = []
  for u in users:
    rng = np.random.default_rng([cfg.seed, u.index, 3])
    split = split_of(u.user_id)
    persona = persona_text(u)
    chosen_prompts = rng.choice(len(candidates), size=cfg.prompts_per_user,
                                replace=False)
    for n, i in enumerate(chosen_prompts):
      p, vs = candidates[i]
      if split != "train":
        group = "unseen"
      else:
        group = "seen" if n >= cfg.prompts_per_user - cfg.heldout_prompts_per_user \
            else "train"
      pairs_here = min(cfg.pairs_per_prompt, len(vs) * (len(vs) - 1) // 2)
      picked: set[tuple[int, int]] = set()
      while len(picked) < pairs_here:
        a, b = sorted(rng.choice(len(vs), size=2, replace=False).tolist())
        picked.add((a, b))
      for a, b in sorted(picked):
        (na, ta), (nb, tb) = vs[a], vs[b]
        if rng.random() < 0.5:  # which variant is shown first carries no signal
          (na, ta), (nb, tb) = (nb, tb), (na, ta)
        first = u.prefers(ta, tb, rng) == 0
        (nc, tc), (nr, tr) = ((na, ta), (nb, tb)) if first else ((nb, tb), (na, ta))
        pid = hashlib.sha256(f"{u.user_id}/{p.prompt_id}/{nc}/{nr}".encode()
                             ).hexdigest()[:24]
        out.append(LabelledPair(
            pair=schema.PreferencePair(
                pair_id=f"sim_label/{pid}", user_id=u.user_id,
                split={"train": "train", "seen": "val", "unseen": "test"}[group],
                prompt=(schema.Message(role="user", content=p.text),), chosen=tc,
                rejected=tr, persona=persona, source="sim_label",
                conversation_hash=p.prompt_id, label=f"{nc}>{nr}"),
            group=group, reward_chosen=u.reward(tc), reward_rejected=u.reward(tr)))
  return out


def majority_labels(pairs: Sequence[schema.PreferencePair],
                    train_users: Sequence[users_lib.SimUser]) -> list[bool]:
  """Per pair: would the majority of the *training* users choose its chosen answer?

  The best any persona-blind judge can do: one verdict per pair of answers, whoever
  asks. Computed from the training users' true rewards (ties: the chosen side).
  """
  w = np.array([u.weights for u in train_users])
  votes: dict[tuple[str, str], bool] = {}
  out = []
  for p in pairs:
    key = (p.chosen, p.rejected)
    if key not in votes:
      diff = (np.array(features_lib.vector(p.chosen)) -
              np.array(features_lib.vector(p.rejected)))
      votes[key] = float(np.mean(w @ diff >= 0)) >= 0.5
    out.append(votes[key])
  return out
