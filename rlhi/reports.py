"""Report writers: canonical JSON and `<name>_report.json` / `.md` pairs in a workdir.

Used by the data stages (rlhi/data/pipeline.py), the trainers and the evaluations; it
sits below every layer (beside rlhi/fileio.py) and never imports jax. `workdir` may be
local or remote (gs://..., through rlhi.fileio).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from rlhi import fileio


def write_json(path: str, data: Any) -> None:
  """Writes `data` as canonical JSON, atomically; `path` may be local or gs://...."""
  with fileio.atomic_write(path, "w", newline="\n") as f:
    json.dump(data, f, ensure_ascii=False, indent=2, sort_keys=True)
    f.write("\n")


def write_report(workdir: str, stage: str, report: Mapping[str, Any], markdown: str
                 ) -> None:
  """`report` as `<workdir>/<stage>_report.json` and `markdown` as `<stage>_report.md`."""
  write_json(os.path.join(workdir, f"{stage}_report.json"), report)
  with fileio.open(os.path.join(workdir, f"{stage}_report.md"), "w") as f:
    f.write(markdown)
