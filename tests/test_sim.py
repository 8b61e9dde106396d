"""The user simulator (rlhi/sim) against independent, hand-made computations.

Checked:
  * reward features (rlhi.sim.features.of) of hand-written answers (a terse one-liner,
    a bulleted list, prose with a fenced code block, a formal paragraph, a casual
    reply, a hedged reply), each of the 6 features recomputed by hand from the
    formulas in the module doc (counts written out in the comments), including the
    Flesch-Kincaid reading level and the clipping of length / reading_level to [0, 1];
  * users (make_users): balanced clusters, weights near the cluster centre,
    determinism per seed, 64-hex unique ids, valid persona cards of at most 200
    words, save_users / load_users round trip, and file:line in load errors;
  * labels (SimUser.prefers) = argmax of the true reward w . f, and with noise a
    Bradley-Terry draw at the rate sigmoid((rb - ra) / noise);
  * users of different clusters rank a pair of answers in opposite order;
  * reactions (SimUser.react): a complaint about the worst deficit when it exceeds
    the tolerance, thanks or a continuation when the answer satisfies the user.

Fast (well under 5 s) and jax-free: rlhi/sim belongs to the data layer.
"""

import collections
import dataclasses
import functools
import itertools
import json
import math
import re

import numpy as np
import pytest

from rlhi.data import persona as persona_lib
from rlhi.data import schema
from rlhi.sim import features
from rlhi.sim import users as sim_users

FEATURES = ("length", "lists", "code", "formality", "reading_level", "hedging")

# --------------------------------------------------------------------------------------
# Hand-written answers and their features, computed by hand.
#
# Formulas (rlhi/sim/features.py module doc):
#   length        = min(1, whitespace tokens / 300)
#   lists         = list-item lines / non-empty lines
#   code          = characters of the non-empty lines inside ``` fences (fence lines
#                   included) / characters of all non-empty lines (no line breaks)
#   formality     = 0.5 + 0.5 (F - I) / (F + I + 2)
#   reading_level = clip((0.39 words/sentence + 11.8 syllables/word - 15.59) / 16)
#                   over the prose (code lines left out); 0 when there is no prose
#   hedging       = min(1, hedges / sentences of prose)
# Sentences end at . ! ? followed by whitespace or the end, or at a line break.
# Syllables: vowel groups (aeiouy), less a final silent 'e' unless the word ends in
# 'le', 'ee' or 'ye', at least 1 (so 'page' 1, 'file' 2, 'your' 1).
# --------------------------------------------------------------------------------------

TERSE = "Use git stash."
# tokens: Use git stash. = 3 -> length 3/300 = 0.01. 1 line, no list, no code.
# F = I = 0 -> formality 0.5. 1 sentence, 3 words, syllables Use 1 (u,e; silent e),
# git 1, stash 1 = 3: grade = 0.39*3/1 + 11.8*3/3 - 15.59 = 1.17 + 11.8 - 15.59
# = -2.62 -> clipped to 0. No hedges.
TERSE_F = dict(length=3 / 300, lists=0.0, code=0.0, formality=0.5, reading_level=0.0,
               hedging=0.0)

BULLETS = ("Steps:\n"
           "- Open the settings page.\n"
           "- Click the Save button.\n"
           "- Restart the app.")
# tokens: Steps: (1) + "- Open the settings page." (5) + "- Click the Save button." (5)
# + "- Restart the app." (4) = 15 -> length 15/300 = 0.05.
# 4 non-empty lines, 3 list items -> lists 3/4 = 0.75; no code; formality 0.5.
# Sentences: "Steps:" | "- Open the settings page" | "- Click the Save button" |
# "- Restart the app" = 4. Words (12) and syllables: Steps 1, Open 2 (o,e),
# the 1, settings 2, page 1, Click 1, the 1, Save 1, button 2, Restart 2, the 1,
# app 1 = 16. grade = 0.39*12/4 + 11.8*16/12 - 15.59 = 1.17 + 15.7333 - 15.59
# = 1.31333 -> reading_level 1.31333/16 = 0.0820833. No hedges -> 0.
BULLETS_F = dict(length=15 / 300, lists=0.75, code=0.0, formality=0.5,
                 reading_level=(0.39 * 12 / 4 + 11.8 * 16 / 12 - 15.59) / 16,
                 hedging=0.0)

CODE = ("Run this command:\n"
        "```bash\n"
        "ls -la\n"
        "```\n"
        "It lists every file.")
# tokens: Run this command: (3) ```bash ls -la ``` (4) It lists every file. (4) = 11
# -> length 11/300. 5 non-empty lines: prose "Run this command:" 17 characters and
# "It lists every file." 20; code "```bash" 7, "ls -la" 6, "```" 3 -> code
# 16/(16 + 37) = 16/53 = 0.3018868; lists 0 (no list item); formality 0.5.
# Prose "Run this command:\nIt lists every file." = 2 sentences (line break, final .)
# of 7 words: Run 1, this 1, command 2, It 1, lists 1, every 3 (e,e,y), file 2
# (ends in 'le': no silent e) = 11 syllables.
# grade = 0.39*7/2 + 11.8*11/7 - 15.59 = 1.365 + 18.542857 - 15.59 = 4.317857
# -> reading_level 4.317857/16 = 0.2698661. No hedges.
CODE_F = dict(length=11 / 300, lists=0.0, code=16 / 53, formality=0.5,
              reading_level=(0.39 * 7 / 2 + 11.8 * 11 / 7 - 15.59) / 16, hedging=0.0)

FORMAL = ("Regarding your request, the report is attached. Furthermore, the figures "
          "have been verified; therefore, no further action is required.")
# tokens: 7 + 12 = 19 -> length 19/300. One line of prose: lists 0, code 0.
# FORMAL markers: regarding, furthermore, therefore -> F = 3 ("further" is none);
# I = 0 -> formality 0.5 + 0.5*3/5 = 0.8.
# 2 sentences, 19 words: Regarding 3, your 1, request 2, the 1, report 2, is 1,
# attached 3, Furthermore 3 (u,e,o,e less silent e), the 1, figures 3, have 1,
# been 1, verified 3, therefore 3 (e,e,o,e less silent e), no 1, further 2,
# action 2, is 1, required 3 = 37 syllables.
# grade = 0.39*19/2 + 11.8*37/19 - 15.59 = 3.705 + 22.978947 - 15.59 = 11.093947
# -> reading_level 11.093947/16 = 0.6933717. No hedges.
FORMAL_F = dict(length=19 / 300, lists=0.0, code=0.0, formality=0.8,
                reading_level=(0.39 * 19 / 2 + 11.8 * 37 / 19 - 15.59) / 16,
                hedging=0.0)

CASUAL = "Hey, that's totally fine! You don't need to worry lol."
# tokens: 10 -> length 10/300. lists 0, code 0.
# Informal: hey, totally, lol (INFORMAL words) 3 + contractions that's, don't 2
# + "!" 1 = I = 6; F = 0 -> formality 0.5 + 0.5*(0 - 6)/(0 + 6 + 2) = 0.125.
# Sentences: "Hey, that's totally fine" | "You don't need to worry lol" = 2.
# Words (10): Hey 1 (ey), that's 1, totally 3 (o,a,y), fine 1, You 1 (you), don't 1,
# need 1, to 1, worry 2 (o,y), lol 1 = 13 syllables.
# grade = 0.39*10/2 + 11.8*13/10 - 15.59 = 1.95 + 15.34 - 15.59 = 1.7
# -> reading_level 1.7/16 = 0.10625. No hedges.
CASUAL_F = dict(length=10 / 300, lists=0.0, code=0.0, formality=0.125,
                reading_level=1.7 / 16, hedging=0.0)

HEDGED = ("It depends on your data. A smaller batch might help. "
          "The default is fine here.")
# tokens: 5 + 5 + 5 = 15 -> length 0.05. lists 0, code 0, formality 0.5 (no markers).
# Hedges: "it depends", "might" = 2 over 3 sentences -> hedging 2/3.
# Words (15): It 1, depends 2, on 1, your 1, data 2, A 1, smaller 2, batch 1,
# might 1, help 1, The 1, default 2, is 1, fine 1, here 1 = 19 syllables.
# grade = 0.39*15/3 + 11.8*19/15 - 15.59 = 1.95 + 14.946667 - 15.59 = 1.306667
# -> reading_level 1.306667/16 = 0.0816667.
HEDGED_F = dict(length=15 / 300, lists=0.0, code=0.0, formality=0.5,
                reading_level=(0.39 * 15 / 3 + 11.8 * 19 / 15 - 15.59) / 16,
                hedging=2 / 3)

CODE_ONLY = "```\nls -la\n```"
# tokens: ``` ls -la ``` = 4 -> length 4/300; 3 lines, all code (12 of 12
# characters) -> code 1, lists 0;
# no prose at all -> reading_level 0 and hedging 0 (no sentences); formality 0.5.
CODE_ONLY_F = dict(length=4 / 300, lists=0.0, code=1.0, formality=0.5,
                   reading_level=0.0, hedging=0.0)

JARGON = ("Internationalization considerations notwithstanding, interoperability "
          "necessitates standardization.")
# tokens 6 -> length 6/300. 1 sentence, 6 words: Internationalization 8
# (I,e,a,io,a,i,a,io), considerations 5, notwithstanding 4, interoperability 8,
# necessitates 5, standardization 5 = 35 syllables.
# grade = 0.39*6 + 11.8*35/6 - 15.59 = 2.34 + 68.8333 - 15.59 = 55.58 -> clipped to 1.
JARGON_F = dict(length=6 / 300, lists=0.0, code=0.0, formality=0.5, reading_level=1.0,
                hedging=0.0)

LONG = " ".join(["word"] * 400)
# 400 tokens -> length min(1, 400/300) = 1. One line, one 400-word sentence of
# 1-syllable words: grade = 0.39*400 + 11.8 - 15.59 = 152.21 -> reading_level 1.
LONG_F = dict(length=1.0, lists=0.0, code=0.0, formality=0.5, reading_level=1.0,
              hedging=0.0)

ANSWERS = {"terse": (TERSE, TERSE_F), "bullets": (BULLETS, BULLETS_F),
           "code": (CODE, CODE_F), "formal": (FORMAL, FORMAL_F),
           "casual": (CASUAL, CASUAL_F), "hedged": (HEDGED, HEDGED_F),
           "code_only": (CODE_ONLY, CODE_ONLY_F), "jargon": (JARGON, JARGON_F),
           "long": (LONG, LONG_F)}

# A long bulleted explanation: an intro line and 20 list items of 15 tokens each
# ("-" counts as a token) = 7 + 300 tokens -> length 1; lists 20/21.
LONG_LIST = "Here is a full walk-through of every step.\n" + "\n".join(
    "- Check the value in the panel and save the change before you move on."
    for _ in range(20))


def test_sim_does_not_import_jax():
  # Other test files import jax into the same session, so sys.modules cannot tell;
  # the sources must not import it (nor flax / optax).
  for mod in (features, sim_users):
    src = open(mod.__file__, encoding="utf-8").read()
    assert not re.search(r"^\s*(import|from)\s+(jax|flax|optax)\b", src, re.M), mod


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_features_match_hand_computation(name):
  text, expected = ANSWERS[name]
  got = features.of(text)
  assert tuple(got) == FEATURES
  for k in FEATURES:
    assert got[k] == pytest.approx(expected[k], abs=1e-9), (name, k)
  assert features.vector(text) == pytest.approx([expected[k] for k in FEATURES])


def test_features_hand_numbers_are_what_the_comments_say():
  # The closed forms above, evaluated, against the decimals in the comments.
  assert BULLETS_F["reading_level"] == pytest.approx(0.0820833, abs=1e-6)
  assert CODE_F["reading_level"] == pytest.approx(0.2698661, abs=1e-6)
  assert CODE_F["code"] == pytest.approx(0.3018868, abs=1e-6)
  assert FORMAL_F["reading_level"] == pytest.approx(0.6933717, abs=1e-6)
  assert HEDGED_F["reading_level"] == pytest.approx(0.0816667, abs=1e-6)


def test_features_clip_and_empty():
  assert features.of(LONG)["length"] == 1.0  # 400/300 capped
  assert features.of(CODE_ONLY)["reading_level"] == 0.0  # no prose at all
  assert features.of(TERSE)["reading_level"] == 0.0  # grade -2.62 clipped at 0
  assert features.of(JARGON)["reading_level"] == 1.0  # grade 55.58 clipped at 1
  # 4 hedges (it depends, might, i think, probably) in 1 sentence -> min(1, 4) = 1.
  assert features.of("It depends, it might work, I think it probably will.")[
      "hedging"] == 1.0
  empty = features.of("")
  assert empty == dict(length=0.0, lists=0.0, code=0.0, formality=0.5,
                       reading_level=0.0, hedging=0.0)
  for text, _ in ANSWERS.values():
    assert all(0.0 <= v <= 1.0 for v in features.of(text).values())


# --------------------------------------------------------------------------------------
# Users.
# --------------------------------------------------------------------------------------


def test_clusters_balanced_and_weights_near_centre():
  clusters = tuple(sim_users.CLUSTERS)
  users = sim_users.make_users(10, seed=3)
  counts = collections.Counter(u.cluster for u in users)
  assert set(counts) == set(clusters)
  assert max(counts.values()) - min(counts.values()) <= 1  # 3, 3, 2, 2
  assert [u.cluster for u in users] == [clusters[i % 4] for i in range(10)]
  assert [u.index for u in users] == list(range(10))
  assert collections.Counter(u.cluster for u in sim_users.make_users(8)) == {
      c: 2 for c in clusters}
  two = sim_users.make_users(6, clusters=("casual_chatter", "terse_engineer"))
  assert [u.cluster for u in two] == ["casual_chatter", "terse_engineer"] * 3
  with pytest.raises(ValueError, match="clusters"):
    sim_users.make_users(2, clusters=("no_such_cluster",))

  spread = 0.2
  for u in sim_users.make_users(40, seed=1, spread=spread):
    centre = np.array([sim_users.CLUSTERS[u.cluster][k] for k in FEATURES])
    assert len(u.weights) == 6
    assert np.all(np.abs(np.array(u.weights) - centre) <= 4 * spread), u
    assert not np.allclose(u.weights, centre)  # noise was added
  for u in sim_users.make_users(8, spread=0.0):
    assert u.weights == tuple(sim_users.CLUSTERS[u.cluster][k] for k in FEATURES)


def test_users_deterministic_per_seed_and_ids():
  a, b = sim_users.make_users(8, seed=0), sim_users.make_users(8, seed=0)
  assert a == b
  c = sim_users.make_users(8, seed=1)
  for ua, uc in zip(a, c):
    assert ua.user_id != uc.user_id
    assert ua.weights != uc.weights
  ids = [u.user_id for u in a + c]
  assert len(set(ids)) == len(ids)
  assert all(re.fullmatch(r"[0-9a-f]{64}", i) for i in ids)


def test_cards_are_valid_personas_of_at_most_200_words():
  for u in sim_users.make_users(24, seed=5):
    card = persona_lib.validate_card(u.card)
    assert card["preferences"], u  # every cluster has strong preferences
    text = schema.Persona(user_id=u.user_id, **card).to_text()
    assert len(text.split()) <= 200, text
    assert u.cluster not in text and "_" not in text  # no cluster name leaks
    json.dumps(u.card)  # JSON-serialisable


def test_save_load_round_trip(tmp_path):
  users = sim_users.make_users(8, seed=2, noise=0.1, tolerance=0.5)
  path = str(tmp_path / "users.jsonl")
  sim_users.save_users(path, users)
  loaded = sim_users.load_users(path)
  assert list(loaded) == [u.user_id for u in users]
  for u in users:
    assert loaded[u.user_id] == u


@pytest.mark.parametrize("bad", ['{"user_id": "abc"', '{"user_id": "abc"}', "[1, 2]",
                                 '"just a string"'])
def test_load_users_corrupt_line_names_file_and_line(tmp_path, bad):
  path = str(tmp_path / "users.jsonl")
  sim_users.save_users(path, sim_users.make_users(3))
  lines = open(path, encoding="utf-8").read().splitlines()
  lines[1] = bad
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=re.escape(f"{path}:2:")):
    sim_users.load_users(path)


# --------------------------------------------------------------------------------------
# Labels, disagreement, reactions.
# --------------------------------------------------------------------------------------

TEXTS = [text for text, _ in ANSWERS.values()] + [LONG_LIST]


def _true_reward(weights, text):
  f = features.of(text)
  return float(np.dot(np.array(weights), np.array([f[k] for k in FEATURES])))


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def test_labels_are_argmax_of_true_reward():
  rng = np.random.default_rng(0)
  pairs = [tuple(rng.choice(len(TEXTS), size=2, replace=False)) for _ in range(20)]
  users = sim_users.make_users(8)
  seen = set()
  for u in users:
    for i, j in pairs:
      a, b = TEXTS[i], TEXTS[j]
      ra, rb = _true_reward(u.weights, a), _true_reward(u.weights, b)
      assert u.reward(a) == pytest.approx(ra)
      expected = int(rb > ra)
      assert u.prefers(a, b) == expected
      assert u.prefers(b, a) == 1 - expected or ra == rb
      seen.add(expected)
    assert u.prefers(TERSE, TERSE) == 0  # a tie goes to a
  assert seen == {0, 1}


def test_noisy_labels_follow_bradley_terry(monkeypatch):
  # The rewards themselves are checked in the test above; here only the draws are,
  # so the features of the few texts are cached (12,000 draws stay well under 1 s).
  monkeypatch.setattr(features, "vector", functools.lru_cache(features.vector))
  u0 = sim_users.make_users(8)[1]  # thorough_learner
  with pytest.raises(ValueError, match="rng"):
    dataclasses.replace(u0, noise=0.5).prefers(TERSE, BULLETS)
  for a, b in ((TERSE, BULLETS), (FORMAL, CODE), (HEDGED, CASUAL)):
    d = _true_reward(u0.weights, b) - _true_reward(u0.weights, a)
    assert d != 0
    for noise in (abs(d), 2 * abs(d)):  # p_b = sigmoid(+-1), sigmoid(+-0.5)
      u = dataclasses.replace(u0, noise=noise)
      rng = np.random.default_rng(7)
      rate = np.mean([u.prefers(a, b, rng) for _ in range(2000)])
      assert abs(rate - _sigmoid(d / noise)) < 0.04, (a, b, noise, rate)


def test_clusters_disagree():
  # terse code vs a long bulleted explanation.
  # terse_engineer centre on CODE_ONLY: -1*4/300 + 1*1 = 0.987; on LONG_LIST: length 1,
  # lists 20/21 -> -1 - 0.3*0.952 + 0.4*rl <= -0.886 < 0.987.
  # thorough_learner on CODE_ONLY: 1*4/300 = 0.013; on LONG_LIST:
  # 1 + 0.8*0.952 - 0.8*rl + 0.3*0 >= 0.962 > 0.013.
  f = features.of(LONG_LIST)
  assert f["length"] == 1.0 and f["lists"] == pytest.approx(20 / 21)
  centre = {c: [w[k] for k in FEATURES] for c, w in sim_users.CLUSTERS.items()}
  assert _true_reward(centre["terse_engineer"], CODE_ONLY) > _true_reward(
      centre["terse_engineer"], LONG_LIST)
  assert _true_reward(centre["thorough_learner"], CODE_ONLY) < _true_reward(
      centre["thorough_learner"], LONG_LIST)
  for u in sim_users.make_users(8):
    if u.cluster == "terse_engineer":
      assert u.prefers(CODE_ONLY, LONG_LIST) == 0
      assert u.prefers(LONG_LIST, CODE_ONLY) == 1
    elif u.cluster == "thorough_learner":
      assert u.prefers(CODE_ONLY, LONG_LIST) == 1
      assert u.prefers(LONG_LIST, CODE_ONLY) == 0
  # And no answer pleases everybody: the clusters do not agree on the best answer.
  best = {c: max(TEXTS, key=lambda t: _true_reward(w, t)) for c, w in centre.items()}
  assert len(set(best.values())) > 1


def _user(**weights):
  return sim_users.SimUser(user_id="0" * 64, index=0, cluster="hand",
                           weights=tuple(float(weights.get(k, 0.0)) for k in FEATURES),
                           card={})


def test_reaction_complains_about_worst_deficit():
  # Wants short answers only; LONG has length 1 -> deficit |-1| * 1 = 1 > 0.35.
  u = _user(length=-1.0)
  assert u.deficits(LONG) == pytest.approx(dict(length=1.0, lists=0.0, code=0.0,
                                                formality=0.0, reading_level=0.0,
                                                hedging=0.0))
  for seed in range(5):
    r = u.react(LONG, np.random.default_rng(seed))
    assert (r.label, r.actionable, r.feature) == ("style_feedback", True, "length")
    assert "shorter" in r.feedback and r.text

  # Wants short answers (w -0.5) and lists (w 0.9); LONG: length 1, lists 0 ->
  # deficits length 0.5*1 = 0.5, lists 0.9*(1 - 0) = 0.9 -> the worst is lists.
  u = _user(length=-0.5, lists=0.9)
  d = u.deficits(LONG)
  assert d["length"] == pytest.approx(0.5) and d["lists"] == pytest.approx(0.9)
  r = u.react(LONG, np.random.default_rng(0))
  assert r.feature == "lists" == max(d, key=d.get)
  assert (r.label, r.actionable) == ("style_feedback", True)
  assert "list" in r.feedback.lower() and r.text

  # Wants formal answers (w 1): CASUAL has formality 0.125 -> deficit 0.875.
  u = _user(formality=1.0, length=-0.2)
  r = u.react(CASUAL, np.random.default_rng(0))
  assert (r.label, r.feature) == ("style_feedback", "formality")
  assert "formal" in r.feedback.lower()


def test_reaction_satisfied_user_is_not_actionable():
  # Wants short answers; TERSE has length 0.01 -> deficit 0.01 <= tolerance 0.35.
  u = _user(length=-1.0)
  assert u.deficits(TERSE)["length"] == pytest.approx(0.01)
  labels = set()
  for seed in range(30):
    r = u.react(TERSE, np.random.default_rng(seed))
    assert r.label in ("positive", "continuation")
    assert (r.actionable, r.feedback, r.feature) == (False, "", "")
    assert r.text
    labels.add(r.label)
  assert labels == {"positive", "continuation"}
  # A deficit just under a raised tolerance is also no complaint: LONG -> 1.0 <= 1.0.
  r = dataclasses.replace(u, tolerance=1.0).react(LONG, np.random.default_rng(0))
  assert not r.actionable


def test_every_pair_of_answers_is_ordered_by_some_user():
  # Sanity for the label test: every hand-written pair is ordered by some user.
  users = sim_users.make_users(8)
  for a, b in itertools.combinations(TEXTS, 2):
    assert any(u.reward(a) != u.reward(b) for u in users)
