"""GGUF files (llama.cpp's format) -> LlamaConfig, `llama` params and an HF tokenizer.

A GGUF file holds metadata (shapes, RoPE, tokenizer, chat template) and tensors under
llama.cpp's names, most of them quantized. It is read with the `gguf` package (pure
Python + NumPy, the file memory-mapped) and mapped onto what `hf_io` already knows:

  - metadata -> an HF config.json dict (the registered `families.GgufArchitecture`)
    -> `hf_io.config_from_hf`, so a GGUF model gets the same LlamaConfig and checks as
    its HF original;
  - tensors -> renamed with llama.cpp's own table (`gguf.get_tensor_name_map`, the one
    its converter writes with), dequantized with `gguf.quants.dequantize`, the rows of
    attn_q/attn_k put back in HF order (llama.cpp's converter interleaves the two
    halves of each head for its RoPE kernel) -> `hf_io.load_params`, which checks
    names and shapes and builds each parameter with `jax.make_array_from_callback`
    straight into its target sharding;
  - the tokenizer -> byte-level BPE from the vocabulary, merges, token types and
    pre-tokenizer type, with the file's chat template, as a transformers
    PreTrainedTokenizerFast that `tokenizer.ChatFormatter` uses like any other.

Host memory: every host reads the whole file (memory-mapped) and dequantizes each
tensor once, when a shard of its parameter is first built, keeping it in the params'
dtype until loading ends: about the model's size in that dtype (0.5 GB for
SmolLM2-135M in float32). Fine for the small models GGUF is used for here; large
models should be converted to an HF directory once (`hf_io.save_checkpoint`).

Supported: the general.architecture values registered in `rlhi.models.families`
('llama': Llama 1-3, Mistral, SmolLM, TinyLlama, ...; not its mixture-of-experts
variant; see families/gguf_llama.py), any tensor type `gguf.quants.dequantize`
implements (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K- and IQ-quants),
tokenizer model 'gpt2' (byte-level BPE) with the pre-tokenizers in `PRE_TOKENIZERS`.
Anything else is an error naming the file and the metadata key or tensor.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from rlhi import fileio
from rlhi.models import families
from rlhi.models import hf_io
from rlhi.models import llama

Params = Any

# llama.cpp's GGUF token types (llama_token_type / gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4


def _gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top  (only GGUF users need it)
  except ImportError:
    raise ImportError("reading a .gguf file needs the gguf package: "
                      "pip install gguf") from None
  return gguf


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------


class GgufFile:
  """A parsed GGUF file: metadata as Python values and tensors by name."""

  def __init__(self, path: str):
    reader = _gguf().GGUFReader(path)
    self.path = path
    self.metadata: dict[str, Any] = {
        name: field.contents() for name, field in reader.fields.items()
        if not name.startswith("GGUF.")}
    self.tensors = {t.name: t for t in reader.tensors}

  def get(self, key: str, default: Any = None) -> Any:
    return self.metadata.get(key, default)

  def require(self, key: str) -> Any:
    if key not in self.metadata:
      raise ValueError(f"{self.path}: metadata key {key!r} is missing")
    return self.metadata[key]

  def dequantize(self, name: str) -> np.ndarray:
    """Tensor `name` as float32 in NumPy (row-major, HF) order."""
    gguf = _gguf()
    t = self.tensors[name]
    try:
      x = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise ValueError(
          f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which the gguf "
          f"package ({gguf.__name__} {_version()}) cannot dequantize; supported here: "
          f"the float and quantized types gguf.quants.dequantize implements (F32, F16, "
          f"BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, K- and IQ-quants)") from None
    # GGUF lists dimensions fastest-first (ne0 = the row length).
    return np.asarray(x, np.float32).reshape([int(d) for d in reversed(t.shape)])


def _version() -> str:
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    return importlib.metadata.version("gguf")
  except importlib.metadata.PackageNotFoundError:
    return "unknown version"


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> GgufFile:
  del size, mtime_ns  # Part of the key: a rewritten file is read again.
  return GgufFile(path)


def open_gguf(path: str) -> GgufFile:
  """GgufFile of `path`, parsed once per process (parsing a 49k-token vocabulary takes
  seconds, and config, params and tokenizer each need the file)."""
  if fileio.is_remote(path):
    raise ValueError(f"{path}: GGUF files are read from local disk (memory-mapped); "
                     f"copy it to this host first")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path} not found")
  st = os.stat(path)
  return _open_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------
# Metadata -> LlamaConfig.
# ---------------------------------------------------------------------------


def hf_config(g: GgufFile) -> dict[str, Any]:
  """The HF config.json dict of the model in `g`, by its registered GGUF architecture
  (rlhi.models.families)."""
  arch = g.require("general.architecture")
  return families.for_gguf(arch, g.path).hf_config(g)


def load_config(path: str, **overrides: Any) -> llama.LlamaConfig:
  """LlamaConfig of a GGUF file (overrides: LlamaConfig fields)."""
  g = open_gguf(path)
  return hf_io.config_from_hf(hf_config(g), source=f"{path} (GGUF metadata)",
                              **overrides)


# ---------------------------------------------------------------------------
# Tensors -> params.
# ---------------------------------------------------------------------------


class _Slice:
  """A NumPy array behind safetensors' get_slice interface."""

  def __init__(self, array: np.ndarray):
    self._array = array

  def get_shape(self) -> list[int]:
    return list(self._array.shape)

  def __getitem__(self, idx) -> np.ndarray:
    return self._array[idx]


class GgufSource:
  """The tensors of a GGUF file under HF names, in HF layout (an hf_io.TensorSource).

  Each tensor is dequantized (and un-permuted) on first use and kept in `dtype`.
  """

  def __init__(self, g: GgufFile, config: llama.LlamaConfig):
    self._g = g
    self._config = config
    self._dtype = np.dtype(config.params_dtype)
    arch = g.require("general.architecture")
    self._arch = families.for_gguf(arch, g.path)
    gguf = _gguf()
    name_map = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
        config.num_layers)
    required = hf_io.hf_tensor_names(config)
    self._gguf_names: dict[str, str] = {}     # HF name -> GGUF name
    for hf_name in required + ["lm_head.weight"]:
      gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
      if gguf_name is not None and gguf_name in g.tensors:
        self._gguf_names[hf_name] = gguf_name
      elif hf_name in required:
        raise ValueError(
            f"{g.path}: tensor {gguf_name!r} ({hf_name} in HF terms) is missing; a "
            f"{hf_io.model_type_of(config)} model with {config.num_layers} layers "
            f"(tie_embeddings={config.tie_embeddings}) needs it")
    known = set(self._gguf_names.values())
    for gguf_name in g.tensors:
      if gguf_name not in known:
        raise ValueError(
            f"{g.path}: tensor {gguf_name!r} is not a parameter of a "
            f"{hf_io.model_type_of(config)} model with {config.num_layers} layers "
            f"(tie_embeddings={config.tie_embeddings})")
    self.description = (f"{g.path} (GGUF tensors: "
                        f"{', '.join(sorted(g.tensors)[:4])}, ...)")
    self._cache: dict[str, np.ndarray] = {}

  def locations(self) -> dict[str, str]:
    return {hf: f"{self._g.path} (GGUF tensor {gg!r})"
            for hf, gg in self._gguf_names.items()}

  def get_slice(self, name: str) -> _Slice:
    if name not in self._cache:
      w = self._arch.fix_tensor(name, self._g.dequantize(self._gguf_names[name]),
                                self._config)
      self._cache[name] = w.astype(self._dtype, copy=False)
    return _Slice(self._cache[name])


def load_checkpoint(path: str, config: llama.LlamaConfig | None = None,
                    shardings: Any = None, **config_overrides: Any
                    ) -> tuple[llama.LlamaConfig, Params]:
  """Loads a GGUF file into (config, params), like hf_io.load_checkpoint.

  Args:
    path: the .gguf file.
    config: default `load_config(path, **config_overrides)`.
    shardings: pytree of shardings matching the params; default the first device.
    **config_overrides: LlamaConfig fields (e.g. scan_layers=False).
  """
  g = open_gguf(path)
  if config is None:
    config = load_config(path, **config_overrides)
  return config, hf_io.load_params(GgufSource(g, config), config, shardings)


# ---------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------

# Pre-tokenizer splits by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp applies
# them (its regex_exprs, in order) before byte-level BPE.
_GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
               r"|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    "mpt": (_GPT2_SPLIT,),
    "olmo": (_GPT2_SPLIT,),
    # Digits one by one, then GPT-2's split.
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "codeshell": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}
# llama.cpp takes a pre-token that is itself in the vocabulary whole (Llama 3's
# tokenizer.json says "ignore_merges": true).
_IGNORE_MERGES = {"llama-bpe", "llama3"}


def load_tokenizer(path: str):
  """The tokenizer of a GGUF file as a transformers PreTrainedTokenizerFast."""
  import tokenizers  # pylint: disable=g-import-not-at-top  (heavy)
  from tokenizers import decoders, models, pre_tokenizers, processors  # pylint: disable=g-multiple-import,g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  g = open_gguf(path)
  kind = g.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(
        f"{path}: metadata tokenizer.ggml.model={kind!r} is not supported (expected "
        f"'gpt2', byte-level BPE); give this model an HF tokenizer with "
        f"--config.tokenizer=<directory with tokenizer.json>")
  pre = g.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"{path}: metadata tokenizer.ggml.pre={pre!r} is not supported; "
                     f"expected one of {sorted(PRE_TOKENIZERS)}")
  tokens = g.require("tokenizer.ggml.tokens")
  merges = g.require("tokenizer.ggml.merges")
  types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)

  vocab = {t: i for i, t in enumerate(tokens)}
  bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                   ignore_merges=pre in _IGNORE_MERGES)
  tok = tokenizers.Tokenizer(bpe)
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated")
       for r in PRE_TOKENIZERS[pre]]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) and user-defined ones are matched whole in the
  # text, as llama.cpp does; only control tokens are special (skipped when decoding).
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _CONTROL])
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

  def token(key):
    i = g.get(f"tokenizer.ggml.{key}_token_id")
    return None if i is None else tokens[i]

  bos, eos = token("bos"), token("eos")
  add = [(bos, g.get("tokenizer.ggml.add_bos_token", False)),
         (eos, g.get("tokenizer.ggml.add_eos_token", False))]
  if any(t is not None and on for t, on in add):
    first = [bos] if add[0][1] and bos else []
    last = [eos] if add[1][1] and eos else []
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(first + ["$A"] + last),
        pair=" ".join(first + ["$A"] + last + first + ["$B:1"] + last),
        special_tokens=[(t, vocab[t]) for t in dict.fromkeys(first + last)])
  context = g.get(f"{g.get('general.architecture')}.context_length")
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=token("unknown"),
      pad_token=token("padding"), clean_up_tokenization_spaces=False,
      **({"model_max_length": context} if context else {}))
  fast.chat_template = g.get("tokenizer.chat_template")
  fast.name_or_path = path
  return fast
