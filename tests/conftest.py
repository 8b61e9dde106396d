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


def pytest_collection_modifyitems(config, items):
  """Tests marked slow (each a minute or more on 2 cores: subprocess runs, kills and
  resumes, two processes, the notebook) run when RLHI_SLOW_TESTS=1 (.ci/run sets it)
  or when selected with -m slow; otherwise they are skipped, so that the README test
  command stays well under 15 minutes on a laptop."""
  import pytest  # pylint: disable=g-import-not-at-top
  if os.environ.get("RLHI_SLOW_TESTS") == "1" or "slow" in (config.option.markexpr or ""):
    return
  skip = pytest.mark.skip(reason="slow: set RLHI_SLOW_TESTS=1 (CI does) or -m slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
