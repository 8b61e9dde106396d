"""notebooks/rlhi_explore.ipynb runs headless, top to bottom, without an error.

The kernel is this interpreter (`python3` kernelspec, whose `python` jupyter_client
replaces with sys.executable): checked by an extra cell. It inherits this session's
environment (CPU, 8 simulated devices, offline) minus the notebook's RLHI_* reuse
variables, so every cell does its work from scratch, in a temporary directory.
"""

import os
import sys

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "rlhi_explore.ipynb")
REUSE_VARS = ("RLHI_DATA_DIR", "RLHI_RM_DIR", "RLHI_POLICY_DIR", "RLHI_REPO")


def _text(cell) -> str:
  """A code cell's stdout, stderr and plain-text results, concatenated."""
  parts = []
  for out in cell.get("outputs", []):
    if out.output_type == "stream":
      parts.append(out.text)
    elif "data" in out:
      parts.append(out.data.get("text/plain", ""))
  return "".join(parts)


def test_notebook_is_saved_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"cell {i} has outputs"


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
  for name in REUSE_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's mkdtemp() dirs
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(
      "import sys\nprint('KERNEL_PYTHON=' + sys.executable)"))
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=600,
      resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError, with the traceback, on any cell error

  outputs = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
  kernel_python = outputs.split("KERNEL_PYTHON=")[1].split()[0]
  assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable)
  assert "Traceback" not in outputs

  # 1. Data prep ran and counted; 2. a user's persona; 3. the pair in token space.
  assert "Prepared the bundled sample" in outputs
  assert "rewrite pairs" in outputs and "style_feedback" in outputs
  assert "Persona card" in outputs and "Preferences:" in outputs
  assert "--- WITH persona" in outputs and "--- WITHOUT persona" in outputs
  assert "<|start_header_id|>system<|end_header_id|>About the user:" in outputs
  # 4. The reward model trained and its scores table was printed.
  assert "reward model at step 40" in outputs
  assert "Reward-model scores on" in outputs
  for column in ("with persona", "no persona", "chosen", "rejected"):
    assert column in outputs
  assert "accuracy with persona:" in outputs and "accuracy no persona:" in outputs
  # 5. Both generations and the scored candidates.
  assert "WITHOUT persona (" in outputs and "WITH persona (" in outputs
  assert "best - worst margin:" in outputs
