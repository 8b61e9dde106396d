r"""docs/tpu.md's table: Llama-3.1-8B and 70B steps compiled for TPU slices by libtpu.

  pip install -e '.[tpu_compile]'
  python bench/tpu_compile_table.py --out /tmp/tpu_table        # every cell
  python bench/tpu_compile_table.py --models llama3_8b --topologies v5litepod-64 \
      --steps dpo_cached

Each cell is one run of experiments/compile.py (its own process, its wall time
reported): SFT, reward model and DPO (cached reference) with a global batch of 1M
tokens (256 sequences x 4,096 tokens: `batch_size` 256 sequences for SFT, 128 pairs for
the others), the config's mesh and full remat, and the fewest gradient-accumulation
steps that fit (`--search` over accumulation only); decode is one step of the sampler
with 256 rows and a 4,096-slot KV cache (3,072 prompt + 1,024 new tokens). Prints a
markdown table and writes each cell's JSON and log under --out.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (config file and variant, overrides) of each step; batch sizes give 1M tokens/step.
CELLS = {
    "sft": ("configs/sft.py:{model}", ["--config.batch_size=256"]),
    "reward": ("configs/reward_model.py:{model}", ["--config.batch_size=128"]),
    "dpo_cached": ("configs/dpo.py:rewrites,{model}", ["--config.batch_size=128"]),
    "decode": ("configs/dpo.py:rewrites,{model}",
               ["--config.user_rewards.generation_batch_size=256",
                "--config.user_rewards.max_new_tokens=1024"]),
}
NAMES = {"llama3_8b": "Llama-3.1-8B", "llama3_70b": "Llama-3.1-70B"}


def config_mesh(model: str, chips: int) -> str:
  """configs/common.py's mesh for the size, resolved for `chips`."""
  from configs import common  # pylint: disable=g-import-not-at-top
  mesh = dict(common._SIZES[model]["mesh"])  # pylint: disable=protected-access
  known = 1
  for v in mesh.values():
    known *= v if v != -1 else 1
  mesh = {k: (chips // known if v == -1 else v) for k, v in mesh.items()}
  return ",".join(f"{k}={v}" for k, v in mesh.items() if v != 1)


def fallback_mesh(chips: int) -> str:
  """Tried when the config's mesh does not fit: tensor parallelism over 8 chips
  splits the activations (heads, MLP) 8 ways."""
  return f"fsdp={chips // 8},tensor=8"


def run_cell(model: str, topology: str, step: str, out: str) -> dict:
  from rlhi.aot import topology as topo_lib  # pylint: disable=g-import-not-at-top
  chips = topo_lib.parse(topology).chips
  config, overrides = CELLS[step]
  name = f"{model}_{step}_{topology}"
  meshes = [config_mesh(model, chips)]
  if step != "decode" and fallback_mesh(chips) not in meshes:
    meshes.append(fallback_mesh(chips))
  t0 = time.perf_counter()
  results, rc = [], 0
  for i, mesh in enumerate(meshes):
    path = os.path.join(out, f"{name}_{i}.json")
    cmd = [sys.executable, "-m", "experiments.compile",
           "--config", config.format(model=model), "--topology", topology,
           "--steps", step, *overrides, "--json", path,
           "--hlo_dir", os.path.join(out, "hlo", name)]
    if step != "decode":
      cmd += ["--search", f"--search_meshes={mesh}", "--search_remat=full"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    with open(os.path.join(out, f"{name}_{i}.log"), "w") as log:
      rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
      with open(path) as f:
        data = json.load(f)
      results += data[step] if isinstance(data, dict) else data
    except (OSError, ValueError, KeyError):
      pass
    if rc == 0:
      break
  return {"model": model, "topology": topology, "step": step, "rc": rc,
          "wall_s": time.perf_counter() - t0, "data": results or None,
          "mesh": meshes[0]}


def reestimate(cell: dict, result: dict, out: str) -> dict:
  """The result's roofline recomputed from its saved HLO with the current
  rlhi/aot/hlo.py (the compile itself is not repeated)."""
  # pylint: disable=g-import-not-at-top
  from rlhi.aot import check
  from rlhi.aot import hlo
  from rlhi.aot import roofline
  from rlhi.aot import topology as topo_lib
  name = f"{cell['model']}_{cell['step']}_{cell['topology']}"
  label = cell["step"] + (f" {result['setting']}" if "setting" in result else "")
  path = os.path.join(out, "hlo", name, check.hlo_file_name(label))
  if not os.path.exists(path) or "estimate" not in result:
    return result
  s = topo_lib.parse(cell["topology"])
  with open(path) as f:
    summary = hlo.summarize(f.read(), s.chips)
  per_step = result["estimate"].get("per_step", 1)
  e = roofline.estimate(summary, s.chip, s.chips,
                        model_flops=result["estimate"]["model_flops"] * per_step,
                        flops_per_chip=result["estimate"]["flops_per_chip"] * per_step,
                        per_step=per_step)
  return dict(result, estimate=dict(result["estimate"], step_s=e.step_s, bound=e.bound,
                                    mfu=e.mfu, hbm_bytes=summary.hbm_bytes))


def row(cell: dict, out: str = "") -> str:
  data = cell["data"]
  head = (f"| {NAMES.get(cell['model'], cell['model'])} | {cell['step']} | "
          f"{cell['topology']} | ")
  wall = f"{cell['wall_s'] / 60:.1f}"
  if data is None:
    return head + f"no result (exit {cell['rc']}) | | | | | {wall} |"
  results = data
  fitting = [r for r in results if r["fits"]]
  if not fitting:
    best = min(results, key=lambda r: r["used_bytes"])
    setting = best.get("setting", f"mesh {cell['mesh']}")
    return head + (f"does not fit: {setting}: {best['error']} | | | | | {wall} |")
  if out:
    fitting = [reestimate(cell, r, out) for r in fitting]
  r = min(fitting, key=lambda r: r["estimate"]["step_s"])
  e = r["estimate"]
  setting = r.get("setting", f"mesh {cell['mesh']}")
  return head + (f"{setting} | {r['used_bytes'] / 2 ** 30:.2f} / "
                 f"{r['capacity_bytes'] / 2 ** 30:.2f} | {e['step_s']:.3g} | "
                 f"{e['bound']} | {e['mfu']:.1%} | {wall} |")


def load_cell(record: dict, out: str) -> dict:
  """A cell recorded in cells.jsonl, with its results read back."""
  name = f"{record['model']}_{record['step']}_{record['topology']}"
  results = []
  for path in [os.path.join(out, name + ".json")] + [
      os.path.join(out, f"{name}_{i}.json") for i in range(4)]:
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, ValueError):
      continue
    results += data[record["step"]] if isinstance(data, dict) else data
  return dict(record, data=results or None)


HEADER = ["| model | step | slice | smallest fitting setting | peak / usable HBM GiB "
          "per chip | roofline step s | bound | roofline MFU | wall min |",
          "|---|---|---|---|---|---|---|---|---|"]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="llama3_8b,llama3_70b")
  p.add_argument("--topologies", default="v5litepod-64,v5litepod-256,v5p-128,v6e-64")
  p.add_argument("--steps", default="sft,reward,dpo_cached,decode")
  p.add_argument("--out", default="/tmp/rlhi_tpu_table")
  p.add_argument("--skip_done", action="store_true",
                 help="keep the cells already recorded in <out>/cells.jsonl")
  p.add_argument("--table_only", action="store_true",
                 help="print the table of the cells recorded in <out>, compile nothing")
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  records = {}
  if os.path.exists(os.path.join(a.out, "cells.jsonl")):
    with open(os.path.join(a.out, "cells.jsonl")) as f:
      for line in f:
        r = json.loads(line)
        records[(r["model"], r["topology"], r["step"])] = r
  lines = list(HEADER)
  for model in a.models.split(","):
    for topology in a.topologies.split(","):
      for step in a.steps.split(","):
        key = (model, topology, step)
        if a.table_only or (a.skip_done and key in records):
          if key in records:
            lines.append(row(load_cell(records[key], a.out), a.out))
          continue
        cell = run_cell(model, topology, step, a.out)
        lines.append(row(cell, a.out))
        print(lines[-1], flush=True)
        with open(os.path.join(a.out, "cells.jsonl"), "a") as f:
          f.write(json.dumps({k: v for k, v in cell.items() if k != "data"}) + "\n")
  print("\n" + "\n".join(lines))


if __name__ == "__main__":
  main()
