"""The `local` inference backend: rlhi's own model answers the data pipeline's and the
UserEval judge's chat requests, in this process, through the KV-cache sampler.

It lives outside `rlhi.data`, which never imports jax-side code; importing this module
registers it with `rlhi.data.client.make_client` (experiments/prepare_data.py and
rlhi.eval do). This module itself imports no jax: `rlhi.generate` is imported when a
client is built.

    import rlhi.local_backend  # registers backend='local'
    cfg.client.backend, cfg.client.checkpoint = "local", "smollm2"
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

from rlhi.data import client as client_lib
from rlhi.models import sources


class LocalClient(client_lib.InferenceClient):
  """rlhi's own model through the sampler. Requests are grouped by sampling
  parameters and generated `batch_size` rows at a time; each batch's answers are
  reported (and cached) as it finishes. `seed` (default 0) makes a sample
  reproducible, as for a server."""

  kind = "local"

  def __init__(self, checkpoint: str, tokenizer: str = "", *, batch_size: int = 16):
    super().__init__()
    from rlhi import generate  # pylint: disable=g-import-not-at-top  (jax: when built)
    self.checkpoint = checkpoint  # a model name of rlhi.models.sources
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self._generator = generate.ChatGenerator(checkpoint, tokenizer,
                                             batch_size=batch_size)
    where = sources.absolute(sources.resolve(checkpoint).path)  # a name: its file
    self.name = f"local (rlhi sampler, checkpoint {where})"

  def cache_identity(self) -> dict[str, Any]:
    path, stamp = sources.weights_stamp(self.checkpoint)
    return {"backend": self.kind, "checkpoint": path, "tokenizer": self.tokenizer,
            "weights": stamp}

  def _answer(self, requests: Sequence[client_lib.ChatRequest],
              on_result: client_lib.OnResult) -> None:
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(requests):
      groups[(r.temperature, r.top_p, r.max_tokens, r.seed or 0)].append(i)
    for (temperature, top_p, max_tokens, seed), idx in groups.items():
      for start in range(0, len(idx), self.batch_size):
        batch = idx[start:start + self.batch_size]
        try:
          gens = self._generator.generate(
              [[dict(m) for m in requests[i].messages] for i in batch],
              max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
              seed=seed + start)
        except Exception as e:  # pylint: disable=broad-except  (reported per request)
          detail = " ".join(str(e).split())[:300]
          for i in batch:
            on_result(i, client_lib.ChatResult(
                key=requests[i].key, text=None,
                error=f"local generation failed: {type(e).__name__}: {detail}"))
          continue
        # As a server's usage: the stage reports and stats() count the tokens spent.
        self._count(sent=len(batch),
                    prompt_tokens=sum(g.prompt_tokens for g in gens),
                    completion_tokens=sum(g.completion_tokens for g in gens))
        for i, g in zip(batch, gens):
          on_result(i, client_lib.ChatResult(
              key=requests[i].key, text=g.text, prompt_tokens=g.prompt_tokens,
              completion_tokens=g.completion_tokens, attempts=1))


def _make(values: dict[str, Any]) -> LocalClient:
  if not values["checkpoint"]:
    raise ValueError("client config: backend='local' needs 'checkpoint' (an HF "
                     "checkpoint directory, e.g. <sft workdir>/hf, a .gguf file or "
                     "'smollm2')")
  return LocalClient(values["checkpoint"], values["tokenizer"],
                     batch_size=values["local_batch_size"])


client_lib.register_backend("local", _make)
