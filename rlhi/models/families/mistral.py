"""Mistral: HF MistralForCausalLM, Llama plus a sliding attention window (v0.1)."""

from __future__ import annotations

from typing import Any

from rlhi.models import families
from rlhi.models.families import base
from rlhi.models.families import llama3
from rlhi.models.llama_config import LlamaConfig


class Mistral(base.Family):
  name = "mistral"
  architectures = ("MistralForCausalLM",)

  def check_hf(self, hf: dict[str, Any], source: str) -> None:
    llama3.check_no_biases(hf, source)

  def fields_from_hf(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
    return dict(sliding_window=hf.get("sliding_window"))

  def represents(self, config: LlamaConfig) -> bool:
    return not config.qkv_bias and config.sliding_window is not None

  def hf_extra(self, config: LlamaConfig) -> dict[str, Any]:
    return dict(sliding_window=config.sliding_window)


families.register(Mistral())
