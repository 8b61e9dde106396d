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
(curves.png) and of the win rates (win_rates.png). A stage whose outputs exist is run
again (they are cheap here); delete --workdir for a clean start. RLHI_DEMO_QUICK=1 in
the environment means --quick (CI uses it to run the README command as written).
"""

import json
import os
import subprocess
import sys
import time

from absl import flags

from configs import data_prep
from rlhi import cli
from rlhi.data import pipeline

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
# Demo-size inputs for every training stage: the sample's pairs are 320-500 tokens with
# the persona (prompts ~225), so 512 holds them all.
_TRAIN_FLAGS = ["--config.data.max_length=512", "--config.data.max_response_length=256",
                "--config.data.bucket_lengths=(256,512)", "--config.batch_size=8",
                "--config.eval_every=0"]


def _run(name: str, cmd: list[str]) -> float:
  """Runs one stage's command (progress bars stream through); returns seconds."""
  sys.stdout.write(f"\n== {name}: {' '.join(cmd[1:])}\n")
  sys.stdout.flush()
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True)
  return time.perf_counter() - t0


def _train_cmd(module: str, config: str, workdir: str, data_dir: str, steps: int,
               *extra: str) -> list[str]:
  return [sys.executable, "-m", module, f"--config={config},steps={steps}",
          f"--workdir={workdir}", f"--config.data.dir={data_dir}",
          f"--config.log_every={max(1, steps // 20)}",
          f"--config.checkpoint.every={steps}", *_TRAIN_FLAGS, *extra]


def main(argv):
  del argv
  work, quick = _WORKDIR.value, _QUICK.value
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
      "experiments.train_sft", "configs/sft.py:tiny", d("sft"), data_dir, steps["sft"]))
  sft = d("sft", "hf")
  seconds["reward"] = _run("reward", _train_cmd(
      "experiments.train_reward", "configs/reward_model.py:tiny", d("reward"), data_dir,
      steps["reward"], f"--config.model.init={sft}"))
  seconds["dpo"] = _run("dpo", _train_cmd(
      "experiments.train_dpo", "configs/dpo.py:rewrites,tiny", d("dpo"), data_dir,
      steps["dpo"], f"--config.model.init={sft}"))
  rm, dpo = d("reward", "reward_model"), d("dpo", "hf")
  seconds["online"] = _run("online", _train_cmd(
      "experiments.user_rewards", "configs/dpo.py:user_rewards,tiny,rounds=1",
      d("user_rewards"), data_dir, steps["online"], f"--config.model.init={dpo}",
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
  for name, a, b, persona in _COMPARISONS:
    path = {"sft": sft, "dpo": dpo, "online": online}
    _run(f"eval {name}", [
        sys.executable, "-m", "experiments.evaluate",
        f"--config=configs/eval.py:judge=reward_model,a=checkpoint,rm={rm}"
        + (",quick" if quick else ""),
        f"--workdir={d('eval_' + name)}", f"--config.data.dir={data_dir}",
        f"--config.systems.a.path={path[a]}", f"--config.systems.b.path={path[b]}",
        f"--config.systems.a.persona={persona}", f"--config.systems.b.persona={persona}",
        f"--config.systems.a.name={a}{' + persona' if persona else ''}",
        f"--config.systems.b.name={b}{' + persona' if persona else ''}",
        f"--config.generation.max_new_tokens={32 if quick else 64}",
        # Sampled, as in the online round: the tiny model's greedy answers are mostly
        # runs of newlines (empty once stripped), which would make every pair a tie.
        "--config.generation.temperature=0.6", "--config.generation.top_p=0.9",
        *(f"--config.{part}.{k}" for part in ("judge.reward_model", "reward_eval")
          for k in ("max_length=512", "max_response_length=256",
                    "bucket_lengths=(256,512)"))])
  seconds["eval"] = time.perf_counter() - t0

  # ---- Report ------------------------------------------------------------------------
  report = write_report(work, seconds, quick)
  sys.stdout.write("\n" + report + f"\nWrote {work}/report.md\n")


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def plot_curves(work: str, path: str) -> None:
  """Training loss (and reward accuracy) of SFT, the reward model and DPO."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [("sft", "train/loss", "SFT: token NLL"),
            ("reward", "train/loss", "reward model: Bradley-Terry loss"),
            ("reward", "train/accuracy", "reward model: train accuracy"),
            ("dpo", "train/loss", "DPO: loss"),
            ("dpo", "train/rewards/accuracies", "DPO: reward accuracy"),
            ("dpo", "train/rewards/margins", "DPO: reward margin")]
  fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
  for ax, (stage, key, title) in zip(axes.flat, panels):
    rows = [m for m in _metrics(os.path.join(work, stage)) if key in m]
    ax.plot([m["step"] for m in rows], [m[key] for m in rows], marker=".")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_win_rates(work: str, path: str) -> list[str]:
  """One bar per (comparison, turn type): B's win rate over A with its 95% interval."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  rows, labels, bars = [], [], []
  for name, *_ in _COMPARISONS:
    with open(os.path.join(work, f"eval_{name}", "usereval.json"), encoding="utf-8") as f:
      r = json.load(f)
    a, b = r["systems"]["a"]["label"], r["systems"]["b"]["label"]
    for turn in ("initial", "follow_up", "all"):
      w = r["win_rates"]["overall"][turn]
      if w["win_rate"] is None:
        continue
      labels.append(f"{b}\nvs {a}\n({turn})")
      bars.append((w["win_rate"], w["ci_low"], w["ci_high"]))
      rows.append(f"| {b} | {a} | {turn} | {w['n_items']} | {100 * w['win_rate']:.1f}% "
                  f"| [{100 * w['ci_low']:.1f}%, {100 * w['ci_high']:.1f}%] |")
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(bars)), 4.5))
  x = range(len(bars))
  ax.bar(x, [100 * v for v, _, _ in bars],
         yerr=[[100 * (v - lo) for v, lo, _ in bars], [100 * (hi - v) for v, _, hi in bars]],
         capsize=4, color="tab:blue")
  ax.axhline(50, color="gray", linestyle="--", linewidth=1)
  ax.set_xticks(list(x), labels, fontsize=7)
  ax.set_ylabel("win rate of B over A (%), overall")
  ax.set_ylim(0, 100)
  ax.set_title("UserEval on held-out users, reward-model judge", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return rows


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
      "Test users' target turns; each pair judged in both orders by the persona-aware "
      "reward model (overall only); ties count half; 95% bootstrap intervals. The "
      "tiny model trained for minutes on 37 pairs: read these as a working pipeline, "
      "not as evidence for the method.", "",
      "| B | A | turns | items | B wins | 95% CI |", "|---|---|---|---|---|---|",
      *win_rows, "", "![win rates](win_rates.png)", ""]
  for name, *_ in _COMPARISONS:
    sections.append(f"## UserEval {name}\n")
    sections.append(_read(os.path.join(work, f"eval_{name}", "usereval.md")))
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
