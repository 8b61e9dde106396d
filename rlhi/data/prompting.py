"""Prompt templates (files under prompts/) and strict JSON answers with one re-ask.

A model's JSON answer is parsed and validated by a stage-specific function. When it does
not parse or fails validation, the model is asked once more with the reason appended to
the conversation; if the second answer fails too, the item is rejected with both
reasons and the start of both answers (`Failure`), so that the rejects file shows what
the model said. Nothing is guessed or repaired beyond stripping a Markdown code fence.

Each stage also declares its answer as a JSON schema (`object_schema`); the client sends
it where its server constrains decoding to a schema (client config `structured_output`:
'json_schema'), and the validation here stays as strict either way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jinja2

from rlhi.data.client import ChatRequest, InferenceClient

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")

T = TypeVar("T")


@functools.lru_cache(maxsize=None)
def _environment(directory: str) -> jinja2.Environment:
  return jinja2.Environment(
      loader=jinja2.FileSystemLoader(directory), undefined=jinja2.StrictUndefined,
      keep_trailing_newline=False, autoescape=False)


def render(name: str, directory: str = "", **variables: Any) -> str:
  """Renders prompts/<name>.txt (or <directory>/<name>.txt) with jinja2, strictly."""
  return _environment(directory or PROMPTS_DIR).get_template(f"{name}.txt").render(
      **variables).strip()


_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n\s*```\s*$", re.DOTALL)


def parse_json_object(text: str) -> dict[str, Any]:
  """The JSON object in `text` (optionally inside one ``` fence); ValueError if none."""
  m = _FENCE.match(text)
  if m:
    text = m.group(1)
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
                     ) from None
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  return obj


def require(obj: dict[str, Any], name: str, tp: type, *, non_empty: bool = False) -> Any:
  """obj[name] checked to be of type tp (lists: of strings); ValueError naming it."""
  if name not in obj:
    raise ValueError(f"missing field '{name}'")
  value = obj[name]
  ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
  if ok and tp is list:
    ok = all(isinstance(v, str) for v in value)
  if not ok:
    want = "a list of strings" if tp is list else tp.__name__
    raise ValueError(f"field '{name}': expected {want}, got {json.dumps(value)[:60]}")
  if non_empty and not (value.strip() if isinstance(value, str) else value):
    raise ValueError(f"field '{name}' is empty")
  return value


ANSWER_CHARS = 300  # of each failed answer kept with its reject, for inspection


class Failure(str):
  """Why an item failed, as text (what reject reasons and reports read), carrying the
  start of each answer the model gave and each answer's error.

  A str, so that every {key: reason} map of the stages can hold it beside plain reasons
  (a persona skipped for too little history, a rewrite set aside by a filter).
  """

  answers: tuple[str, ...]
  errors: tuple[str, ...]

  def __new__(cls, reason: str, answers: Sequence[str] = (),
              errors: Sequence[str] = ()) -> Failure:
    self = super().__new__(cls, reason)
    self.answers = tuple(a[:ANSWER_CHARS] for a in answers)
    self.errors = tuple(errors)
    return self


def answers_of(reason: str) -> tuple[str, ...]:
  """The answers a reason carries (a `Failure`'s), else ()."""
  return getattr(reason, "answers", ())


def failure_kind(reason: str) -> str:
  """What kind of failure, with the item's particulars dropped, for counting:
  'invalid answer: not valid JSON', 'invalid answer: field 'label': expected one of
  [...]', 'request failed: HTTP 500', 'near_identical'."""
  errors = getattr(reason, "errors", ())
  if errors:
    return "invalid answer: " + _general(errors[-1])
  head, sep, rest = reason.partition(": ")
  if sep and head.endswith("failed"):
    return f"{head}: {_general(rest)}"
  return _general(head)


def _general(error: str) -> str:
  """'not valid JSON (Expecting value at line 1 column 1)' -> 'not valid JSON';
  "field 'label': expected str, got 5" -> "field 'label': expected str"."""
  error = re.sub(r"\s*\((?:[^()]|\([^()]*\))*\)", "", error)
  return re.split(r",? got |: (?=\S*\d)", error, maxsplit=1)[0].strip()


def object_schema(properties: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """A JSON schema of an object with exactly these properties, all required: the form
  strict structured outputs accept (OpenAI's strict mode requires both)."""
  return {"type": "object", "properties": dict(properties),
          "required": list(properties), "additionalProperties": False}


STRING = {"type": "string"}
STRINGS = {"type": "array", "items": {"type": "string"}}


def schema_text(name: str, schema: Mapping[str, Any]) -> str:
  """ChatRequest.json_schema: canonical JSON of {"name", "schema"} (hashable, and the
  same text for the same schema, so that it keys the request cache)."""
  return json.dumps({"name": name, "schema": schema}, sort_keys=True,
                    separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class JsonItem:
  key: str  # ChatRequest.key, e.g. 'classify/<hash>/<index>'
  prompt: str  # the rendered user message


def ask_json(client: InferenceClient, items: Sequence[JsonItem],
             validate: Callable[[dict[str, Any]], T], *, desc: str,
             schema: Mapping[str, Any] | None = None, max_tokens: int = 512,
             temperature: float = 0.0) -> tuple[dict[str, T], dict[str, str]]:
  """Asks for a JSON answer per item; returns ({key: record}, {key: reject reason}),
  each reason a `Failure` with the answers that failed.

  `schema`: the answer's JSON schema (named after `desc`), sent where the client's
  server takes one; `validate` is the judge of an answer either way.
  """
  json_schema = (schema_text(re.sub(r"\W+", "_", desc).strip("_"), schema)
                 if schema else "")

  def request(key: str, messages: list[dict[str, str]]) -> ChatRequest:
    return ChatRequest(key=key, messages=tuple(messages), temperature=temperature,
                       max_tokens=max_tokens, json_mode=True, json_schema=json_schema)

  def check(text: str) -> T:
    return validate(parse_json_object(text))

  done: dict[str, T] = {}
  failed: dict[str, str] = {}
  retry: list[tuple[JsonItem, str, str]] = []  # (item, bad answer, reason)
  first_requests = [request(i.key, [{"role": "user", "content": i.prompt}])
                    for i in items]
  first = client.chat(first_requests, desc=desc)
  for item, res in zip(items, first):
    if res.text is None:
      failed[item.key] = f"request failed: {res.error}"
      continue
    try:
      done[item.key] = check(res.text)
    except ValueError as e:
      retry.append((item, res.text, str(e)))

  if retry:
    reasks = [request(f"{item.key}/reask", [
        {"role": "user", "content": item.prompt},
        {"role": "assistant", "content": bad},
        {"role": "user", "content": render("reask", reason=reason)}])
              for item, bad, reason in retry]
    second = client.chat(reasks, desc=f"{desc} (re-ask)")
    for (item, bad, reason), res in zip(retry, second):
      if res.text is None:
        failed[item.key] = Failure(
            f"invalid answer ({reason}); re-ask failed: {res.error}", [bad], [reason])
        continue
      try:
        done[item.key] = check(res.text)
      except ValueError as e:
        failed[item.key] = Failure(f"invalid answer ({reason}); after re-ask: {e}",
                                   [bad, res.text], [reason, str(e)])
    # A rejected item's answers leave the cache, so that a re-run asks again (its
    # re-ask is keyed by the first answer, so both go). An item saved by its re-ask
    # keeps both: a re-run then sends nothing for it.
    client.forget([r for r in first_requests + reasks if r.key.removesuffix("/reask")
                   in failed])
  return done, failed
