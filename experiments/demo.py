r"""The whole RLHI pipeline on the bundled sample, offline, on CPU, with the tiny model.

  python -m experiments.demo --workdir /tmp/rlhi_demo            # ~10 minutes, 2 cores
  python -m experiments.demo --workdir /tmp/rlhi_demo --quick    # same stages, few steps

Stages, each the command a researcher would run (printed before it runs), each writing
into its own directory under --workdir:

  data     ingest -> classify -> persona -> rewrites (reference annotations)  data/
  sft      SFT warm start of the tiny policy on training users' conversations  sft/
  reward   persona-conditioned reward model on the rewrite pairs               reward/
  dpo      persona-conditioned DPO on the rewrite pairs, from the SFT policy   dpo/
  online   one round of User-Based Rewards from the DPO policy: sample 4
           answers per training-user prompt, score with the reward model, DPO on
           best vs worst                                                       user_rewards/
  eval     WildChat UserEval on held-out users with the reward model as judge
           (offline): DPO vs SFT with persona, DPO vs SFT without persona,
           online round vs DPO; and the reward model's accuracy                eval_*/

Then <workdir>/report.md gathers the numbers, with PNG plots of the training curves
(curves.png) and of the win rates (win_rates.png). Every run starts clean: the
directories a previous demo wrote under --workdir are deleted first (a checkpoint of
another run's settings would otherwise be resumed, or refused), nothing else there.
RLHI_DEMO_QUICK=1 in the environment means --quick (CI uses it to run the README command
as written).
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from absl import flags
from absl import logging

from configs import data_prep
from rlhi import cli
from rlhi import workdir_lock
from rlhi.data import pipeline
from rlhi.eval import browser

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/rlhi_demo", "Output directory.")
_QUICK = flags.DEFINE_bool(
    "quick", os.environ.get("RLHI_DEMO_QUICK", "") not in ("", "0"),
    "Few steps per stage (the CI smoke run); the same stages and reports.")

# Steps per training stage: (full, quick).
_STEPS = {"sft": (40, 4), "reward": (40, 4), "dpo": (30, 4), "online": (12, 4)}
# UserEval runs: (name, system A, system B, persona-guided inference for both).
_COMPARISONS = (("dpo_vs_sft_persona", "sft", "dpo", True),
                ("dpo_vs_sft_no_persona", "sft", "dpo", False),
                ("online_vs_dpo_persona", "dpo", "online", True))
# Demo-size inputs for every training stage and every reward-model scoring: with the
# persona in the system slot the sample's longest training pair is 615 tokens, so 640
# keeps every pair (at 512 one is dropped and four are cut; the reports count both).
_MAX_LENGTH = ["max_length=640", "max_response_length=256", "bucket_lengths=(256,512,640)"]
_TRAIN_FLAGS = [*(f"--config.data.{f}" for f in _MAX_LENGTH),
                "--config.batch_size=8"]


def _run(name: str, cmd: list[str]) -> float:
  """Runs one stage's command (its progress bar streams through); returns seconds.

  Prints the command as a person would paste it (shell-quoted, from `python`). Library
  INFO logs (absl, Orbax, JAX's backend probing, transformers' notices) are quiet
  unless the demo runs with --verbosity (-v) 0 or more: RLHI_QUIET (rlhi/cli.py).
  """
  sys.stdout.write(f"\n== {name}: {shlex.join(['python', *cmd[1:]])}\n")
  sys.stdout.flush()
  env = dict(os.environ)
  if not flags.FLAGS["verbosity"].present:
    env.update(RLHI_QUIET="1", TRANSFORMERS_VERBOSITY="error")
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, env=env)
  return time.perf_counter() - t0


def _train_cmd(module: str, config: str, workdir: str, data_dir: str, steps: int,
               quick: bool, *extra: str) -> list[str]:
  # Held-out evaluation 4 times in a full run (the curves), only at the end in quick.
  return [sys.executable, "-m", module, f"--config={config},steps={steps}",
          f"--workdir={workdir}", f"--config.data.dir={data_dir}",
          f"--config.log_every={max(1, steps // 20)}",
          f"--config.eval_every={0 if quick else max(1, steps // 4)}",
          f"--config.checkpoint.every={steps}", *_TRAIN_FLAGS, *extra]


def _own_dirs(work: str) -> list[str]:
  """The directories a demo writes under `work` (see the module doc)."""
  names = ["data", "sft", "reward", "dpo", "user_rewards",
           *(f"eval_{name}" for name, *_ in _COMPARISONS)]
  return [os.path.join(work, n) for n in names]


def main(argv):
  del argv
  work = _WORKDIR.value
  # One demo at a time per --workdir; the stages' own locks guard their directories.
  with workdir_lock.hold(work, "demo"):
    for path in _own_dirs(work):
      shutil.rmtree(path, ignore_errors=True)
    _demo(work, _QUICK.value)


def _demo(work: str, quick: bool) -> None:
  if not flags.FLAGS["verbosity"].present:  # the stages' progress bars, not INFO logs
    logging.set_verbosity(logging.WARNING)
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
  data_dir = os.path.join(work, "data")
  d = lambda *p: os.path.join(work, *p)
  steps = {k: v[1] if quick else v[0] for k, v in _STEPS.items()}
  seconds = {}

  # ---- Data preparation (in process: no jax) -----------------------------------------
  t0 = time.perf_counter()
  cfg = data_prep.get_config("sample")
  for stage in pipeline.STAGES:
    pipeline.run_stage(stage, cfg, data_dir)
  seconds["data"] = time.perf_counter() - t0

  # ---- Training ----------------------------------------------------------------------
  seconds["sft"] = _run("sft", _train_cmd(
      "experiments.train_sft", "configs/sft.py:tiny", d("sft"), data_dir, steps["sft"],
      quick))
  sft = d("sft", "hf")
  seconds["reward"] = _run("reward", _train_cmd(
      "experiments.train_reward", "configs/reward_model.py:tiny", d("reward"), data_dir,
      steps["reward"], quick, f"--config.model.init={sft}"))
  seconds["dpo"] = _run("dpo", _train_cmd(
      "experiments.train_dpo", "configs/dpo.py:rewrites,tiny", d("dpo"), data_dir,
      steps["dpo"], quick, f"--config.model.init={sft}"))
  rm, dpo = d("reward", "reward_model"), d("dpo", "hf")
  seconds["online"] = _run("online", _train_cmd(
      "experiments.user_rewards", "configs/dpo.py:user_rewards,tiny,rounds=1",
      d("user_rewards"), data_dir, steps["online"], quick, f"--config.model.init={dpo}",
      f"--config.user_rewards.reward_model={rm}",
      f"--config.user_rewards.prompts_per_round={8 if quick else 24}",
      f"--config.user_rewards.max_new_tokens={32 if quick else 64}",
      # The tiny RM's scores spread little after minutes of training (a few
      # steps in quick mode: ~1e-4); any strict gap makes a pair here.
      f"--config.user_rewards.margin_threshold={0.0 if quick else 0.01}"))
  with open(d("user_rewards", "round_00", "round.json"), encoding="utf-8") as f:
    online = json.load(f)["policy_after"]  # the round's DPO export

  # ---- UserEval (reward-model judge) and reward-model accuracy ----------------------
  t0 = time.perf_counter()
  for name, a, b, with_persona in _COMPARISONS:
    path = {"sft": sft, "dpo": dpo, "online": online}
    _run(f"eval {name}", [
        sys.executable, "-m", "experiments.evaluate",
        f"--config=configs/eval.py:judge=reward_model,a=checkpoint,rm={rm}"
        + (",quick" if quick else ""),
        f"--workdir={d('eval_' + name)}", f"--config.data.dir={data_dir}",
        f"--config.systems.a.path={path[a]}", f"--config.systems.b.path={path[b]}",
        f"--config.systems.a.with_persona={with_persona}",
        f"--config.systems.b.with_persona={with_persona}",
        f"--config.systems.a.name={a}{' + persona' if with_persona else ''}",
        f"--config.systems.b.name={b}{' + persona' if with_persona else ''}",
        f"--config.generation.max_new_tokens={32 if quick else 64}",
        # Sampled, as in the online round: the tiny model's greedy answers are mostly
        # runs of newlines (empty once stripped), which would make every pair a tie.
        "--config.generation.temperature=0.6", "--config.generation.top_p=0.9",
        *(f"--config.{part}.{k}" for part in ("judge.reward_model", "reward_eval")
          for k in _MAX_LENGTH)])
  seconds["eval"] = time.perf_counter() - t0

  # ---- Report ------------------------------------------------------------------------
  write_report(work, seconds, quick)
  browser.write_html(os.path.join(work, browser.HTML_FILE), [
      browser.load_run(d(f"eval_{name}"), name) for name, *_ in _COMPARISONS])
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


def plot_win_rates(work: str, path: str) -> list[str]:
  """B's win rate over A per comparison (groups) and turn type (colours), 95% CIs."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  turns = ("initial", "follow_up", "all")
  rows, groups = [], []
  fig, ax = plt.subplots(figsize=(9, 4.8))
  width = 0.8 / len(turns)
  for g, (name, *_) in enumerate(_COMPARISONS):
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


def sample_answers(work: str, n: int = 3) -> list[str]:
  """For the first `n` held-out items: the persona, the request, and each system's
  answer side by side (from the UserEval runs' generation files)."""
  answers: dict[str, dict[str, str | None]] = {}
  labels: list[str] = []
  for name, *_ in _COMPARISONS:
    r = _usereval(work, name)
    with open(os.path.join(work, f"eval_{name}", "usereval_generations.jsonl"),
              encoding="utf-8") as f:
      for line in f:
        g = json.loads(line)
        label = r["systems"][g["system"]]["label"]
        if label not in labels:
          labels.append(label)
        answers.setdefault(g["item_id"], {})[label] = g.get("text")
  with open(os.path.join(work, f"eval_{_COMPARISONS[0][0]}", "usereval_items.jsonl"),
            encoding="utf-8") as f:
    items = [json.loads(line) for line in f][:n]
  out = ["## Sample answers (held-out users)", "",
         "What each system answered to the same request; the full set, with the judge's "
         "verdicts, is in usereval.html.", ""]
  for it in items:
    out += [f"**Persona**: {_cell(it.get('persona'), 400)}", "",
            f"**Request** ({it['turn_type'].replace('_', '-')} turn): "
            f"{_cell(it['context'][-1]['content'], 400)}", "",
            "| system | answer |", "|---|---|",
            *(f"| {label} | {_cell(answers.get(it['item_id'], {}).get(label))} |"
              for label in labels), ""]
  return out


def write_report(work: str, seconds: dict, quick: bool) -> str:
  sections = ["# RLHI demo report", "",
              f"Bundled sample, tiny model, {'quick mode' if quick else 'full run'}; "
              f"stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
              + ".", ""]
  for stage in pipeline.STAGES:
    sections.append(_read(os.path.join(work, "data", f"{stage}_report.md")))
  sections.append(_read(os.path.join(work, "dpo", "eval_report.md")))
  sections.append(_read(os.path.join(work, "user_rewards", "user_rewards_report.md")))
  win_rows = plot_win_rates(work, os.path.join(work, "win_rates.png"))
  sections += [
      "# Held-out comparison (WildChat UserEval, reward-model judge)", "",
      "Test users' target turns; the persona-aware reward model scores each answer "
      "(overall only; its verdict cannot depend on the order, so each pair is judged "
      "once); ties count half; 95% bootstrap intervals. The tiny model trained for "
      "minutes on the sample's train pairs: read these as a working pipeline, not as "
      "evidence for the method. The online round optimises this same reward model, so "
      "its win rate over DPO is measured by the objective it was trained on (an "
      "optimistic judge); a held-out LLM judge is the fair test. Every judged answer: "
      "[usereval.html](usereval.html).", "",
      "| B | A | turns | items | B wins | 95% CI |", "|---|---|---|---|---|---|",
      *win_rows, "", "![win rates](win_rates.png)", ""]
  sections += sample_answers(work)
  for name, *_ in _COMPARISONS:
    sections.append(f"## UserEval {name}\n")
    sections.append(_read(os.path.join(work, f"eval_{name}", "usereval.md")).replace(
        "](usereval", f"](eval_{name}/usereval"))  # links relative to report.md
  # The reward model on held-out pairs (experiments/evaluate.py, same numbers as
  # train_reward's own eval_report.md: the same inputs).
  sections.append(_read(os.path.join(work, f"eval_{_COMPARISONS[0][0]}",
                                     "reward_eval_report.md")))
  plot_curves(work, os.path.join(work, "curves.png"))
  sections += ["## Training curves", "", "![training curves](curves.png)", ""]
  report = "\n".join(sections)
  with open(os.path.join(work, "report.md"), "w", encoding="utf-8") as f:
    f.write(report)
  return report


if __name__ == "__main__":
  cli.run(main)
