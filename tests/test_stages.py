"""experiments/stages.py: a stage run in this process gets the config its printed
command would give, and a misspelled field is refused as the flags refuse it."""

import os
import shlex

from absl import flags
from ml_collections import config_flags
import pytest

from experiments import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/eval.py:judge=ground_truth,a=checkpoint,max_items=3"


def test_in_process_config_equals_the_printed_commands(tmp_path, capsys,
                                                       monkeypatch):
  monkeypatch.chdir(REPO)
  got = {}
  overrides = {"generation.batch_size": 5, "reuse_answers_from": ("x", "y z"),
               "systems.b.with_persona": False, "systems.a.name": "base policy",
               "generation.temperature": 0.7, "data.dir": str(tmp_path / "data")}
  stages.run_in_process("eval x", "experiments.evaluate", CONFIG, overrides,
                        str(tmp_path / "w"), lambda cfg, w: got.update(cfg=cfg, w=w))
  cfg = got["cfg"]
  assert got["w"] == str(tmp_path / "w")
  assert (cfg.max_items, cfg.generation.batch_size, cfg.reuse_answers_from) == (
      3, 5, ("x", "y z"))
  assert not cfg.systems.b.with_persona and cfg.systems.a.name == "base policy"
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith("== eval x: python -m experiments.evaluate ")
  argv = shlex.split(line.split(": ", 1)[1])[3:]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=["evaluate", *argv])  # finds the overrides
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(["evaluate", *argv])
  assert fv.workdir == got["w"]
  assert fv.config.to_dict() == cfg.to_dict()


def test_a_misspelled_field_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(ValueError, match="did you mean --config.generation.batch_size"):
    stages.run_in_process("eval x", "experiments.evaluate", CONFIG,
                          {"generation.batchsize": 5}, str(tmp_path),
                          lambda cfg, w: pytest.fail("ran with a misspelled field"))
