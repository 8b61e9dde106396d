"""Test set-up: 8 simulated CPU devices so that sharding code paths run for real."""

import os

# Must happen before jax is imported anywhere in the test session.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_collection_modifyitems(config, items):
  """Tests marked slow (20 s or more each on 2 cores: subprocess runs, kills and
  resumes, two processes, end-to-end training, the notebook) run when
  RLHI_SLOW_TESTS=1 (.ci/run sets it) or when selected with -m slow; otherwise they are
  skipped, so that the README test command stays under 10 minutes on 2 cores."""
  if os.environ.get("RLHI_SLOW_TESTS") == "1" or "slow" in (config.option.markexpr or ""):
    return
  skip = pytest.mark.skip(reason="slow: set RLHI_SLOW_TESTS=1 (CI does) or -m slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)



@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The bundled sample through every data stage (reference client; ~2 s), once per
  session. Read-only: a test that changes data copies it first."""
  # pylint: disable=g-import-not-at-top  (jax-free, but after the XLA flags above)
  from configs import data_prep
  from rlhi.data import pipeline
  d = str(tmp_path_factory.mktemp("data"))
  cfg = data_prep.get_config("sample")
  for stage in pipeline.STAGES:
    pipeline.run_stage(stage, cfg, d)
  return d
