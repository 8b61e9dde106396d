"""The shape and numerics of a Llama-family decoder, without jax.

`LlamaConfig` is what every model family maps its checkpoints onto and what the
named sizes (`rlhi.models.families`) are. No jax or flax at import: configs/common.py
takes the named sizes from here, and the data-preparation configs that import it stay
jax-free. `rlhi.models.llama` re-exports everything.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 ("llama3") RoPE frequency scaling, as in HF `rope_parameters`."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


REMAT_POLICIES = (
    "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a Llama-family decoder.

  Frozen and hashable: it is a static argument of jitted functions.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  # Bias on q/k/v projections only (Qwen2); o_proj never has one.
  qkv_bias: bool = False
  # Mistral v0.1 style: a query sees at most this many most recent keys.
  sliding_window: int | None = None
  max_position_embeddings: int = 2048
  # Token ids carried along for HF export and the sampler's defaults.
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  init_std: float = 0.02
  # Numerics and performance switches; they do not change the parameters'
  # meaning, only their storage dtype or how the graph is built.
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  # Reshape activations to [batch*length, features] around matmuls. XLA:CPU
  # runs the backward of dots on 3-D activations slowly; None = on iff the
  # default backend is CPU.
  flatten_dense: bool | None = None
  # Training passes (no KV cache) attend by blocks of this many query rows and
  # skip keys after each block (`dot_product_attention`); exact. With the LM head on
  # response targets only, the tiny DPO step at 512 tokens takes 0.84x of the dense
  # one on CPU (docs/bench_dpo.md). None = one dense [T, S] block.
  attention_block: int | None = 128

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"LlamaConfig.num_heads={self.num_heads} must be a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"LlamaConfig.remat_policy={self.remat_policy!r}; expected one of "
          f"{REMAT_POLICIES}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even")
    if self.attention_block is not None and self.attention_block <= 0:
      raise ValueError(f"LlamaConfig.attention_block={self.attention_block} must be "
                       f"positive, or None for one dense block")
    if isinstance(self.eos_token_ids, list):
      object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

  # jax is imported when a model is built, not when a config is declared.
  @property
  def compute_dtype(self):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp.dtype(self.param_dtype)

  @property
  def flatten(self) -> bool:
    if self.flatten_dense is None:
      import jax  # pylint: disable=g-import-not-at-top
      return jax.default_backend() == "cpu"
    return self.flatten_dense
