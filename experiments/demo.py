r"""The whole RLHI pipeline on the bundled sample, offline, on CPU.

  python -m experiments.demo --workdir /tmp/rlhi_demo

Stages so far: ingest of the bundled WildChat-format sample (filters, users, user-level
splits). Each stage writes its outputs and a report under --workdir; the combined
report is printed at the end and written to <workdir>/report.md.
"""

import os
import sys

from absl import app
from absl import flags

from configs import data_prep
from rlhi.data import pipeline

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/rlhi_demo", "Output directory.")


def main(argv):
  del argv
  data_dir = os.path.join(_WORKDIR.value, "data")
  cfg = data_prep.get_config("sample")
  sections = []
  for stage in pipeline.STAGES:
    pipeline.run_stage(stage, cfg, data_dir)
    with open(os.path.join(data_dir, f"{stage}_report.md"), encoding="utf-8") as f:
      sections.append(f.read())
  report = "\n".join(sections)
  with open(os.path.join(_WORKDIR.value, "report.md"), "w", encoding="utf-8") as f:
    f.write(report)
  sys.stdout.write(report + f"\nWrote {_WORKDIR.value}/report.md\n")


if __name__ == "__main__":
  app.run(main)
