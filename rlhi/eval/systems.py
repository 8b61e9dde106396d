"""UserEval systems: what answers each target turn.

Kinds (config.systems.a / .b):
  original     the WildChat assistant answer that followed the turn.
  checkpoint   an HF-format checkpoint directory (an rlhi export such as <workdir>/hf, or
               a released model) generating with rlhi.generate.ChatGenerator. With
               `with_persona=True` the user's persona goes into the system slot
               through `system_template` (persona-guided inference), so "checkpoint"
               and "checkpoint + persona" are two systems.
  answers      a JSONL file of {"item_id", "text"} lines: answers made elsewhere (a vLLM
               server, a hosted model) for the items in usereval_items.jsonl.

An answer record (usereval_generations.jsonl, one per system and item):

    {"system": "a" | "b", "label", "fingerprint", "item_id", "text" or None,
     "error" or None, "prompt_tokens", "completion_tokens", "finished"}

`fingerprint` hashes everything the answer depends on (kind, path, weights' sizes and
times, tokenizer, persona and template, generation settings), so a re-run reuses the
answers of the same system and generates only what is missing; generated answers are
appended as each batch finishes, so a crashed run resumes where it stopped.

Paths (checkpoints, answers files, the file appended to) may be local or remote
(gs://...; see rlhi.fileio).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tqdm

from rlhi import fileio
from rlhi.data import items as items_lib
from rlhi.data import schema
from rlhi.models import sources

KINDS = ("original", "checkpoint", "answers")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  max_new_tokens: int = 512
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  batch_size: int = 8
  max_prompt_tokens: int = 0  # 0: the model's max_position_embeddings - max_new_tokens
  system_template: str = schema.PERSONA_TEMPLATE

  @classmethod
  def from_config(cls, gen: Mapping[str, Any], system_template: str
                  ) -> GenerationSettings:
    fields = {f.name for f in dataclasses.fields(cls)} - {"system_template"}
    given = dict(gen)
    unknown = sorted(set(given) - fields)
    if unknown:
      raise ValueError(f"config.generation: unknown field(s) {unknown}; known: "
                       f"{sorted(fields)}")
    if "{persona}" not in system_template:
      raise ValueError(f"config.system_template must contain '{{persona}}', got "
                       f"{system_template!r}")
    out = cls(**given, system_template=system_template)
    if out.max_new_tokens < 1 or out.batch_size < 1:
      raise ValueError(f"config.generation: max_new_tokens ({out.max_new_tokens}) and "
                       f"batch_size ({out.batch_size}) must be positive")
    return out


@dataclasses.dataclass(frozen=True)
class System:
  key: str  # 'a' or 'b'
  kind: str
  path: str = ""
  with_persona: bool = False  # persona-guided inference (checkpoint only)
  tokenizer: str = ""  # checkpoint: '' = the checkpoint's own
  name: str = ""  # the label in reports; '' = made from kind, path and with_persona

  @classmethod
  def from_config(cls, key: str, cfg: Mapping[str, Any]) -> System:
    where = f"config.systems.{key}"
    given = dict(cfg)
    fields = {f.name for f in dataclasses.fields(cls)} - {"key"}
    unknown = sorted(set(given) - fields)
    if unknown:
      raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    system = cls(key=key, **given)
    if system.kind not in KINDS:
      raise ValueError(f"{where}.kind: expected one of {KINDS}, got {system.kind!r}")
    if system.kind in ("checkpoint", "answers") and not system.path:
      what = ("an HF checkpoint directory (e.g. <train_dpo workdir>/hf)"
              if system.kind == "checkpoint" else "a JSONL file of {item_id, text}")
      raise ValueError(f"{where}.path is empty; kind={system.kind!r} needs {what}")
    if system.kind == "checkpoint":
      try:
        src = sources.resolve(system.path)
      except FileNotFoundError as e:  # a registered name whose package is missing
        raise FileNotFoundError(f"{where}.path: {e}") from None
      found = (fileio.exists(src.path) if src.kind == sources.GGUF
               else fileio.isdir(src.path))
      if not found:
        raise FileNotFoundError(
            f"{where}.path: {system.path} not found (expected an HF checkpoint "
            f"directory with config.json, a .gguf file, or one of "
            f"{sorted(sources.NAMED)})")
    if system.kind == "answers" and (not fileio.exists(system.path)
                                     or fileio.isdir(system.path)):
      raise FileNotFoundError(f"{where}.path: {system.path} not found (expected a JSONL "
                              f"file of {{\"item_id\", \"text\"}} lines)")
    if system.with_persona and system.kind != "checkpoint":
      raise ValueError(f"{where}.with_persona=True needs kind='checkpoint' (only a "
                       f"model can be given the persona), got kind={system.kind!r}")
    return system

  @property
  def label(self) -> str:
    if self.name:
      return self.name
    if self.kind == "original":
      return "original (WildChat answer)"
    if self.kind == "checkpoint" and self.path in sources.NAMED:
      return self.path + (" + persona" if self.with_persona else "")
    short = "/".join(pathlib.PurePosixPath(sources.absolute(self.path)).parts[-2:])
    if self.kind == "answers":
      return f"answers {short}"
    return short + (" + persona" if self.with_persona else "")

  def describe(self) -> dict[str, Any]:
    return {"label": self.label, "kind": self.kind,
            "path": sources.absolute(self.path) if self.path else "",
            "with_persona": self.with_persona, "tokenizer": self.tokenizer}


def fingerprint(system: System, gen: GenerationSettings) -> str:
  ident: dict[str, Any] = {"kind": system.kind}
  if system.kind == "checkpoint":
    path, weights = sources.weights_stamp(system.path)
    ident.update(
        # Key 'persona' (not with_persona): the fingerprints of earlier runs' answers
        # stay the same, so they are still reused.
        path=path, tokenizer=system.tokenizer, persona=system.with_persona,
        weights=weights,
        template=gen.system_template if system.with_persona else "",
        generation=dataclasses.asdict(dataclasses.replace(gen, system_template="")))
  elif system.kind == "answers":
    ident["sha256"] = hashlib.sha256(fileio.read_bytes(system.path)).hexdigest()
  return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _record(system: System, fp: str, item_id: str, text: str | None,
            error: str | None = None, **extra: Any) -> dict[str, Any]:
  return {"system": system.key, "label": system.label, "fingerprint": fp,
          "item_id": item_id, "text": text, "error": error,
          "prompt_tokens": extra.get("prompt_tokens", 0),
          "completion_tokens": extra.get("completion_tokens", 0),
          "finished": extra.get("finished", text is not None)}


def read_records(path: str) -> tuple[list[dict[str, Any]], list[schema.Reject]]:
  """The records of a JSONL file; lines that are not JSON objects become rejects."""
  records, rejects = [], []
  if not fileio.exists(path):
    return records, rejects
  for line, obj, reject in schema.iter_json_lines(path):
    if reject is not None:
      rejects.append(reject)
    elif not isinstance(obj, dict):
      rejects.append(schema.Reject(path, line, "schema", "expected a JSON object",
                                   raw=json.dumps(obj)[:200]))
    else:
      records.append(obj)
  return records, rejects


def _answers_file(system: System, fp: str, todo: Sequence[items_lib.EvalItem]
                  ) -> tuple[list[dict[str, Any]], list[schema.Reject]]:
  records, rejects = read_records(system.path)
  texts: dict[str, str] = {}
  for i, r in enumerate(records, start=1):
    if not isinstance(r.get("item_id"), str) or not isinstance(r.get("text"), str):
      rejects.append(schema.Reject(system.path, i, "schema",
                                   "expected string fields 'item_id' and 'text'",
                                   raw=json.dumps(r)[:200]))
    elif r["item_id"] in texts:
      rejects.append(schema.Reject(system.path, i, "duplicate_item",
                                   f"a second answer for {r['item_id']}; the first is "
                                   f"used", key=r["item_id"]))
    else:
      texts[r["item_id"]] = r["text"]
  out = [_record(system, fp, it.item_id, texts.get(it.item_id),
                 None if it.item_id in texts else f"no answer for this item in "
                 f"{system.path}") for it in todo]
  return out, rejects


class Answerer:
  """Answers items for systems; holds loaded models so that one checkpoint used by
  both systems (with and without persona) is loaded once."""

  def __init__(self, gen: GenerationSettings, mesh_axes: Mapping[str, int] | None = None):
    self.gen = gen
    self.mesh_axes = dict(mesh_axes or {"fsdp": -1})
    self._generators: dict[tuple[str, str], Any] = {}
    self._remote_appends: dict[str, bytes] = {}  # remote path -> its whole content

  def _generator(self, system: System):
    key = (sources.absolute(system.path), system.tokenizer)
    if key not in self._generators:
      from rlhi import generate  # pylint: disable=g-import-not-at-top  (jax: lazily)
      self._generators[key] = generate.ChatGenerator(
          system.path, system.tokenizer, batch_size=self.gen.batch_size,
          mesh_axes=self.mesh_axes)
    return self._generators[key]

  def answer(self, system: System, items: Sequence[items_lib.EvalItem],
             previous: Iterable[Mapping[str, Any]] = (), *,
             append_to: str | None = None
             ) -> tuple[dict[str, dict[str, Any]], list[schema.Reject]]:
    """({item_id: record}, rejects of an answers file) for `items`.

    Records of `previous` with this system's fingerprint and a text are reused. New
    checkpoint generations are appended to `append_to` (when given) batch by batch.
    """
    fp = fingerprint(system, self.gen)
    wanted = {it.item_id for it in items}
    done = {r["item_id"]: dict(r, system=system.key, label=system.label)
            for r in previous
            if r.get("fingerprint") == fp and r.get("item_id") in wanted
            and isinstance(r.get("text"), str)}
    todo = [it for it in items if it.item_id not in done]
    rejects: list[schema.Reject] = []
    if system.kind == "original":
      new = [_record(system, fp, it.item_id, it.original,
                     None if it.original is not None else
                     "no original answer: the conversation ends with this user message")
             for it in todo]
    elif system.kind == "answers":
      new, rejects = _answers_file(system, fp, todo)
    else:
      new = self._generate(system, fp, todo, append_to)
    done.update((r["item_id"], r) for r in new)
    return done, rejects

  def _generate(self, system: System, fp: str, todo: Sequence[items_lib.EvalItem],
                append_to: str | None) -> list[dict[str, Any]]:
    if not todo:
      return []
    generator = self._generator(system)
    limit = self.gen.max_prompt_tokens or (
        generator.config.max_position_embeddings - self.gen.max_new_tokens)
    out, ready = [], []
    for it in todo:
      messages = it.chat()
      if system.with_persona and it.persona:
        messages = [{"role": "system",
                     "content": self.gen.system_template.format(persona=it.persona)}
                    ] + messages
      n = len(generator.fmt.encode(messages).prompt_ids)
      if n > limit:
        out.append(_record(system, fp, it.item_id, None,
                           f"prompt_too_long: {n} tokens > {limit} (set "
                           f"config.generation.max_prompt_tokens or use a model with a "
                           f"longer context)", prompt_tokens=n))
      else:
        ready.append((it, messages))
    chunk = self.gen.batch_size * 4  # appended to disk every `chunk` answers
    from rlhi import sharding  # pylint: disable=g-import-not-at-top  (jax: lazily)
    bar = tqdm.tqdm(total=len(ready), desc=f"answers {system.key}", unit="answer",
                    disable=not ready or not sharding.is_main_process())
    for start in range(0, len(ready), chunk):
      part = ready[start:start + chunk]
      gens = generator.generate(
          [m for _, m in part], max_new_tokens=self.gen.max_new_tokens,
          temperature=self.gen.temperature, top_p=self.gen.top_p,
          seed=self.gen.seed + start, progress=bar)
      new = [_record(system, fp, it.item_id, g.text, prompt_tokens=g.prompt_tokens,
                     completion_tokens=g.completion_tokens, finished=g.finished)
             for (it, _), g in zip(part, gens)]
      if append_to:
        self._append(append_to, "".join(schema.dumps(r) + "\n" for r in new))
      out.extend(new)
    bar.close()
    return out

  def _append(self, path: str, text: str) -> None:
    """Appends `text` to the file `path`.

    An object store cannot append: the file's content is kept here (read once, at the
    first append) and uploaded whole after each append, so a crashed run still resumes
    from what was uploaded.
    """
    if not fileio.is_remote(path):
      with open(path, "a", encoding="utf-8") as f:
        f.write(text)
      return
    if path not in self._remote_appends:
      self._remote_appends[path] = (fileio.read_bytes(path) if fileio.exists(path)
                                    else b"")
    self._remote_appends[path] += text.encode("utf-8")
    fileio.write_bytes(path, self._remote_appends[path])
