"""Sharded forward and sampling on 8 simulated devices equal unsharded."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhi import sampling
from rlhi import sharding
from rlhi.models import llama

CONFIG = llama.get_config("tiny", num_layers=2, hidden_size=128,
                          intermediate_size=256, num_heads=4, num_kv_heads=2,
                          head_dim=32, vocab_size=512, eos_token_ids=(),
                          init_std=0.1)
MESHES = [{"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 4, "tensor": 2}]

_forward_logits = jax.jit(llama.forward_logits, static_argnums=1)


@pytest.fixture(scope="module")
def params():
  return llama.init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def inputs():
  tokens, lengths = sampling.left_pad(
      [[5, 6, 7], [1, 2, 3, 4, 5, 6], [9, 9], [3, 1, 4, 1, 5]], length=8)
  segments = (np.arange(8)[None] >= (8 - lengths)[:, None]).astype(np.int32)
  return tokens, lengths, segments


def test_eight_devices():
  assert jax.device_count() == 8


def test_make_mesh_sizes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8,
                                              "tensor": 1}
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh({"data": 3, "tensor": 2})
  with pytest.raises(ValueError, match="Unknown mesh axes"):
    sharding.make_mesh({"model": 8})
  with pytest.raises(ValueError, match="At most one"):
    sharding.make_mesh({"data": -1, "fsdp": -1})


def test_rules_fall_back_when_a_dim_does_not_divide():
  mesh = sharding.make_mesh({"tensor": 8})
  # 2 kv heads cannot be split 8 ways: replicated; 4096 vocab can.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"),
                                  (128, 2, 32), mesh) == P("fsdp", None, None)
  assert sharding.logical_to_spec(("vocab", "embed"), (512, 128),
                                  mesh) == P("tensor", "fsdp")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  # batch -> (data, fsdp) needs 4 | batch; for 2 the fallback is data.
  assert sharding.logical_to_spec(("batch", "length"), (2, 16),
                                  mesh) == P("data", None)
  assert sharding.logical_to_spec(("batch", "length"), (8, 16),
                                  mesh) == P(("data", "fsdp"), None)


@pytest.mark.parametrize("axes", MESHES, ids=str)
def test_params_are_sharded(params, axes):
  mesh = sharding.make_mesh(axes)
  shardings = sharding.logical_shardings(llama.abstract_params(CONFIG), mesh)
  sharded = sharding.shard_params(params, shardings)
  layer = sharded["layers"]
  assert layer["self_attn"]["q_proj"]["kernel"].sharding.spec == P(
      None, "fsdp", "tensor", None)
  assert layer["self_attn"]["o_proj"]["kernel"].sharding.spec == P(
      None, "tensor", None, "fsdp")
  assert layer["mlp"]["down_proj"]["kernel"].sharding.spec == P(
      None, "tensor", "fsdp")
  assert sharded["embed_tokens"]["embedding"].sharding.spec == P(
      "tensor", "fsdp")
  assert sharded["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
  # Each device holds only its shard.
  kernel = layer["mlp"]["gate_proj"]["kernel"]
  shard_shape = kernel.addressable_shards[0].data.shape
  assert shard_shape == (2, 128 // mesh.shape["fsdp"],
                         256 // mesh.shape["tensor"])


@pytest.mark.parametrize("axes", MESHES, ids=str)
def test_init_params_directly_sharded(params, axes):
  mesh = sharding.make_mesh(axes)
  shardings = sharding.logical_shardings(llama.abstract_params(CONFIG), mesh)
  sharded = llama.init_params(CONFIG, jax.random.key(0), shardings)
  for a, b, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(params),
                     jax.tree.leaves(shardings)):
    np.testing.assert_array_equal(a, b)
    assert a.sharding.is_equivalent_to(s, a.ndim)
  q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)


@pytest.mark.parametrize("axes", MESHES, ids=str)
def test_sharded_forward_equals_unsharded(params, inputs, axes):
  tokens, _, segments = inputs
  want = _forward_logits(params, CONFIG, tokens, None, segments)
  mesh = sharding.make_mesh(axes)
  shardings = sharding.logical_shardings(llama.abstract_params(CONFIG), mesh)
  sharded = sharding.shard_params(params, shardings)
  with sharding.use_mesh(mesh):
    got = jax.jit(llama.forward_logits, static_argnums=1)(
        sharded, CONFIG, tokens, None, segments)
  real = segments != 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real],
                             rtol=1e-5, atol=1e-5)
  # The activations follow the rules: batch split 4 ways over (data, fsdp),
  # vocab 2 ways over tensor.
  assert got.sharding.shard_shape(got.shape) == (1, 8, 256)


@pytest.mark.parametrize("axes", MESHES, ids=str)
def test_sharded_sampling_equals_unsharded(params, inputs, axes):
  tokens, lengths, _ = inputs
  kwargs = dict(max_new_tokens=6, temperature=np.array([0.0, 1.0, 0.7, 1.0]),
                top_k=np.array([0, 0, 20, 0]))
  want = sampling.generate(params, CONFIG, tokens, lengths,
                           jax.random.key(3), **kwargs)
  mesh = sharding.make_mesh(axes)
  shardings = sharding.logical_shardings(llama.abstract_params(CONFIG), mesh)
  sharded = sharding.shard_params(params, shardings)
  with sharding.use_mesh(mesh):
    got = sampling.generate(sharded, CONFIG, tokens, lengths,
                            jax.random.key(3), **kwargs)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)


def test_sharding_rules_from_the_config(tmp_path):
  """config.sharding_rules: () keeps the defaults; a MaxText-style override given on the
  command line reaches the trained state's layout; a bad mesh axis names the rule."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from rlhi.train import loop  # pylint: disable=g-import-not-at-top
  from tests import test_train_core  # pylint: disable=g-import-not-at-top

  assert sharding.rules_from_config(()) is sharding.DEFAULT_RULES
  argv = ["x", "--config=configs/sft.py:tiny",
          "--config.sharding_rules=(('batch', ['data', 'fsdp']), ('embed', None))"]
  values = absl_flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                           sys_argv=argv)
  values(argv)
  rules = sharding.rules_from_config(holder.value.sharding_rules)
  assert rules == (("batch", ("data", "fsdp")), ("embed", None))
  with pytest.raises(ValueError, match=r"config.sharding_rules\[1\].*'model'"):
    sharding.rules_from_config((("batch", "data"), ("embed", "model")))

  # The toy task's one parameter has logical axis `embed`: sharded over fsdp by the
  # defaults, replicated under a config that maps `embed` to nothing.
  layouts = {}
  for name, value in (("default", ()), ("replicated", (("embed", None),))):
    cfg = test_train_core.toy_config(total_steps=2)
    cfg.mesh = dict(data=4, fsdp=2, tensor=1)  # fsdp divides w's 2 entries
    cfg.sharding_rules = value
    result = loop.train(cfg, str(tmp_path / name), test_train_core.toy_task())
    layouts[name] = result.state.params["w"].sharding.spec
  assert layouts["default"] == jax.sharding.PartitionSpec("fsdp")
  assert layouts["replicated"] == jax.sharding.PartitionSpec(None)


def test_batches_and_reference_follow_the_rules_in_context():
  """inputs.host_batches shards rows as the rules that `use_mesh` set say (evaluation
  inside the training loop); reference.compute under other rules gives the same
  log-probs."""
  from rlhi import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  from rlhi.train import reference  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  rng = np.random.default_rng(0)
  examples = [dict(prompt_ids=rng.integers(1, 500, 5), chosen_ids=rng.integers(1, 500, 3),
                   rejected_ids=rng.integers(1, 500, 4), pair_id=str(i), user_id="u")
              for i in range(8)]
  custom = (("batch", "data"),)
  specs = {}
  for name, rules in (("default", sharding.DEFAULT_RULES), ("custom", custom)):
    with sharding.use_mesh(mesh, rules):
      batch, _ = next(inputs_lib.host_batches(examples, batch_size=8, pad_id=0,
                                              bucket_lengths=(16,), mesh=mesh))
    specs[name] = batch["chosen_tokens"].sharding.spec[0]
  assert specs == {"default": ("data", "fsdp"), "custom": "data"}

  params = llama.init_params(CONFIG, jax.random.key(1))
  args = dict(mesh=mesh, batch_size=8, pad_id=0, bucket_lengths=(16,), chunk=16)
  want = reference.compute(params, CONFIG, examples, **args)
  got = reference.compute(params, CONFIG, examples, rules=custom + sharding.DEFAULT_RULES,
                          **args)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, rtol=1e-5)
