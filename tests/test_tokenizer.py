"""Chat formatting in token space, checked against an independent rendering."""

import pytest
import tokenizers
import transformers

from rlhi.models import tokenizer as tok_lib

CONV = [
    {"role": "user", "content": "how do i reverse a list in python"},
    {"role": "assistant", "content": "Use `xs[::-1]` or `xs.reverse()`."},
    {"role": "user", "content": "shorter pls, code only\n"},
]
ANSWER = "xs[::-1]"


@pytest.fixture(scope="module")
def tok():
  return tok_lib.load_tokenizer("bundled")


def _by_hand(messages, completion, persona):
  """The documented format, written out independently of the jinja template."""
  text = "<|begin_of_text|>"
  if persona:
    text += f"<|start_header_id|>system<|end_header_id|>Persona: {persona}<|eot_id|>"
  for m in messages:
    text += (f"<|start_header_id|>{m['role']}<|end_header_id|>"
             f"{m['content'].strip()}<|eot_id|>")
  prompt = text + "<|start_header_id|>assistant<|end_header_id|>"
  return prompt, prompt + completion + "<|eot_id|>"


@pytest.mark.parametrize("persona", [None, "Terse Python developer; code only."])
@pytest.mark.parametrize("n", [1, 3])
def test_prompt_plus_completion_is_the_whole_conversation(tok, persona, n):
  raw = tokenizers.Tokenizer.from_file(f"{tok_lib.BUNDLED_DIR}/tokenizer.json")
  fmt = tok_lib.ChatFormatter(tok, system_template="Persona: {persona}")
  enc = fmt.encode(CONV[:n], ANSWER, persona=persona)
  prompt_text, full_text = _by_hand(CONV[:n], ANSWER, persona)
  full = raw.encode(full_text, add_special_tokens=False).ids
  assert enc.prompt_ids + enc.completion_ids == full
  assert enc.prompt_ids == raw.encode(prompt_text, add_special_tokens=False).ids
  assert full.count(tok.bos_token_id) == 1 and full[0] == tok.bos_token_id
  assert enc.completion_ids[-1] == fmt.eot_id == tok.convert_tokens_to_ids("<|eot_id|>")
  assert fmt.decode(enc.completion_ids) == ANSWER


def test_prompt_only(tok):
  fmt = tok_lib.ChatFormatter(tok)
  enc = fmt.encode(CONV)
  assert enc.completion_ids == []
  assert tok.decode(enc.prompt_ids).endswith("<|start_header_id|>assistant<|end_header_id|>")


def test_bundled_vocab_matches_the_tiny_model(tok):
  assert len(tok) == tok_lib.BUNDLED_VOCAB_SIZE


def test_a_chatml_template_with_trailing_newline(tok, tmp_path):
  # Qwen-style: '<|im_end|>\n' after every turn; the completion must stop at im_end.
  raw = tokenizers.Tokenizer.from_file(f"{tok_lib.BUNDLED_DIR}/tokenizer.json")
  raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                                              pad_token="<|pad|>")
  fast.chat_template = (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  fast.save_pretrained(tmp_path)
  fmt = tok_lib.ChatFormatter(tok_lib.load_tokenizer(str(tmp_path)))
  enc = fmt.encode(CONV, ANSWER)
  assert enc.completion_ids[-1] == fmt.eot_id == fast.convert_tokens_to_ids("<|im_end|>")
  assert fmt.decode(enc.completion_ids) == ANSWER


def test_missing_chat_template_is_a_clear_error(tmp_path):
  raw = tokenizers.Tokenizer.from_file(f"{tok_lib.BUNDLED_DIR}/tokenizer.json")
  transformers.PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="no chat template"):
    tok_lib.load_tokenizer(str(tmp_path))
