r"""Tokenizers and chat formatting in token space.

`load_tokenizer(name)` gives an HF `transformers` tokenizer:
  - 'bundled' (the default everywhere): a byte-level BPE of 4,096 tokens trained on the
    bundled sample and shipped in rlhi/models/assets/bundled_tokenizer/, with a Llama-3
    style chat template whose system slot carries the persona. Offline, no download.
  - a local directory or an HF hub id with its own chat template (Llama 3.x, Qwen2...).
  - a GGUF model, by registered name (`smollm2`) or .gguf path (`rlhi.models.sources`):
    the tokenizer and chat template stored in the file (`gguf_io.load_tokenizer`).
  - a remote directory (gs://..., any path etils.epath supports): its tokenizer files
    (not the weights beside them) are copied to a local temporary directory first.
    `save_tokenizer(tok, path)` writes to a local or remote directory.

`ChatFormatter` turns (system, messages, completion) into token ids such that
`prompt_ids + completion_ids` equals the tokenization of the whole conversation rendered
by the chat template, with exactly one BOS and the completion ending in the end-of-turn
token. It renders the template twice (with and without the answer) and checks that the
prompt is a token prefix of the whole, rather than concatenating separately tokenized
pieces: BPE merges across a boundary would otherwise make training see token sequences
that generation never produces.

Rebuild the bundled tokenizer (after changing the sample):

  python -m rlhi.models.tokenizer --rebuild_bundled
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

from rlhi import fileio
from rlhi.models import sources

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUNDLED_DIR = os.path.join(ASSETS, "bundled_tokenizer")
BUNDLED_VOCAB_SIZE = 4096

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
HEADER_START, HEADER_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, HEADER_START, HEADER_END, EOT)

# No text between a header and the content: the pieces then meet at special tokens,
# where BPE never merges.
BUNDLED_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
    "{% endif %}")


# Files of a checkpoint directory that are not the tokenizer's: not copied from a remote
# directory (an HF checkpoint keeps its tokenizer next to gigabytes of weights).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                    ".gguf", ".onnx", ".safetensors.index.json", ".bin.index.json")


def _is_tokenizer_file(name: str) -> bool:
  return not name.endswith(_WEIGHT_SUFFIXES)


def load_tokenizer(name: str = "bundled"):
  """'bundled', a local or remote (gs://...) HF tokenizer directory, an HF hub id, or
  a GGUF model (registered name or .gguf path)."""
  import transformers  # pylint: disable=g-import-not-at-top  (heavy)
  path = BUNDLED_DIR if name == "bundled" else name
  if name != "bundled" and sources.is_gguf(name):
    from rlhi.models import gguf_io  # pylint: disable=g-import-not-at-top  (jax)
    tok = gguf_io.load_tokenizer(sources.resolve(name).path)
    tok.name_or_path = name
    if tok.chat_template is None:
      raise ValueError(f"tokenizer {name!r}: the GGUF file has no "
                       f"tokenizer.chat_template; rlhi formats conversations with it "
                       f"(set config.tokenizer to an HF tokenizer directory)")
    return tok
  if name == "bundled" and not os.path.exists(os.path.join(path, "tokenizer.json")):
    raise FileNotFoundError(f"{path}/tokenizer.json missing: run "
                            f"python -m rlhi.models.tokenizer --rebuild_bundled")
  if fileio.is_remote(path):
    if not fileio.isdir(path):
      raise FileNotFoundError(f"tokenizer {name!r}: no such directory")
    # transformers reads local files only. The tokenizer holds everything it needs
    # once loaded (tokenizer.json, or a sentencepiece model in memory), so the
    # temporary copy can go.
    with fileio.local_input(path, include=_is_tokenizer_file) as local:
      tok = transformers.AutoTokenizer.from_pretrained(local)
    tok.name_or_path = name
  else:
    tok = transformers.AutoTokenizer.from_pretrained(path)
  if tok.chat_template is None:
    raise ValueError(f"tokenizer {name!r} has no chat template; rlhi formats "
                     f"conversations with it (set tokenizer.chat_template)")
  return tok


@functools.lru_cache(maxsize=8)
def cached_tokenizer(name: str = "bundled"):
  return load_tokenizer(name)


def save_tokenizer(tokenizer, path: str) -> None:
  """tokenizer.save_pretrained(path) for a local or remote (gs://...) directory."""
  with fileio.local_output(path, is_dir=True) as local:
    tokenizer.save_pretrained(local)


@dataclasses.dataclass(frozen=True)
class Encoded:
  prompt_ids: list[int]
  completion_ids: list[int]  # ends with the end-of-turn token; empty if no completion


class ChatFormatter:
  """Chat messages -> token ids with the tokenizer's own chat template."""

  def __init__(self, tokenizer, system_template: str = "{persona}"):
    self.tok = tokenizer
    self.system_template = system_template
    self.eot_id = self._end_of_turn_id()
    self.pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                   else self.eot_id)

  def _end_of_turn_id(self) -> int:
    """The special token the chat template writes right after an assistant answer."""
    text = self.tok.apply_chat_template(
        [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}],
        tokenize=False)
    after = text[text.rindex("pong") + len("pong"):]
    special = set(self.tok.all_special_ids) | {
        i for i, t in self.tok.added_tokens_decoder.items() if t.special}
    for i in self.tok(after, add_special_tokens=False)["input_ids"]:
      if i in special:
        return i
    if self.tok.eos_token_id is None:
      raise ValueError("chat template writes no special token after an answer and the "
                       "tokenizer has no EOS token: generation could not stop")
    return self.tok.eos_token_id

  @property
  def stop_ids(self) -> tuple[int, ...]:
    ids = {self.eot_id}
    if self.tok.eos_token_id is not None:
      ids.add(self.tok.eos_token_id)
    return tuple(sorted(ids))

  def messages(self, messages: Sequence[dict[str, str]], persona: str | None = None
               ) -> list[dict[str, str]]:
    """Prepends the persona as the system message (when given)."""
    out = [dict(role=m["role"], content=m["content"]) for m in messages]
    if persona:
      out = [{"role": "system",
              "content": self.system_template.format(persona=persona)}] + out
    return out

  def _ids(self, messages: list[dict[str, str]], add_generation_prompt: bool
           ) -> list[int]:
    text = self.tok.apply_chat_template(messages, tokenize=False,
                                        add_generation_prompt=add_generation_prompt)
    # The template writes BOS itself; add_special_tokens=False avoids a second one.
    return self.tok(text, add_special_tokens=False)["input_ids"]

  def encode(self, messages: Sequence[dict[str, str]], completion: str | None = None,
             persona: str | None = None) -> Encoded:
    """Prompt (ending in the assistant header) and completion ids.

    `messages` ends with a user message. With `completion`, the completion ids are the
    tokens the whole conversation adds after the prompt, cut after the end-of-turn
    token (templates such as Qwen's add a newline after it).
    """
    msgs = self.messages(messages, persona)
    prompt = self._ids(msgs, add_generation_prompt=True)
    if completion is None:
      return Encoded(prompt, [])
    full = self._ids(msgs + [{"role": "assistant", "content": completion}],
                     add_generation_prompt=False)
    if full[:len(prompt)] != prompt:
      raise ValueError(
          "chat template: the prompt's tokens are not a prefix of the whole "
          "conversation's tokens, so prompt/completion cannot be split in token space; "
          "use a tokenizer whose template has no text between the assistant header "
          "and the content that BPE could merge across")
    rest = full[len(prompt):]
    if self.eot_id not in rest:
      raise ValueError("chat template: no end-of-turn token after the completion")
    return Encoded(prompt, rest[:rest.index(self.eot_id) + 1])

  def encode_follow_ups(self, messages: Sequence[dict[str, str]], answer: str,
                        follow_ups: Sequence[str], persona: str | None = None
                        ) -> tuple[list[int], list[list[int]]]:
    """Shared prefix and one continuation per user follow-up to `answer`.

    The conversation `messages` + the assistant's `answer` + a user turn `follow_ups[i]`
    is rendered whole; the prefix is what all renderings share (at least the
    conversation through the answer's end-of-turn, and the user header), each
    continuation the rest of its user turn through its end-of-turn token. Scores of
    continuations are then comparable: they follow the same tokens.
    """
    msgs = self.messages(messages, persona) + [{"role": "assistant", "content": answer}]
    through = self._ids(msgs, add_generation_prompt=False)
    fulls = [self._ids(msgs + [{"role": "user", "content": f}],
                       add_generation_prompt=False) for f in follow_ups]
    if not fulls or any(f[:len(through)] != through for f in fulls):
      raise ValueError("chat template: a follow-up's tokens do not extend the "
                       "conversation's; the follow-up cannot be scored in token space")
    n = len(through)
    while all(len(f) > n + 1 and f[n] == fulls[0][n] for f in fulls):
      n += 1
    rests = []
    for f in fulls:
      rest = f[n:]
      if self.eot_id not in rest:
        raise ValueError("chat template: no end-of-turn token after a user follow-up")
      rests.append(rest[:rest.index(self.eot_id) + 1])
    return fulls[0][:n], rests

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------------------
# Building the bundled tokenizer.
# ----------------------------------------------------------------------------------------


def _sample_texts() -> list[str]:
  from rlhi.data import wildchat  # pylint: disable=g-import-not-at-top
  texts = []
  with open(wildchat.SAMPLE_ROWS, encoding="utf-8") as f:
    for line in f:
      texts.extend(m["content"] for m in json.loads(line)["conversation"])
  refs = os.path.join(wildchat.SAMPLES_DIR, "reference_annotations.jsonl")
  with open(refs, encoding="utf-8") as f:
    texts.extend(json.loads(line)["response"] for line in f)
  return texts


def build_bundled(out_dir: str = BUNDLED_DIR, vocab_size: int = BUNDLED_VOCAB_SIZE
                  ) -> None:
  """Trains the byte-level BPE on the sample and saves it as an HF tokenizer dir."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-multiple-import,g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(_sample_texts(), trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
      model_max_length=8192, clean_up_tokenization_spaces=False)
  fast.chat_template = BUNDLED_CHAT_TEMPLATE
  fast.save_pretrained(out_dir)


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  if sys.argv[1:] != ["--rebuild_bundled"]:
    sys.exit("usage: python -m rlhi.models.tokenizer --rebuild_bundled")
  build_bundled()
  print(f"wrote {BUNDLED_DIR}")
