"""UserEval statistics: per-item scores, win rates and bootstrap intervals.

Win rate is always that of system B over system A. Each item is judged twice, once with
A's answer shown first (order 'ab') and once with B's first ('ba'), unless the judge
cannot depend on the order (the reward model: judged once, order 'any'); a winner
is a *system* ('a', 'b' or 'tie'), already mapped back from the shown position. The
item's score on a dimension is the mean over the two orders of 1 (B wins), 0.5 (tie)
and 0 (A wins), so a judge that always prefers the first-shown answer scores every item
0.5. An item with a failed judgement in either order is left out of that dimension
(counted; never guessed), so that position swapping always cancels.

The interval is a percentile bootstrap over items: `n_boot` resamples of the n item
scores with replacement, drawn by `np.random.default_rng(seed).integers(0, n, (n_boot,
n))` afresh for every (dimension, turn type) cell, and the 2.5th / 97.5th percentiles
(numpy's default linear interpolation) of the resample means.

This module never imports jax.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DIMENSIONS = ("personalization", "instruction_following", "overall")
ORDERS = ("ab", "ba")
# The order of a judge whose verdict cannot depend on it (the reward model scores each
# answer alone): judged once, the verdict is the item's score.
ANY_ORDER = "any"
GROUPS = ("initial", "follow_up", "all")
_POINTS = {"b": 1.0, "tie": 0.5, "a": 0.0}


def item_scores(judgements: Iterable[Mapping[str, Any]], dimensions: Sequence[str]
                ) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
  """({item_id: {dimension: score}}, {item_id: turn_type}) from judgement records.

  A record: {'item_id', 'turn_type', 'order' ('ab' | 'ba', or 'any' for an
  order-independent judge, judged once), 'winners': {dimension: 'a' | 'b' | 'tie'} or
  None when the judge failed}. A dimension is scored only when both orders (or the one
  'any' judgement) have a winner for it.
  """
  by_item: dict[str, dict[str, Mapping[str, str] | None]] = collections.defaultdict(dict)
  turn_type: dict[str, str] = {}
  for j in judgements:
    if j["order"] not in (*ORDERS, ANY_ORDER):
      raise ValueError(f"judgement of {j['item_id']}: order {j['order']!r}, expected one "
                       f"of {(*ORDERS, ANY_ORDER)}")
    by_item[j["item_id"]][j["order"]] = j.get("winners")
    turn_type[j["item_id"]] = j["turn_type"]
  scores: dict[str, dict[str, float]] = {}
  for item_id, orders in by_item.items():
    out = {}
    needed = (ANY_ORDER,) if ANY_ORDER in orders else ORDERS
    for d in dimensions:
      winners = [(orders.get(o) or {}).get(d) for o in needed]
      if all(w in _POINTS for w in winners):
        out[d] = sum(_POINTS[w] for w in winners) / len(needed)
    scores[item_id] = out
  return scores, turn_type


def bootstrap(scores: Sequence[float], n_boot: int, seed: int
              ) -> tuple[float, float, float]:
  """(mean, 2.5th, 97.5th percentile of bootstrap means); NaNs when there are none."""
  s = np.asarray(scores, np.float64)
  if s.size == 0:
    return float("nan"), float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, s.size, size=(n_boot, s.size))
  means = s[idx].mean(axis=1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return float(s.mean()), float(lo), float(hi)


def win_rates(judgements: Sequence[Mapping[str, Any]], dimensions: Sequence[str], *,
              n_boot: int, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
  """{dimension: {group: cell}} for groups initial / follow_up / all.

  A cell: n_items (scored), win_rate, ci_low, ci_high (fractions in [0, 1]; None when
  no item could be scored), and over
  the single judgements behind them: wins, ties, losses (of B), excluded (items with a
  failed judgement in either order).
  """
  scores, turn_type = item_scores(judgements, dimensions)
  votes: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(
      collections.Counter)
  for j in judgements:
    for d, w in (j.get("winners") or {}).items():
      if scores.get(j["item_id"], {}).get(d) is not None:
        votes[d, turn_type[j["item_id"]]][w] += 1
  out: dict[str, dict[str, dict[str, Any]]] = {}
  for d in dimensions:
    out[d] = {}
    for g in GROUPS:
      ids = sorted(i for i in scores if g == "all" or turn_type[i] == g)
      vals = [scores[i][d] for i in ids if d in scores[i]]
      mean, lo, hi = bootstrap(vals, n_boot, seed)
      groups = (g,) if g != "all" else ("initial", "follow_up")
      c = sum((votes[d, t] for t in groups), collections.Counter())
      if not vals:  # None rather than NaN: the report is strict JSON.
        mean = lo = hi = None
      out[d][g] = {"n_items": len(vals), "win_rate": mean, "ci_low": lo, "ci_high": hi,
                   "wins": c["b"], "ties": c["tie"], "losses": c["a"],
                   "excluded": len(ids) - len(vals)}
  return out


def first_position_rate(judgements: Iterable[Mapping[str, Any]], dimension: str
                        ) -> float | None:
  """How often the first-shown answer won (ties half): 0.5 for a judge with no position
  bias; shown to audit the judge."""
  points = []
  for j in judgements:
    w = (j.get("winners") or {}).get(dimension)
    if w in _POINTS and j["order"] != ANY_ORDER:
      first = "a" if j["order"] == "ab" else "b"
      points.append(0.5 if w == "tie" else float(w == first))
  return float(np.mean(points)) if points else None


def length_controlled(scores: Sequence[float], len_a: Sequence[int],
                      len_b: Sequence[int], *, iters: int = 50) -> dict[str, Any]:
  """Is a win a length effect? The AlpacaEval 2 length-controlled win rate, per item.

  Fits P(B wins item i) = sigmoid(t0 + t1 * x_i), x_i = tanh((len_b - len_a) / sd), to
  the item scores (1, 0.5, 0: a tie is half a win) by Newton's method on the logistic
  log-likelihood (fractional outcomes are allowed), then reports sigmoid(t0): the win
  rate when the two answers are equally long. `length_coef` is t1 (> 0: longer answers
  win). Also the share of items whose longer answer won (ties half; equal lengths left
  out) and the median lengths. With few items the fit is loose: read it next to the
  raw win rate, not instead of it.
  """
  s = np.asarray(scores, np.float64)
  da = np.asarray(len_b, np.float64) - np.asarray(len_a, np.float64)
  out: dict[str, Any] = {
      "n_items": int(s.size),
      "median_chars": {"a": float(np.median(len_a)) if s.size else None,
                       "b": float(np.median(len_b)) if s.size else None},
      "longer_won": None, "win_rate_lc": None, "length_coef": None}
  if not s.size:
    return out
  decided = da != 0
  if decided.any():
    out["longer_won"] = float(np.mean(np.where(da[decided] > 0, s[decided],
                                               1 - s[decided])))
  sd = da.std()
  x = np.tanh(da / sd) if sd > 0 else np.zeros_like(da)
  design = np.stack([np.ones_like(x), x], axis=1)
  theta = np.zeros(2)
  ridge = 1e-2  # a weak Gaussian prior: finite estimates when the data separate
  for _ in range(iters):
    p = 1 / (1 + np.exp(-design @ theta))
    grad = design.T @ (s - p) - ridge * theta
    hess = design.T @ (design * (p * (1 - p))[:, None]) + ridge * np.eye(2)
    step = np.linalg.solve(hess, grad)
    theta += step
    if np.abs(step).max() < 1e-10:
      break
  out["win_rate_lc"] = float(1 / (1 + np.exp(-theta[0])))
  out["length_coef"] = float(theta[1])
  return out
