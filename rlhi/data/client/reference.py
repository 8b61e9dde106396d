"""The reference backend: hand-written annotations answered by item key (not a model).

Never imports jax.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

from rlhi.data.client.base import ChatRequest
from rlhi.data.client.base import ChatResult
from rlhi.data.client.base import InferenceClient
from rlhi.data.client.base import OnResult

# rlhi/data/samples/, beside this package.
DEFAULT_REFERENCE_PATH = (pathlib.Path(__file__).resolve().parent.parent / "samples" /
                          "reference_annotations.jsonl")


def load_reference_annotations(path: str | os.PathLike[str]) -> dict[str, str]:
  """{"key": ..., "response": ...} lines -> {key: response}; errors name file:line."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"reference backend: annotations file not found: {path} "
                            f"(set 'reference_path' in the client config)")
  answers: dict[str, str] = {}
  lines: dict[str, int] = {}
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      where = f"{path}:{lineno}"
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from e
      if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with 'key' and 'response'")
      for field in ("key", "response"):
        if not isinstance(record.get(field), str):
          raise ValueError(f"{where}: field '{field}': expected a string, got "
                           f"{record.get(field)!r:.80}")
      key = record["key"]
      if key in answers:
        raise ValueError(f"{where}: field 'key': {key!r} already annotated at line "
                         f"{lines[key]}")
      answers[key] = record["response"]
      lines[key] = lineno
  return answers


class ReferenceClient(InferenceClient):
  """Answers each request by exact `key` lookup in hand-written annotations."""

  kind = "reference"

  def __init__(self, path: str | os.PathLike[str] | None = None):
    super().__init__()
    self.path = pathlib.Path(path) if path else DEFAULT_REFERENCE_PATH
    self._answers = load_reference_annotations(self.path)
    self._digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
    if self.path.resolve() == DEFAULT_REFERENCE_PATH:
      self.name = "reference (hand-written annotations of the bundled sample; not a model)"
    else:
      self.name = f"reference (hand-written annotations from {self.path}; not a model)"

  def cache_identity(self) -> dict[str, Any]:
    # Edited annotations must not be served stale from a cache.
    return {"backend": self.kind, "annotations_sha256": self._digest}

  def cache_payload(self, request: ChatRequest) -> dict[str, Any]:
    # The answer depends on the key alone here, unlike for a model.
    return {**self.cache_identity(), "key": request.key}

  def _answer(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
    for i, request in enumerate(requests):
      text = self._answers.get(request.key)
      if text is None:
        on_result(i, ChatResult(key=request.key, text=None,
                                error=f"reference backend: no annotation for key "
                                      f"'{request.key}'"))
      else:
        on_result(i, ChatResult(key=request.key, text=text))
