"""Chat generation from an rlhi / HF checkpoint or a GGUF model: messages in, text out.

`checkpoint` is anything `rlhi.models.sources` resolves: an HF directory, a .gguf file
or a registered name such as `smollm2`; the model is built by `rlhi.models.builder`, as
training builds it from `config.model`.

Used by the `local` inference-client backend (rlhi/data/client/), so the data stages
can run against rlhi's own model, and by persona-guided inference: put the persona in
the system message of the conversation (`ChatFormatter.messages(..., persona=...)`).

Prompts are tokenized with the checkpoint's chat template, left-padded to a multiple of
`prompt_multiple` and generated in fixed-size batches, so the sampler compiles once per
(prompt bucket, new-token bucket) rather than per request.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from rlhi import sampling
from rlhi import sharding
from rlhi.models import builder
from rlhi.models import llama
from rlhi.models import tokenizer as tok_lib


@dataclasses.dataclass(frozen=True)
class Generation:
  text: str
  prompt_tokens: int
  completion_tokens: int
  finished: bool  # ended with a stop token (False: cut at the token limit)


def _bucket(n: int, minimum: int = 16) -> int:
  """Next power of two >= n: a few compiled output sizes instead of one per request."""
  size = minimum
  while size < n:
    size *= 2
  return size


class ChatGenerator:
  """Holds a model, its tokenizer and a mesh; generates replies to conversations."""

  def __init__(self, checkpoint: str, tokenizer: str = "", *,
               batch_size: int = 16, prompt_multiple: int = 64,
               mesh_axes: Mapping[str, int] | None = None,
               system_template: str = "{persona}"):
    self.mesh = sharding.make_mesh(dict(mesh_axes or {"fsdp": -1}))
    self.tok = tok_lib.load_tokenizer(tokenizer or checkpoint)
    self.fmt = tok_lib.ChatFormatter(self.tok, system_template)
    # Unscanned: decoding slices every layer's weights each step otherwise.
    spec = builder.ModelSpec(init=checkpoint, scan_layers=False)
    self.config = builder.model_config(spec)
    shardings = sharding.logical_shardings(llama.abstract_params(self.config), self.mesh)
    self.params = builder.init_params(spec, self.config, shardings)
    self.batch_size = batch_size
    self.prompt_multiple = prompt_multiple

  def generate(self, conversations: Sequence[Sequence[Mapping[str, str]]], *,
               max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int = 0, progress: Any = None
               ) -> list[Generation]:
    """One reply per conversation (each ends with a user message). `progress`: a tqdm
    bar (or anything with `update(n)`), advanced by each batch's replies."""
    prompts = [self.fmt.encode(list(c)).prompt_ids for c in conversations]
    out: list[Generation] = []
    key = jax.random.PRNGKey(seed)
    width = _bucket(max_new_tokens)
    for start in range(0, len(prompts), self.batch_size):
      chunk = prompts[start:start + self.batch_size]
      rows = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # fixed batch shape
      tokens, lengths = sampling.left_pad(rows, self.fmt.pad_id,
                                          multiple=self.prompt_multiple)
      with sharding.use_mesh(self.mesh):
        res = sampling.generate(
            self.params, self.config, tokens, lengths, jax.random.fold_in(key, start),
            max_new_tokens=width, temperature=temperature, top_k=top_k, top_p=top_p,
            stop_token_ids=self.fmt.stop_ids,
            max_new_per_row=np.full(len(rows), max_new_tokens, np.int32),
            pad_id=self.fmt.pad_id)
      # The rows are sharded over the mesh, across hosts on a pod slice: every
      # process takes part in the gather and gets every reply.
      res = sharding.to_host(res)
      for i, prompt in enumerate(chunk):
        n = int(res.lengths[i])
        ids = [int(t) for t in res.tokens[i, :n]]
        finished = bool(ids) and ids[-1] in self.fmt.stop_ids
        out.append(Generation(text=self.fmt.decode(ids).strip(),
                              prompt_tokens=len(prompt), completion_tokens=n,
                              finished=finished))
      if progress is not None:
        progress.update(len(chunk))
    return out


class Chat:
  """One conversation with history: `say(text)` returns the reply. The oldest exchanges
  are dropped when prompt + reply no longer fit the model's context; `reset()` forgets
  the history. Turn i samples with seed `seed + i` (greedy at temperature 0)."""

  def __init__(self, gen: ChatGenerator, *, persona: str = "", max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
    self.gen, self.persona, self.max_new_tokens = gen, persona, max_new_tokens
    self.temperature, self.top_p, self.seed = temperature, top_p, seed
    self.history: list[dict[str, str]] = []
    self.turn = 0

  def reset(self) -> None:
    self.history = []

  def _fit(self, history: list[dict[str, str]]) -> list[dict[str, str]]:
    limit = self.gen.config.max_position_embeddings - self.max_new_tokens
    while len(history) > 1:
      messages = self.gen.fmt.messages(history, persona=self.persona or None)
      if len(self.gen.fmt.encode(messages).prompt_ids) <= limit:
        break
      history = history[2:] if len(history) > 2 else history[1:]
    return history

  def say(self, text: str) -> Generation:
    """The reply to `text` after the history (both then join the history)."""
    self.history = self._fit(self.history + [{"role": "user", "content": text}])
    messages = self.gen.fmt.messages(self.history, persona=self.persona or None)
    out = self.gen.generate([messages], max_new_tokens=self.max_new_tokens,
                            temperature=self.temperature, top_p=self.top_p,
                            seed=self.seed + self.turn)[0]
    self.history.append({"role": "assistant", "content": out.text})
    self.turn += 1
    return out
