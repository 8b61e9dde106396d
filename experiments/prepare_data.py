r"""Data preparation stages (no jax): see configs/data_prep.py for the commands.

  python -m experiments.prepare_data --config configs/data_prep.py:sample \
      --workdir /tmp/rlhi/data --stage ingest
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rlhi import cli
from rlhi import fileio
# Registers backend='local' (rlhi's own model); imports jax only when one is built.
from rlhi import local_backend  # pylint: disable=unused-import
from rlhi import workdir_lock
from rlhi.data import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Data-prep config file, e.g. configs/data_prep.py:sample.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs.")
_STAGE = flags.DEFINE_enum("stage", "ingest", list(pipeline.STAGES) + ["all"],
                           "Stage to run; 'all' runs every stage in order.")
_PRINT_REPORT = flags.DEFINE_bool("print_report", True,
                                  "Print each stage's markdown report to stdout.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cfg = _CONFIG.value
  stages = list(pipeline.STAGES) if _STAGE.value == "all" else [_STAGE.value]
  # One lock for every stage of `--stage all`: no other run can slip in between.
  with workdir_lock.hold(_WORKDIR.value, f"prepare_data --stage {_STAGE.value}"):
    for stage in stages:
      logging.info("stage %s -> %s", stage, _WORKDIR.value)
      pipeline.run_stage(stage, cfg, _WORKDIR.value)
      if _PRINT_REPORT.value:
        with fileio.open(f"{_WORKDIR.value}/{stage}_report.md") as f:
          sys.stdout.write(f.read() + "\n")


if __name__ == "__main__":
  cli.run(main)
