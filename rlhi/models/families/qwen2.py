"""Qwen2: HF Qwen2ForCausalLM, Llama plus biases on q/k/v (full attention only)."""

from __future__ import annotations

from typing import Any

from rlhi.models import families
from rlhi.models.families import base
from rlhi.models.llama_config import LlamaConfig


class Qwen2(base.Family):
  name = "qwen2"
  architectures = ("Qwen2ForCausalLM",)
  sizes = {
      # Qwen/Qwen2-7B-Instruct.
      "qwen2_7b": base.NamedSize(
          LlamaConfig(
              vocab_size=152064, hidden_size=3584, intermediate_size=18944,
              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
              rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True,
              max_position_embeddings=32768,
              bos_token_id=151643, eos_token_ids=(151645, 151643),
              param_dtype="bfloat16", dtype="bfloat16"),
          base.TrainDefaults(batch_size=64, mesh=dict(data=1, fsdp=-1, tensor=1),
                             remat_policy="full", max_length=4096,
                             bucket_lengths=(1024, 2048, 4096))),
  }

  def fields_from_hf(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
    layer_types = hf.get("layer_types") or []
    uses_window = hf.get("use_sliding_window", False) and (
        hf.get("max_window_layers", 0) < hf["num_hidden_layers"])
    if "sliding_attention" in layer_types or uses_window:
      base.unsupported(source, "use_sliding_window", True,
                       "false (per-layer windows are not modelled)")
    return dict(qkv_bias=True)

  def represents(self, config: LlamaConfig) -> bool:
    return config.qkv_bias and config.sliding_window is None

  def hf_extra(self, config: LlamaConfig) -> dict[str, Any]:
    return dict(use_sliding_window=False, sliding_window=None,
                max_window_layers=config.num_layers)


families.register(Qwen2())
