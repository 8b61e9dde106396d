"""The model-family registry: a newcomer's family is one module plus a registration.

The toy family below ("toyllama") is a Llama whose config.json uses other key names
and whose tensors live under other names. Written as a module file and imported, as a
newcomer would, it must make `config_from_hf`, `hf_io.load_checkpoint`,
`sources.load_checkpoint` and `builder` read such a checkpoint into the same model as
the Llama-registered original: same params, same logits.
"""

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import safetensors.numpy

from configs import common
from rlhi.models import builder
from rlhi.models import families
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.models import sources

TOY_MODULE = textwrap.dedent('''
    """ToyLlama: config.json says n_embd, n_layer, ...; tensors are transformer.h.<i>.*"""
    from rlhi.models import families
    from rlhi.models.families import base
    from rlhi.models.llama_config import LlamaConfig


    class ToyLlama(base.Family):
      name = "toyllama"
      architectures = ("ToyLlamaForCausalLM",)
      sizes = {"toy_micro": base.NamedSize(
          LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16),
          base.TrainDefaults(batch_size=2, mesh=dict(data=1, fsdp=-1, tensor=1),
                             remat_policy="none", max_length=64,
                             bucket_lengths=(32, 64)))}

      def config_from_hf(self, hf, source):
        return dict(vocab_size=hf["n_vocab"], hidden_size=hf["n_embd"],
                    intermediate_size=hf["n_inner"], num_layers=hf["n_layer"],
                    num_heads=hf["n_head"], num_kv_heads=hf["n_kv_head"],
                    head_dim=hf["n_embd"] // hf["n_head"],
                    rope_theta=float(hf["rope_base"]), norm_eps=float(hf["eps"]),
                    tie_embeddings=bool(hf["tied"]))

      def hf_name(self, path, layer):
        name, kind = super().hf_name(path, layer)
        return (name.replace("model.layers.", "transformer.h.")
                .replace("model.", "transformer."), kind)


    families.register(ToyLlama())
''')

CONFIG = llama.get_config("tiny", num_layers=2, vocab_size=256, hidden_size=64,
                          intermediate_size=128, num_heads=4, num_kv_heads=2,
                          head_dim=16)


def _toy_config_json(config: llama.LlamaConfig) -> dict:
  return {"architectures": ["ToyLlamaForCausalLM"], "model_type": "toyllama",
          "n_vocab": config.vocab_size, "n_embd": config.hidden_size,
          "n_inner": config.intermediate_size, "n_layer": config.num_layers,
          "n_head": config.num_heads, "n_kv_head": config.num_kv_heads,
          "rope_base": config.rope_theta, "eps": config.norm_eps,
          "tied": config.tie_embeddings}


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
  """Imports the toy family's module from a file; unregisters it afterwards."""
  module_dir = tmp_path / "newcomer"
  module_dir.mkdir()
  (module_dir / "toyllama_family.py").write_text(TOY_MODULE)
  monkeypatch.syspath_prepend(str(module_dir))
  module = importlib.import_module("toyllama_family")
  yield module
  families.unregister("toyllama")
  sys.modules.pop("toyllama_family", None)


@pytest.fixture
def checkpoints(tmp_path):
  """(Llama checkpoint dir, the same weights as a toyllama dir, params). The toy dir is
  made by hand from the Llama one: tensors renamed, config.json rewritten."""
  params = llama.init_params(CONFIG, jax.random.key(0))
  llama_dir, toy_dir = str(tmp_path / "llama"), str(tmp_path / "toy")
  hf_io.save_checkpoint(params, CONFIG, llama_dir)
  tensors = safetensors.numpy.load_file(os.path.join(llama_dir, hf_io.SINGLE_FILE))
  assert "model.layers.1.self_attn.q_proj.weight" in tensors
  renamed = {k.replace("model.layers.", "transformer.h.").replace("model.",
                                                                  "transformer."): v
             for k, v in tensors.items()}
  os.makedirs(toy_dir)
  safetensors.numpy.save_file(renamed, os.path.join(toy_dir, hf_io.SINGLE_FILE))
  with open(os.path.join(toy_dir, hf_io.CONFIG_FILE), "w") as f:
    json.dump(_toy_config_json(CONFIG), f)
  return llama_dir, toy_dir, params


def _logits(params, config):
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % config.vocab_size
  return np.asarray(llama.forward_logits(params, config, tokens))


def test_toy_config_json_maps_to_the_llama_config(toy_family):
  del toy_family
  got = hf_io.config_from_hf(_toy_config_json(CONFIG), scan_layers=False)
  assert got == dataclasses.replace(CONFIG, scan_layers=False)
  # Found by its architecture name alone, too.
  hf = dict(_toy_config_json(CONFIG))
  del hf["model_type"]
  assert hf_io.config_from_hf(hf) == CONFIG
  assert families.get("toyllama").architectures == ("ToyLlamaForCausalLM",)


def test_toy_checkpoint_loads_as_the_llama_original(toy_family, checkpoints):
  del toy_family
  llama_dir, toy_dir, params = checkpoints
  toy_config, toy_params = hf_io.load_checkpoint(toy_dir)
  llama_config, llama_params = hf_io.load_checkpoint(llama_dir)
  assert toy_config == llama_config == CONFIG
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               toy_params, params)
  np.testing.assert_array_equal(_logits(toy_params, toy_config),
                                _logits(llama_params, llama_config))
  # Every place that takes a model: sources, and the builder behind config.model.
  spec = builder.ModelSpec(init=toy_dir, scan_layers=False)
  config = builder.model_config(spec)
  assert config == dataclasses.replace(CONFIG, scan_layers=False)
  unscanned = builder.init_params(spec, config, None)
  np.testing.assert_allclose(_logits(unscanned, config), _logits(params, CONFIG),
                             rtol=1e-5, atol=1e-5)
  _, via_sources = sources.load_checkpoint(toy_dir)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               via_sources, params)


def test_toy_family_names_its_own_tensors_in_errors(toy_family, checkpoints, tmp_path):
  del toy_family
  _, toy_dir, _ = checkpoints
  file = os.path.join(toy_dir, hf_io.SINGLE_FILE)
  tensors = safetensors.numpy.load_file(file)
  del tensors["transformer.h.1.mlp.up_proj.weight"]
  tensors["model.norm.weight"] = tensors["transformer.norm.weight"]  # a Llama name
  safetensors.numpy.save_file(tensors, file)
  with pytest.raises(ValueError, match=r"Unknown tensor 'model\.norm\.weight' .*"
                     r"not a parameter of a toyllama model"):
    hf_io.load_checkpoint(toy_dir)
  del tensors["model.norm.weight"]
  safetensors.numpy.save_file(tensors, file)
  with pytest.raises(ValueError, match=r"Missing tensor "
                     r"'transformer\.h\.1\.mlp\.up_proj\.weight'"):
    hf_io.load_checkpoint(toy_dir)


def test_toy_family_declares_named_sizes(toy_family):
  del toy_family
  assert llama.get_config("toy_micro").hidden_size == 32
  assert "toy_micro" in families.named_sizes()


def test_unregistered_architecture_names_it_and_the_registered_ones(checkpoints):
  _, toy_dir, _ = checkpoints
  expected = (r"model_type='toyllama' \(architectures=\['ToyLlamaForCausalLM'\]\) is "
              r"not supported; registered families: llama \(LlamaForCausalLM\), "
              r"mistral \(MistralForCausalLM\), qwen2 \(Qwen2ForCausalLM\)")
  with pytest.raises(ValueError, match="config.json: " + expected):
    hf_io.config_from_hf(_toy_config_json(CONFIG))
  with pytest.raises(ValueError, match=r"toy/config\.json: " + expected):
    hf_io.load_checkpoint(toy_dir)
  with pytest.raises(ValueError, match=expected):
    builder.model_config(builder.ModelSpec(init=toy_dir))


def test_registration_refuses_clashes(toy_family):
  with pytest.raises(ValueError, match="registered already"):
    families.register(toy_family.ToyLlama())

  class Clash(families.Family):
    name = "clash"
    architectures = ("LlamaForCausalLM",)

  with pytest.raises(ValueError, match=r"architecture \['LlamaForCausalLM'\] belongs "
                     r"to Llama\('llama'"):
    families.register(Clash())
  assert "clash" not in families.registered()


def test_export_picks_the_family_that_represents_the_config():
  assert hf_io.model_type_of(CONFIG) == "llama"
  assert hf_io.model_type_of(dataclasses.replace(CONFIG, qkv_bias=True)) == "qwen2"
  assert hf_io.model_type_of(dataclasses.replace(CONFIG, sliding_window=8)) == "mistral"
  with pytest.raises(ValueError, match="qkv_bias with sliding_window has no HF "
                     "equivalent"):
    hf_io.model_type_of(dataclasses.replace(CONFIG, qkv_bias=True, sliding_window=8))
  hf = hf_io.config_to_hf(llama.get_config("qwen2_7b"))
  assert (hf["architectures"], hf["model_type"]) == (["Qwen2ForCausalLM"], "qwen2")


def test_sizes_are_declared_once():
  sizes = families.named_sizes()
  assert tuple(sizes) == llama.CONFIG_NAMES == tuple(common._SIZES)  # pylint: disable=protected-access
  assert llama.get_config("llama3_70b") == sizes["llama3_70b"].config
  assert common.train_config("llama3_70b", steps=8, lr=1e-5).mesh.tensor == 4
  # configs/common.py (and the data-prep configs) take them without importing jax.
  code = ("import sys, configs.common, configs.data_prep; "
          "assert 'jax' not in sys.modules, 'jax imported'")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
