r"""How often a model's answers parse, per structured-output mode: classify and persona on
the bundled sample against a running OpenAI-compatible server.

    # transformers serve (ignores response_format: its parse rate is the model's own)
    transformers serve /tmp/smollm2_hf --port 8000 --device cpu &
    python bench/parse_rate.py --base_url http://127.0.0.1:8000/v1 \
        --model /tmp/smollm2_hf --modes none

    # llama.cpp's server (llama-cpp-python[server]) constrains decoding to the schema
    python -m llama_cpp.server --model $(python -c 'from rlhi.models import sources; \
        print(sources.named_file("smollm2"))') --port 8001 &
    python bench/parse_rate.py --base_url http://127.0.0.1:8001/v1 --model smollm2 \
        --modes none,json_object,json_object_schema

    # rlhi's own sampler in this process (backend='local'; no constrained decoding)
    python bench/parse_rate.py --backend local --checkpoint smollm2 --modes none

`/tmp/smollm2_hf` is SmolLM2 exported by rlhi (`python bench/parse_rate.py
--export_smollm2 /tmp/smollm2_hf`). Per mode: items asked, parsed at the first answer,
parsed after the one re-ask, rejected, and the most common kind of failure with the
model's answer, as markdown. Rewrites (free text, not JSON) are asked for the first
`--rewrites` actionable target follow-ups with the sample's hand-written labels and
personas, so that their rate does not depend on classify's; "parsed" there means the
rewrite passed the stage's checks (rlhi/data/rewrites.py quality_reason).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# pylint: disable=wrong-import-position
from configs import data_prep
from rlhi.data import classify
from rlhi.data import client as client_lib
from rlhi.data import persona
from rlhi.data import rewrites
from rlhi.data import files
from rlhi.data import pipeline
from rlhi.data import prompting
from rlhi.data import schema


def export_smollm2(path: str) -> None:
  from rlhi.models import hf_io  # pylint: disable=g-import-not-at-top  (jax)
  from rlhi.models import sources  # pylint: disable=g-import-not-at-top
  from rlhi.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  config, params = sources.load_checkpoint("smollm2")
  hf_io.save_checkpoint(params, config, path)
  tok_lib.save_tokenizer(tok_lib.load_tokenizer("smollm2"), path)


class Counting(client_lib.InferenceClient):
  """Passes requests on, keeping the keys of those it was asked."""

  def __init__(self, inner):
    super().__init__()
    self.inner, self.kind, self.name = inner, inner.kind, inner.name
    self.keys: list[str] = []

  def _answer(self, requests, on_result):
    self.keys += [r.key for r in requests]
    self.inner._answer(requests, on_result)  # pylint: disable=protected-access

  def close(self):
    self.inner.close()


def row(stage: str, mode: str, keys: list[str], done: dict, failed: dict) -> list:
  reasked = {k.removesuffix("/reask") for k in keys if k.endswith("/reask")}
  asked = len(done) + len(failed)
  first = sum(k not in reasked for k in done)
  kinds = collections.Counter(prompting.failure_kind(r) for r in failed.values())
  top = ""
  if kinds:
    kind, n = kinds.most_common(1)[0]
    example = next(r for r in failed.values() if prompting.failure_kind(r) == kind)
    said = prompting.answers_of(example)
    top = f"{kind} ({n}): {said[-1][:80]!r}" if said else f"{kind} ({n})"
  return [stage, mode, asked, f"{first} ({first / max(1, asked):.0%})",
          f"{len(done) - first}", f"{len(failed)}", top.replace("|", "\\|")]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--base_url", default="")
  p.add_argument("--model", default="")
  p.add_argument("--modes", default="none,json_object,json_schema")
  p.add_argument("--follow_ups", type=int, default=24, help="classify items")
  p.add_argument("--users", type=int, default=4, help="persona items")
  p.add_argument("--rewrites", type=int, default=0, help="rewrite items")
  p.add_argument("--backend", default="openai", choices=("openai", "local"))
  p.add_argument("--checkpoint", default="smollm2", help="--backend local: the model")
  p.add_argument("--export_smollm2", default="",
                 help="write SmolLM2 as an HF directory here, then exit")
  a = p.parse_args()
  if a.export_smollm2:
    export_smollm2(a.export_smollm2)
    return
  with tempfile.TemporaryDirectory() as sample:
    cfg = data_prep.get_config("sample")
    for stage in ("ingest", "classify", "persona"):  # reference annotations
      pipeline.run_stage(stage, cfg, sample)
    conversations = schema.read_jsonl(os.path.join(sample, files.CONVERSATIONS),
                                      schema.Conversation)
    users = schema.read_jsonl(os.path.join(sample, files.USERS), schema.User)
    follow_ups = schema.read_jsonl(os.path.join(sample, files.FOLLOW_UPS),
                                   schema.FollowUp)
    personas = {p.user_id: p for p in schema.read_jsonl(
        os.path.join(sample, files.PERSONAS), schema.Persona)}
  to_rewrite = [f for f in follow_ups if f.actionable and f.part == "target"
                ][:a.rewrites]
  # Conversations until `follow_ups` follow-ups; users with enough history.
  chosen, n = [], 0
  for c in conversations:
    if n >= a.follow_ups:
      break
    chosen.append(c)
    n += len(c.follow_up_indices())
  defaults = data_prep.get_config()
  ccfg = classify.ClassifyConfig.from_config(defaults.classify.to_dict())
  pcfg = persona.PersonaConfig.from_config(dict(
      defaults.persona.to_dict(), max_conversations=4, max_chars_per_conversation=1500))
  with_history = [u for u in users if len(u.history) >= pcfg.min_history][:a.users]
  rcfg = rewrites.RewriteConfig.from_config(defaults.rewrites.to_dict())
  if a.backend == "local":
    importlib.import_module("rlhi.local_backend")  # registers backend='local' (jax)

  rows = []
  for mode in a.modes.split(","):
    client_cfg = client_lib.default_config()
    client_cfg.base_url, client_cfg.model = a.base_url, a.model
    client_cfg.backend, client_cfg.checkpoint = a.backend, a.checkpoint
    if a.backend == "local":
      mode = "none (local)"  # rlhi's sampler does not constrain decoding
      client_cfg.structured_output = "none"
    else:
      client_cfg.structured_output = mode
    client_cfg.timeout_s = 600.0
    client_cfg.concurrency = 1
    t0 = time.perf_counter()
    with Counting(client_lib.make_client(client_cfg)) as client:
      labels, failed = classify.classify(client, chosen, users, ccfg)
      rows.append(row("classify", mode, client.keys,
                      {classify.item_key(f.conversation_hash, f.message_index): f
                       for f in labels}, failed))
      client.keys = []
      cards, skipped = persona.infer_personas(client, with_history, conversations, pcfg)
      failed = {k: v for k, v in skipped.items() if v.startswith(("invalid", "request"))}
      rows.append(row("persona", mode, client.keys,
                      {persona.item_key(c.user_id): c for c in cards},
                      {persona.item_key(k): v for k, v in failed.items()}))
      if to_rewrite:
        client.keys = []
        pairs, failed = rewrites.make_pairs(client, to_rewrite, conversations,
                                            personas, rcfg)
        rows.append(row("rewrites", mode, client.keys,
                        {rewrites.item_key(p.conversation_hash, p.message_index + 1): p
                         for p in pairs}, failed))
      stats = client.inner.stats()
    print(f"{mode}: {time.perf_counter() - t0:.0f} s, {stats['sent']} requests, "
          f"{stats['completion_tokens']} completion tokens", flush=True)
  print()
  print("| stage | structured_output | items | parsed at once | parsed after re-ask | "
        "rejected | most common failure (count): the model's last answer |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print("| " + " | ".join(str(c) for c in r) + " |")


if __name__ == "__main__":
  main()
