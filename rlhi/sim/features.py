"""Transparent, deterministic features of an answer: what a simulated user's taste sees.

    f = features.of(text)           # {"length": 0.43, "lists": 0.0, ...}, each in [0, 1]
    features.vector(text)           # the same, in FEATURES order

Every feature is a short, hand-checkable formula over the text (tests/test_sim.py
recomputes them on hand-written answers); a curly apostrophe reads as a straight one,
and markers count in the prose only (code lines left out):

    length         words / 300, capped at 1 (words: whitespace-separated tokens)
    lists          share of non-empty lines that are list items ("- ", "* ", "• ",
                   "1. ", "2) ")
    code           share of the characters of non-empty lines that are inside ```
                   fences (fence lines included; line breaks not counted)
    formality      0.5 + 0.5 (F - I) / (F + I + 2): F formal markers (FORMAL words),
                   I informal ones (INFORMAL words, contractions, "!", emoji)
    reading_level  Flesch-Kincaid grade of the prose (code lines left out) / 16,
                   clipped to [0, 1]: 0.39 words/sentence + 11.8 syllables/word - 15.59
    hedging        hedges (HEDGES phrases) per sentence of prose, capped at 1

Never imports jax (rlhi/sim is in the data layer).
"""

from __future__ import annotations

import re

FEATURES = ("length", "lists", "code", "formality", "reading_level", "hedging")

LENGTH_SCALE = 300  # words at which `length` reaches 1
GRADE_SCALE = 16.0  # Flesch-Kincaid grade at which `reading_level` reaches 1

FORMAL = ("therefore", "furthermore", "moreover", "however", "regarding", "consequently",
          "accordingly", "additionally", "hence", "thus", "please note", "kindly",
          "sincerely", "respectively", "in accordance", "nevertheless")
INFORMAL = ("hey", "yeah", "cool", "awesome", "gonna", "wanna", "kinda", "lol", "btw",
            "stuff", "super", "totally", "ok", "okay", "yep", "nope", "pretty much",
            "no worries", "folks")
HEDGES = ("might", "may", "perhaps", "possibly", "probably", "likely", "it depends",
          "generally", "typically", "usually", "i think", "i believe", "not sure",
          "could be", "in some cases", "it's worth noting", "consult", "roughly")

_LIST_ITEM = re.compile(r"^\s*(?:[-*•+]|\d{1,3}[.)])\s+\S")
_FENCE = re.compile(r"^\s*```")
_CONTRACTION = re.compile(r"\b[A-Za-z]+'(?:s|t|re|ll|ve|m|d)\b", re.IGNORECASE)
_EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n+")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_VOWELS = re.compile(r"[aeiouy]+")


def _phrases(text: str, phrases) -> int:
  """Occurrences of the phrases as whole words (case-insensitive)."""
  low = text.lower()
  return sum(len(re.findall(r"(?<![\w'])" + re.escape(p) + r"(?![\w'])", low))
             for p in phrases)


def split_code(text: str) -> tuple[list[str], list[str]]:
  """(prose lines, code lines) of the non-empty lines; fence lines count as code."""
  prose, code, inside = [], [], False
  for line in text.splitlines():
    if not line.strip():
      continue
    if _FENCE.match(line):
      code.append(line)
      inside = not inside
    elif inside:
      code.append(line)
    else:
      prose.append(line)
  return prose, code


def sentences(prose: str) -> list[str]:
  return [s for s in _SENTENCE_END.split(prose) if _WORD.search(s)]


def syllables(word: str) -> int:
  """Vowel groups, less a silent final 'e' (but at least 1): 'code' 1, 'table' 2."""
  w = word.lower().replace("'", "")
  n = len(_VOWELS.findall(w))
  if w.endswith("e") and not w.endswith(("le", "ee", "ye")) and n > 1:
    n -= 1
  return max(1, n)


def of(text: str) -> dict[str, float]:
  """The features of `text`, each in [0, 1] (see the module doc)."""
  text = text.replace("\u2019", "'")  # a curly apostrophe is an apostrophe
  prose_lines, code_lines = split_code(text)
  lines = len(prose_lines) + len(code_lines)
  prose = "\n".join(prose_lines)
  sents = sentences(prose)
  words = _WORD.findall(prose)

  informal = (_phrases(prose, INFORMAL) + len(_CONTRACTION.findall(prose)) +
              prose.count("!") + len(_EMOJI.findall(prose)))
  formal = _phrases(prose, FORMAL)
  if words and sents:
    grade = (0.39 * len(words) / len(sents) +
             11.8 * sum(syllables(w) for w in words) / len(words) - 15.59)
  else:
    grade = 0.0
  return {
      "length": min(1.0, len(text.split()) / LENGTH_SCALE),
      "lists": sum(bool(_LIST_ITEM.match(l)) for l in prose_lines) / lines if lines
               else 0.0,
      "code": (sum(map(len, code_lines)) / (sum(map(len, code_lines)) +
                                            sum(map(len, prose_lines))))
              if lines else 0.0,
      "formality": 0.5 + 0.5 * (formal - informal) / (formal + informal + 2),
      "reading_level": min(1.0, max(0.0, grade / GRADE_SCALE)),
      "hedging": min(1.0, _phrases(prose, HEDGES) / len(sents)) if sents else 0.0,
  }


def vector(text: str) -> list[float]:
  f = of(text)
  return [f[k] for k in FEATURES]
