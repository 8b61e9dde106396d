"""What a model family is: the base class every registration subclasses.

A family maps one kind of checkpoint onto `LlamaConfig` and `llama` params:

  - `name`: the HF `model_type` (the registry key); `architectures`: the HF class
    names of config.json's "architectures" (the first is written on export);
  - `config_from_hf` / `config_to_hf`: config.json <-> LlamaConfig fields, with the
    checks that refuse what the model does not implement;
  - `hf_name`: the parameter-name table, our param path (per layer) -> (HF tensor
    name, layout kind); the kinds (a transpose, a heads reshape) are what `hf_io`
    reads and writes;
  - `sizes`: the named sizes it declares (`llama.get_config(name)`), each with the
    training defaults configs/common.py uses for it.

The defaults are the HF Llama layout (config keys and tensor names), which Llama,
Qwen2 and Mistral share; a family overrides what differs. GGUF files get their own,
smaller registration (`GgufArchitecture`): metadata -> an HF config dict of a family,
plus per-tensor fixes.

No jax here (configs/common.py reads the sizes).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Mapping

from rlhi.models.llama_config import LlamaConfig, RopeScaling

# Storage dtypes a checkpoint may declare (hf_io maps them to NumPy types).
DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class TrainDefaults:
  """What suits training a size, so one config file serves a CPU smoke run and a pod
  run (configs/common.py). Pod sizes assume a v5e/v5p slice."""

  batch_size: int
  mesh: Mapping[str, int]
  remat_policy: str
  max_length: int
  bucket_lengths: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class NamedSize:
  """A size by name: its architecture, its training defaults, and, for a released
  model, the weights that training starts from by default (`weights`: a name or path
  `rlhi.models.sources` resolves; '' = random init)."""

  config: LlamaConfig
  train: TrainDefaults
  weights: str = ""


def unsupported(source: str, field: str, value: Any, expected: str):
  raise ValueError(f"{source}: {field}={value!r} is not supported (expected {expected})")


class Family:
  """A model family; subclass, override what differs, `families.register(instance)`."""

  name: ClassVar[str] = ""
  architectures: ClassVar[tuple[str, ...]] = ()
  sizes: ClassVar[Mapping[str, NamedSize]] = {}
  # Checkpoint tensors that are derived buffers, not parameters.
  ignored_tensors: ClassVar[re.Pattern] = re.compile(
      r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r}, architectures={self.architectures})"

  # -- config.json ---------------------------------------------------------------------

  def config_from_hf(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
    """LlamaConfig fields of the HF config dict `hf` (`source` names it in errors)."""
    if hf.get("hidden_act", "silu") != "silu":
      unsupported(source, "hidden_act", hf["hidden_act"], "'silu'")
    self.check_hf(hf, source)
    fields = read_llama_hf(hf, source)
    fields.update(self.fields_from_hf(hf, source))
    return fields

  def check_hf(self, hf: dict[str, Any], source: str) -> None:
    """Refuses what config.json declares and the model does not implement."""

  def fields_from_hf(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
    """LlamaConfig fields of this family beyond the shared Llama keys."""
    del hf, source
    return {}

  def represents(self, config: LlamaConfig) -> bool:
    """Whether this family's config.json represents `config` exactly (export)."""
    del config
    return False

  def config_to_hf(self, config: LlamaConfig) -> dict[str, Any]:
    """LlamaConfig -> HF config.json dict (keys read by transformers, vLLM)."""
    hf = {"architectures": [self.architectures[0]], "model_type": self.name}
    hf.update(llama_hf(config))
    hf.update(self.hf_extra(config))
    return hf

  def hf_extra(self, config: LlamaConfig) -> dict[str, Any]:
    del config
    return {}

  # -- tensor names --------------------------------------------------------------------

  def hf_name(self, path: tuple[str, ...], layer: int | None) -> tuple[str, str]:
    """Our param path (inside layer `layer`, or outside the layers if None) ->
    (HF tensor name, layout kind); kinds: identity, linear (transposed), heads_in,
    heads_in_bias, heads_out (see hf_io)."""
    *modules, leaf = path
    suffix = "bias" if leaf == "bias" else "weight"
    if layer is None:
      if modules == ["lm_head"]:
        return "lm_head.weight", "linear"
      return f"model.{'.'.join(modules)}.{suffix}", "identity"
    name = f"model.layers.{layer}.{'.'.join(modules)}.{suffix}"
    module = modules[-1]
    if module in ("q_proj", "k_proj", "v_proj"):
      kind = "heads_in_bias" if leaf == "bias" else "heads_in"
    elif module == "o_proj":
      kind = "heads_out"
    elif module in ("gate_proj", "up_proj", "down_proj"):
      kind = "linear"
    else:
      kind = "identity"
    return name, kind

  def lm_head_name(self) -> str:
    """The LM head's tensor, which some tied checkpoints still carry."""
    return self.hf_name(("lm_head", "kernel"), None)[0]


# ---------------------------------------------------------------------------
# The HF Llama config.json keys, shared by Llama, Qwen2 and Mistral.
# ---------------------------------------------------------------------------


def read_llama_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
  """LlamaConfig fields from the config.json keys the HF Llama family shares."""
  # transformers >= 5 writes `rope_parameters`; older files (and the Hub's
  # Llama-3 checkpoints) have rope_theta + rope_scaling.
  rope = dict(hf.get("rope_parameters") or {})
  theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
  if not rope or set(rope) <= {"rope_theta", "rope_type"}:
    rope = dict(hf.get("rope_scaling") or rope)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    rope_scaling = None
  elif rope_type == "llama3":
    rope_scaling = RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(
            rope["original_max_position_embeddings"]))
  else:
    unsupported(source, "rope_type", rope_type, "'default' or 'llama3'")

  eos = hf.get("eos_token_id")
  eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  if dtype not in DTYPES:
    unsupported(source, "torch_dtype", dtype, f"one of {sorted(DTYPES)}")
  num_heads = hf["num_attention_heads"]
  return dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      rope_theta=float(theta),
      rope_scaling=rope_scaling,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=False,
      sliding_window=None,
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=eos,
      param_dtype=dtype,
      dtype=dtype,
  )


def llama_hf(config: LlamaConfig) -> dict[str, Any]:
  """The config.json keys the HF Llama family shares, for `config`."""
  rs = config.rope_scaling
  eos = list(config.eos_token_ids)
  return {
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.norm_eps,
      # The pre-v5 layout of the Hub's Llama-3 checkpoints: read by
      # transformers 4.x and 5.x and by vLLM.
      "rope_theta": config.rope_theta,
      "rope_scaling": None if rs is None else {
          "rope_type": "llama3",
          "factor": rs.factor,
          "low_freq_factor": rs.low_freq_factor,
          "high_freq_factor": rs.high_freq_factor,
          "original_max_position_embeddings":
              rs.original_max_position_embeddings,
      },
      "tie_word_embeddings": config.tie_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
      "torch_dtype": config.param_dtype,
      "initializer_range": config.init_std,
      "use_cache": True,
  }


# ---------------------------------------------------------------------------
# GGUF.
# ---------------------------------------------------------------------------


class GgufArchitecture:
  """A GGUF `general.architecture`: its metadata as an HF config dict of a registered
  family, and the fixes that put llama.cpp's tensors back in HF layout.

  `g` is an `rlhi.models.gguf_io.GgufFile` (get, require, tensors, path).
  """

  name: ClassVar[str] = ""

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r})"

  def hf_config(self, g: Any) -> dict[str, Any]:
    raise NotImplementedError

  def fix_tensor(self, hf_name: str, w: Any, config: LlamaConfig) -> Any:
    """The dequantized tensor `hf_name` in HF layout."""
    del hf_name, config
    return w
