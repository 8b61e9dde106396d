r"""Throughput of one User-Based Rewards round: sampling vs scoring vs training.

  python bench/online_round.py                      # tiny and small, a markdown table
  python bench/online_round.py --models tiny --prompts 16

Random policy and reward model (its head made non-zero so that answers get different
scores and pairs are kept) of each size, the bundled sample's training users, one round
of rlhi/train/user_rewards.py: `--prompts` prompts x `--samples` answers of up to
`--new_tokens` tokens, scored by the reward model, then `--steps` DPO steps on the
kept pairs (batch `--batch`). Phase times are wall time, model loading and compilation
included, as a researcher sees them in a round; "candidates/s" is sampled answers per
second of the sampling phase.
"""

import argparse
import os
import tempfile

import jax

from configs import data_prep
from configs import dpo as dpo_config
from rlhi.data import pipeline
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.models import reward
from rlhi.models import reward_io
from rlhi.models import tokenizer as tok_lib
from rlhi.train import user_rewards


def run_round(model: str, root: str, data: str, args) -> dict:
  config = llama.get_config(model)
  tok = tok_lib.load_tokenizer("bundled")
  policy = os.path.join(root, f"{model}_policy")
  hf_io.save_checkpoint(llama.init_params(config, jax.random.PRNGKey(0)), config, policy)
  tok.save_pretrained(policy)
  rm_params = reward.init_params(config, jax.random.PRNGKey(1))
  rm_params["score"]["kernel"] = jax.random.normal(
      jax.random.PRNGKey(2), rm_params["score"]["kernel"].shape)
  rm = os.path.join(root, f"{model}_rm")
  reward_io.save(rm_params, config, rm, tokenizer=tok)

  cfg = dpo_config.get_config(f"user_rewards,{model},rounds=1,steps={args.steps}")
  cfg.data.dir = data
  cfg.model.init = policy
  cfg.data.max_length = 512
  cfg.data.max_response_length = 256
  cfg.data.bucket_lengths = (256, 512)
  cfg.batch_size = args.batch
  cfg.eval_splits = ()
  cfg.log_every = 1
  cfg.checkpoint.every = args.steps
  cfg.user_rewards.reward_model = rm
  cfg.user_rewards.prompts_per_round = args.prompts
  cfg.user_rewards.num_samples = args.samples
  cfg.user_rewards.max_new_tokens = args.new_tokens
  cfg.user_rewards.margin_threshold = 0.0
  cfg.user_rewards.generation_batch_size = args.gen_batch
  (stats,) = user_rewards.run(cfg, os.path.join(root, f"{model}_run"))
  return stats


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="tiny,small")
  parser.add_argument("--prompts", type=int, default=16)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--gen_batch", type=int, default=32)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    data = os.path.join(root, "data")
    cfg = data_prep.get_config("sample")
    for stage in pipeline.STAGES:
      pipeline.run_stage(stage, cfg, data)
    rows = []
    for model in args.models.split(","):
      s = run_round(model, root, data, args)
      sec = s["seconds"]
      total = sum(sec.values())
      rows.append(
          f"| {model} | {s['prompts']} x {args.samples} | {s['candidates']} | "
          f"{s['completion_tokens']:,} | {sec['sampling']:.1f} | "
          f"{s['candidates'] / sec['sampling']:.2f} | "
          f"{s['completion_tokens'] / sec['sampling']:.0f} | {sec['scoring']:.1f} | "
          f"{sec['training']:.1f} | {s['pairs']} | "
          f"{100 * sec['sampling'] / total:.0f}% / {100 * sec['scoring'] / total:.0f}% / "
          f"{100 * sec['training'] / total:.0f}% |")
  print(f"\nOne round: {args.prompts} prompts x {args.samples} samples, up to "
        f"{args.new_tokens} new tokens, {args.steps} DPO steps of {args.batch} pairs; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s).\n")
  print("| model | prompts x samples | candidates | tokens sampled | sampling s | "
        "candidates/s | tokens/s | scoring s | training s | pairs | "
        "sampling / scoring / training |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
