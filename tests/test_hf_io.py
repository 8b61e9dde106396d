"""HF checkpoint parity: transformers (torch) models <-> rlhi params."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import safetensors.numpy  # pylint: disable=g-import-not-at-top

from rlhi import sharding  # pylint: disable=g-import-not-at-top
from rlhi.models import hf_io  # pylint: disable=g-import-not-at-top
from rlhi.models import llama  # pylint: disable=g-import-not-at-top

_forward_logits = jax.jit(llama.forward_logits, static_argnums=1)

COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=160,
              num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)


def _llama_model():
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      **COMMON, tie_word_embeddings=False, rope_theta=500_000.0,
      # Small original context so that all three frequency bands occur.
      rope_scaling={"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32})
  return transformers.LlamaForCausalLM(config).eval()


def _qwen2_model():
  torch.manual_seed(1)
  config = transformers.Qwen2Config(**COMMON, tie_word_embeddings=True)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():  # Random init has zero biases; make them matter.
    for layer in model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                   layer.self_attn.v_proj):
        proj.bias.normal_(0.0, 0.5)
  return model


def _mistral_model():
  torch.manual_seed(2)
  config = transformers.MistralConfig(**COMMON, sliding_window=4,
                                      head_dim=16)
  return transformers.MistralForCausalLM(config).eval()


MODELS = {"llama": _llama_model, "qwen2": _qwen2_model,
          "mistral": _mistral_model}


def _batch():
  """Left-padded token batch [3, 12] and its attention mask."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, COMMON["vocab_size"], size=(3, 12))
  mask = np.ones_like(tokens)
  mask[1, :5] = 0
  mask[2, :9] = 0
  tokens[mask == 0] = 0
  return tokens, mask


def _hf_logits(model, tokens, mask):
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens),
                 attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.float().numpy()


def _our_logits(params, config, tokens, mask):
  return np.asarray(_forward_logits(params, config, jnp.asarray(tokens), None,
                                    jnp.asarray(mask)))


def _assert_close(ours, theirs, mask):
  real = mask != 0
  scale = np.abs(theirs[real]).max()
  np.testing.assert_allclose(ours[real] / scale, theirs[real] / scale,
                             atol=1e-4)


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf_checkpoint(request, tmp_path_factory):
  model = MODELS[request.param]()
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return request.param, model, str(path)


def test_load_matches_transformers_logits(hf_checkpoint):
  name, model, path = hf_checkpoint
  config, params = hf_io.load_checkpoint(path)
  assert config.qkv_bias == (name == "qwen2")
  assert config.tie_embeddings == (name == "qwen2")
  assert (config.rope_scaling is not None) == (name == "llama")
  assert config.sliding_window == (4 if name == "mistral" else None)
  tokens, mask = _batch()
  _assert_close(_our_logits(params, config, tokens, mask),
                _hf_logits(model, tokens, mask), mask)


def test_load_sharded_index_into_mesh(tmp_path):
  model = _llama_model()
  model.save_pretrained(tmp_path, max_shard_size="150KB")
  assert os.path.exists(tmp_path / hf_io.INDEX_FILE)
  assert len(list(tmp_path.glob("*.safetensors"))) > 2
  config = hf_io.load_config(str(tmp_path))
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  shardings = sharding.logical_shardings(llama.abstract_params(config), mesh)
  config, params = hf_io.load_checkpoint(str(tmp_path), config,
                                         shardings=shardings)
  q = params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None)
  tokens, mask = _batch()
  _assert_close(_our_logits(params, config, tokens, mask),
                _hf_logits(model, tokens, mask), mask)


def test_load_unscanned_layers(hf_checkpoint):
  _, model, path = hf_checkpoint
  config, params = hf_io.load_checkpoint(path, scan_layers=False)
  assert "layers_2" in params
  tokens, mask = _batch()
  _assert_close(_our_logits(params, config, tokens, mask),
                _hf_logits(model, tokens, mask), mask)


def test_export_loads_in_transformers(hf_checkpoint, tmp_path):
  name, model, path = hf_checkpoint
  config, params = hf_io.load_checkpoint(path)
  out = tmp_path / "export"
  hf_io.save_checkpoint(params, config, str(out), max_shard_size=100_000)
  assert os.path.exists(out / hf_io.INDEX_FILE)
  with open(out / hf_io.CONFIG_FILE) as f:
    assert json.load(f)["model_type"] == name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32).eval()
  assert type(reloaded) is type(model)
  assert reloaded.generation_config.eos_token_id == 2
  tokens, mask = _batch()
  _assert_close(_hf_logits(reloaded, tokens, mask),
                _hf_logits(model, tokens, mask), mask)
  # Tensor names and shapes are exactly HF's.
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  ours = {k: tuple(v.shape) for k, v in reloaded.state_dict().items()}
  assert ours == theirs


def test_random_params_round_trip_through_transformers(tmp_path):
  config = llama.get_config("tiny", num_layers=2, vocab_size=512,
                            bos_token_id=1, eos_token_ids=(2, 3))
  params = llama.init_params(config, jax.random.key(0))
  hf_io.save_checkpoint(params, config, str(tmp_path))
  assert os.path.exists(tmp_path / hf_io.SINGLE_FILE)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32).eval()
  assert model.generation_config.eos_token_id == [2, 3]
  tokens, mask = _batch()
  _assert_close(_our_logits(params, config, tokens, mask),
                _hf_logits(model, tokens, mask), mask)


def test_bfloat16_round_trip(tmp_path):
  config = llama.get_config("tiny", num_layers=2, vocab_size=512)
  params = llama.init_params(config, jax.random.key(0))
  hf_io.save_checkpoint(params, config, str(tmp_path), dtype="bfloat16")
  with open(tmp_path / hf_io.CONFIG_FILE) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  loaded_config, loaded = hf_io.load_checkpoint(str(tmp_path))
  assert loaded_config.param_dtype == "bfloat16"
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(
          np.asarray(a), np.asarray(b.astype(jnp.bfloat16))),
      loaded, params)
  _, as_f32 = hf_io.load_checkpoint(str(tmp_path), param_dtype="float32",
                                    dtype="float32")
  assert as_f32["norm"]["scale"].dtype == jnp.float32


def _single_file_checkpoint(tmp_path):
  config = llama.get_config("tiny", num_layers=1, vocab_size=256)
  params = llama.init_params(config, jax.random.key(0))
  hf_io.save_checkpoint(params, config, str(tmp_path))
  file = str(tmp_path / hf_io.SINGLE_FILE)
  return file, safetensors.numpy.load_file(file)


def test_unknown_tensor_is_an_error(tmp_path):
  file, tensors = _single_file_checkpoint(tmp_path)
  tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2,), np.float32)
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"Unknown tensor "
                     r"'model\.layers\.0\.mlp\.extra\.weight' in .*"
                     r"model\.safetensors"):
    hf_io.load_checkpoint(str(tmp_path))


def test_missing_tensor_is_an_error(tmp_path):
  file, tensors = _single_file_checkpoint(tmp_path)
  del tensors["model.layers.0.self_attn.k_proj.weight"]
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"Missing tensor "
                     r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*"
                     + str(tmp_path)):
    hf_io.load_checkpoint(str(tmp_path))


def test_wrong_shape_is_an_error(tmp_path):
  file, tensors = _single_file_checkpoint(tmp_path)
  tensors["model.norm.weight"] = np.ones((7,), np.float32)
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"'model\.norm\.weight' in .* has "
                     r"shape \(7,\), expected \(256,\)"):
    hf_io.load_checkpoint(str(tmp_path))


def test_llama31_8b_config_json_maps_to_named_config():
  hf = {  # meta-llama/Llama-3.1-8B config.json.
      "architectures": ["LlamaForCausalLM"], "attention_bias": False,
      "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
      "hidden_size": 4096, "intermediate_size": 14336,
      "max_position_embeddings": 131072, "mlp_bias": False,
      "model_type": "llama", "num_attention_heads": 32,
      "num_hidden_layers": 32, "num_key_value_heads": 8,
      "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192,
                       "rope_type": "llama3"},
      "tie_word_embeddings": False, "torch_dtype": "bfloat16",
      "vocab_size": 128256}
  got = hf_io.config_from_hf(hf)
  want = llama.get_config("llama3_8b", eos_token_ids=(128001,))
  assert got == want
  assert hf_io.config_from_hf(hf_io.config_to_hf(want)) == want


def test_unsupported_config_names_the_field():
  with pytest.raises(ValueError, match="config.json: model_type='gpt2'"):
    hf_io.config_from_hf({"model_type": "gpt2"})
  hf = dict(COMMON, model_type="llama", attention_bias=True)
  with pytest.raises(ValueError, match="attention_bias"):
    hf_io.config_from_hf(hf)
  hf = dict(COMMON, model_type="llama",
            rope_scaling={"rope_type": "yarn", "factor": 4.0})
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    hf_io.config_from_hf(hf)


def test_hf_io_does_not_import_torch():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys; import rlhi.models.hf_io; "
          "assert 'torch' not in sys.modules, 'torch imported'")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
