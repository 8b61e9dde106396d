"""GGUF general.architecture 'llama' (llama.cpp's): Llama 1-3, Mistral, SmolLM,
TinyLlama, ...; not its mixture-of-experts variant. Read as an HF 'llama' config."""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhi.models import families
from rlhi.models.families import base
from rlhi.models.llama_config import LlamaConfig


class GgufLlama(base.GgufArchitecture):
  name = "llama"
  hf_model_type = "llama"

  def hf_config(self, g: Any) -> dict[str, Any]:
    """The HF config.json dict of the model in `g` (keys as transformers writes them)."""
    arch = self.name

    def key(name):
      return f"{arch}.{name}"

    def unsupported(name, value, expected):
      raise ValueError(f"{g.path}: metadata {key(name)}={value!r} is not supported "
                       f"(expected {expected})")

    for name in ("block_count", "embedding_length", "feed_forward_length",
                 "attention.head_count", "attention.head_count_kv"):
      value = g.get(key(name))
      if value is not None and not isinstance(value, int):
        unsupported(name, value, "one integer for all layers")
    if g.get(key("expert_count"), 0):
      unsupported("expert_count", g.get(key("expert_count")),
                  "0: mixture-of-experts layers are not modelled")
    hidden = g.require(key("embedding_length"))
    heads = g.require(key("attention.head_count"))
    head_dim = g.get(key("attention.key_length"), hidden // heads)
    if g.get(key("attention.value_length"), head_dim) != head_dim:
      unsupported("attention.value_length", g.get(key("attention.value_length")),
                  f"the key length {head_dim}")
    if g.get(key("rope.dimension_count"), head_dim) != head_dim:
      unsupported("rope.dimension_count", g.get(key("rope.dimension_count")),
                  f"the head size {head_dim}: partial rotary embeddings are not "
                  f"modelled")
    scaling = g.get(key("rope.scaling.type"), "none")
    if scaling != "none" and g.get(key("rope.scaling.factor"), 1.0) != 1.0:
      unsupported("rope.scaling.type", scaling, "'none'")
    if "rope_freqs.weight" in g.tensors:
      raise ValueError(f"{g.path}: tensor 'rope_freqs.weight' (Llama-3.1 style RoPE "
                       f"scaling stored as per-frequency factors) is not supported")

    tokens = g.get("tokenizer.ggml.tokens")
    vocab = g.get(key("vocab_size"))
    if vocab is None and tokens is not None:
      vocab = len(tokens)
    if vocab is None and "token_embd.weight" in g.tensors:
      vocab = int(g.tensors["token_embd.weight"].shape[1])
    if vocab is None:
      raise ValueError(f"{g.path}: the vocabulary size is not stated: no metadata "
                       f"{key('vocab_size')!r} or 'tokenizer.ggml.tokens', no tensor "
                       f"'token_embd.weight'")
    # End of turn / of message too: an instruct model stops on them.
    eos = [g.get(f"tokenizer.ggml.{k}_token_id")
           for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    return {
        "model_type": self.hf_model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": g.require(key("feed_forward_length")),
        "num_hidden_layers": g.require(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": g.get(key("attention.head_count_kv"), heads),
        "head_dim": head_dim,
        "rope_theta": float(g.get(key("rope.freq_base"), 10_000.0)),
        "rms_norm_eps": float(g.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
        "max_position_embeddings": g.get(key("context_length"), 2048),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        # Dequantized values are float32; pass param_dtype/dtype to store less.
        "torch_dtype": "float32",
    }

  def fix_tensor(self, hf_name: str, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
    if ".self_attn.q_proj." in hf_name:
      return unpermute_rope_rows(w, config.num_heads)
    if ".self_attn.k_proj." in hf_name:
      return unpermute_rope_rows(w, config.num_kv_heads)
    return w


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`.

  The converter reorders the rows of q_proj (n_head = heads) and k_proj (n_head =
  kv heads), per head, from HF's [first half; second half] of the rotary pairs to
  interleaved pairs; this puts them back. Works on weights [rows, in] and biases.
  """
  half = w.shape[0] // n_head // 2
  return (w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


families.register_gguf(GgufLlama())
