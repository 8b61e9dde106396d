"""The programs an experiment runs on a slice, with abstract inputs, ready to compile.

    progs = programs.build(cfg, mesh, steps=("dpo_cached", "decode"))
    for p in progs:
      with sharding.use_mesh(p.mesh, p.rules):
        compiled = p.jitted.lower(*p.args).compile()

Each program is built by the code the experiment runs: the update step of
`loop.update_step` (optimizer, state shardings, donation, accumulation), the losses of
rlhi/train/objectives.py, the reference pass of `reference.jitted_logps`, and the
sampler's `prefill` / `decode_step` (rlhi/sampling.py). Inputs are
`jax.ShapeDtypeStruct`s carrying their shardings, so nothing is allocated: the mesh may
be made of compile-only TPU devices (rlhi/aot/topology.py) or of CPU devices.

Shapes come from the config: `batch_size` (sequences for SFT, pairs for the reward
model and DPO), the largest of `data.bucket_lengths` (the largest batch a run sees),
`accum_steps`, `mesh`, `model.remat_policy`; the sampler's batch, prompt length and
new tokens from `user_rewards` when the config has it (configs/dpo.py).

Steps:
  sft         SFT update step (rlhi/train/sft.py)
  reward      reward-model update step (rlhi/train/reward.py)
  reference   DPO's reference log-prob pass, one batch (rlhi/train/reference.py)
  dpo_cached  DPO update step with cached reference log-probs in the batch
  dpo_live    DPO update step with the reference model run every step
  prefill     the sampler's prompt pass into a new KV cache (User-Based Rewards,
              UserEval, the local inference backend)
  decode      one step of the sampler's decode loop, with the cache at its full length
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhi import inputs
from rlhi import sampling
from rlhi import sharding
from rlhi.models import builder
from rlhi.models import llama
from rlhi.models import reward
from rlhi.train import dpo
from rlhi.train import loop
from rlhi.train import objectives
from rlhi.train import reference

STEPS = ("sft", "reward", "reference", "dpo_cached", "dpo_live", "prefill", "decode")
TRAIN_STEPS = ("sft", "reward", "dpo_cached", "dpo_live")


@dataclasses.dataclass
class Program:
  """One jitted program, its abstract arguments, and what it computes."""
  name: str
  jitted: Callable
  args: tuple
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  description: str  # the shapes, for the report
  tokens: int  # tokens the step processes (all chips)
  model_flops: float  # the work the step is for (all chips; see rlhi/aot/roofline.py)
  flops_run: float  # incl. recomputation (all chips)
  parallel_ways: int  # chips that split the work (batch shards x tensor)
  per_step: int = 1  # steps the program runs (decode: tokens per row); times are / this


def default_steps(cfg) -> tuple[str, ...]:
  """The programs that the experiments using this config run."""
  kind = experiment_kind(cfg)
  if kind == "dpo":
    train = ("reference", "dpo_cached") if cfg.reference.mode == "cached" else (
        "dpo_live",)
    return train + ("prefill", "decode")  # User-Based Rewards samples the policy
  return (kind,)


def experiment_kind(cfg) -> str:
  """'sft' | 'reward' | 'dpo' from the fields of a config of configs/."""
  if "model" not in cfg or "batch_size" not in cfg:
    raise ValueError(
        "the config has no `model` / `batch_size`: compile a training config "
        "(configs/sft.py, configs/reward_model.py, configs/dpo.py); the sampler of "
        "UserEval is --steps=prefill,decode on the policy's training config")
  if "reference" in cfg:
    return "dpo"
  if "loss" in cfg and "margin" in cfg.loss:
    return "reward"
  return "sft"


def abstract_arrays(boxed: Any, shardings: Any) -> Any:
  """Logically boxed abstract values + their shardings -> ShapeDtypeStructs that carry
  the shardings (what `.lower()` takes in place of arrays)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(
          getattr(x, "value", x).shape, getattr(x, "value", x).dtype, sharding=s),
      boxed, shardings, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def model_configs(cfg) -> tuple[llama.LlamaConfig, llama.LlamaConfig]:
  """(policy, reference) LlamaConfigs as the trainers build them, with the TPU's
  layout: `flatten_dense` follows the default backend, which is this host's CPU when
  compiling for a TPU topology."""
  policy = builder.model_config(cfg.model)
  ref = (builder.model_config(dpo.reference_model_cfg(cfg))
         if "reference" in cfg else policy)
  fix = lambda c: dataclasses.replace(c, flatten_dense=False)
  return fix(policy), fix(ref)


def _sequence_length(cfg) -> int:
  return int(max(cfg.data.bucket_lengths))


def _score_shape(name: str, shape: tuple[int, ...], length: int) -> tuple[int, ...]:
  # The widest score_positions a batch of rows of `length` can have (every column a
  # response target): the memory check holds for every width training compiles.
  return shape[:1] + (length,) if name.endswith("score_positions") else shape


def _abstract_batch(example: dict[str, Any], batch_size: int, length: int,
                    mesh: jax.sharding.Mesh, rules: sharding.Rules,
                    score_positions: bool = False) -> dict[str, Any]:
  """The global batch `inputs.pad_batch` makes from examples like `example`, padded to
  `length`, as ShapeDtypeStructs sharded like `sharding.global_batch` shards it."""
  host = inputs.pad_batch([example], batch_size=1, pad_id=0, bucket_lengths=(length,),
                          score_positions=score_positions)
  out = {}
  for name, x in host.items():
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
      continue
    shape = _score_shape(name, (batch_size,) + x.shape[1:], length)
    out[name] = jax.ShapeDtypeStruct(shape, x.dtype,
                                     sharding=sharding.batch_sharding(shape, mesh, rules))
  return out


def _pairs_example(length: int, with_reference: bool) -> dict[str, Any]:
  half = length // 2
  ex = {"prompt_ids": np.ones(half, np.int32), "chosen_ids": np.ones(half, np.int32),
        "rejected_ids": np.ones(length - half, np.int32)}
  if with_reference:
    ex |= {reference.CHOSEN: np.float32(0), reference.REJECTED: np.float32(0)}
  return ex


def _packed_batch(example: dict[str, Any], rows: int, length: int,
                  mesh: jax.sharding.Mesh, rules: sharding.Rules,
                  score_positions: bool = False) -> dict[str, Any]:
  """`rows` packed rows (`inputs.pack`) of one `example` each, as global abstract
  arrays sharded like `sharding.global_batch` shards them."""
  host = inputs.pack([example], [[0]], num_rows=1, length=length, slots=1, pad_id=0,
                     width=length if score_positions else None)
  out = {}
  for name, x in host.items():
    shape = _score_shape(name, (rows,) + x.shape[1:], length)
    out[name] = jax.ShapeDtypeStruct(shape, x.dtype,
                                     sharding=sharding.batch_sharding(shape, mesh, rules))
  return out


def _packed_pair(length: int, with_reference: bool) -> dict[str, Any]:
  """A pair that fills a packed row of `length`: a prompt of half the row, shared by two
  responses of a quarter each (the unpacked layout needs two rows of `length`)."""
  q = length // 4
  ex = {"prompt_ids": np.ones(length - 2 * q - 1, np.int32),
        "chosen_ids": np.ones(q, np.int32), "rejected_ids": np.ones(q, np.int32)}
  if with_reference:
    ex |= {reference.CHOSEN: np.float32(0), reference.REJECTED: np.float32(0)}
  return ex


def batch_ways(shape, mesh, rules) -> int:
  """Over how many shards `sharding.batch_sharding` splits a batch of this shape."""
  spec = sharding.batch_sharding(shape, mesh, rules).spec
  axes = spec[0] if spec else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _tensor_ways(config: llama.LlamaConfig, mesh) -> int:
  t = mesh.shape.get("tensor", 1)
  return t if config.num_heads % t == 0 and config.intermediate_size % t == 0 else 1


# ---- FLOPs ---------------------------------------------------------------------------


def _flops(c: llama.LlamaConfig, attended: int) -> tuple[float, float, float]:
  """Forward FLOPs per token: (matmuls without the LM head, attention over `attended`
  slots, LM head), as `llama.flops_per_token` counts them."""
  head = 2.0 * c.hidden_size * c.vocab_size
  body = llama.flops_per_token(c, 0) - head
  attention = llama.flops_per_token(c, attended) - llama.flops_per_token(c, 0)
  return body, attention, head


def _recomputed(c: llama.LlamaConfig, body: float, attention: float) -> float:
  """Forward FLOPs per token that the backward pass recomputes under the remat policy."""
  return {"none": 0.0, "dots_saveable": 0.0,
          "dots_with_no_batch_dims_saveable": attention,
          "full": body + attention}[c.remat_policy]


def _train_flops(c: llama.LlamaConfig, tokens: int, length: int, *, lm_head: bool,
                 reference_forward: bool = False) -> tuple[float, float]:
  """(model FLOPs, FLOPs run) of an update step over `tokens` tokens."""
  body, attention, head = _flops(c, length)
  # Query blocks skip the causal upper triangle: fewer attention FLOPs are run than
  # the model count (the full square) says.
  _, attention_run, _ = _flops(c, llama.attended_keys(c, length))
  head = head if lm_head else 0.0
  model = 3 * (body + attention + head)
  # token_logprobs rematerialises the LM head per chunk.
  run = (3 * (body + attention_run + head) + _recomputed(c, body, attention_run)
         + head)
  if reference_forward:
    model += body + attention + head
    run += body + attention_run + head
  return model * tokens, run * tokens


# ---- Programs ------------------------------------------------------------------------


def _update_program(name, cfg, mesh, rules, loss_fn, abstract_params, batch,
                    config, tokens, length, *, lm_head, frozen=None,
                    packed=False) -> Program:
  frozen_shardings = (None if frozen is None else
                      jax.tree.map(lambda x: x.sharding, frozen))
  built = loop.update_step(cfg, loss_fn, abstract_params, mesh, rules, frozen_shardings)
  state = abstract_arrays(built.abstract_state, built.state_shardings)
  args = (state, batch) if frozen is None else (state, batch, frozen)
  model_flops, run = _train_flops(config, tokens, length, lm_head=lm_head,
                                  reference_forward=frozen is not None)
  rows = next(iter(batch.values())).shape[0]
  # The forward pass runs on a microbatch, chosen and rejected stacked for unpacked
  # pairs; its activations are split as the `batch` rules split that many rows (the
  # inputs may be split less when a rule does not divide the pair count, and are
  # resharded).
  forward_rows = rows // cfg.accum_steps * (1 if name == "sft" or packed else 2)
  ways = batch_ways((forward_rows,), mesh, rules) * _tensor_ways(config, mesh)
  unit = "packed rows" if packed else "sequences" if name == "sft" else "pairs"
  return Program(
      name, built.jitted, args, mesh, rules,
      f"{rows} {unit} x {length} tokens, accum {cfg.accum_steps}, remat "
      f"{config.remat_policy}", tokens, model_flops, run, ways)


def _abstract_llama(config, mesh, rules):
  boxed = llama.abstract_params(config)
  return abstract_arrays(boxed, sharding.logical_shardings(boxed, mesh, rules))


def sampler_shape(cfg) -> tuple[int, int, int]:
  """(batch, prompt length, new tokens) of the sampler: configs/dpo.py's user_rewards
  (prompts are kept when prompt + new tokens fit data.max_length), else the training
  batch with a quarter of the length for new tokens."""
  length = int(cfg.data.max_length)
  if "user_rewards" in cfg:
    ur = cfg.user_rewards
    batch, new = int(ur.generation_batch_size), int(ur.max_new_tokens)
  else:
    batch, new = int(cfg.batch_size), length // 4
  return batch, length - new, new


def _sampler_programs(cfg, config, mesh, rules, steps) -> list[Program]:
  """prefill and decode, on unscanned params as the generator loads them."""
  config = dataclasses.replace(config, scan_layers=False, remat_policy="none")
  batch, prompt_len, new = sampler_shape(cfg)
  params = _abstract_llama(config, mesh, rules)
  row = lambda dtype: jax.ShapeDtypeStruct(
      (batch,), dtype, sharding=sharding.batch_sharding((batch,), mesh, rules))
  scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.replicated(mesh))
  prompts = jax.ShapeDtypeStruct(
      (batch, prompt_len), jnp.int32,
      sharding=sharding.batch_sharding((batch, prompt_len), mesh, rules))
  first = sampling._phase_ends(prompt_len, new)[0]  # pylint: disable=protected-access
  body, attention, head = _flops(config, prompt_len + first)
  ways = batch_ways((batch,), mesh, rules) * _tensor_ways(config, mesh)
  out = []
  if "prefill" in steps:
    fn = jax.jit(lambda p, t, n, r, pad: sampling.prefill(
        p, config, t, n, r, pad, cache_len=prompt_len + first, max_new_tokens=new))
    out.append(Program(
        "prefill", fn, (params, prompts, row(jnp.int32), row(jnp.int32),
                        scalar(jnp.int32)), mesh, rules,
        f"{batch} prompts x {prompt_len} tokens into a {prompt_len + first}-slot cache",
        batch * prompt_len, (body + attention) * batch * prompt_len + head * batch,
        (body + attention) * batch * prompt_len + head * batch, ways))
  if "decode" in steps:
    slots = prompt_len + new
    with nn.logical_axis_rules(rules):
      state = jax.eval_shape(lambda p, t, n, r, pad: sampling.prefill(
          p, config, t, n, r, pad, cache_len=slots, max_new_tokens=new),
                             params, prompts, row(jnp.int32), row(jnp.int32),
                             scalar(jnp.int32))
    state = _decode_state(state, mesh, rules)
    # The decode loop's last phase, as `generate` runs it: a loop of decode steps over
    # the full-length cache. In a loop, as there, work on loop-invariant values (the
    # parameters: gathering, concatenating the fused projections) can be hoisted out
    # and held for the whole loop; a lone step would hide both.
    ends = sampling._phase_ends(prompt_len, new)  # pylint: disable=protected-access
    steps_in_loop = ends[-1] - (ends[-2] if len(ends) > 1 else 0)

    def decode_loop(p, s, key, temp, k, top_p, stop, r, pad):
      return jax.lax.fori_loop(0, steps_in_loop, lambda _, st: sampling.decode_step(
          p, config, st, key, temp, k, top_p, stop, r, pad), s)

    body, attention, head = _flops(config, slots)
    flops = (body + attention + head) * batch * steps_in_loop
    out.append(Program(
        "decode", jax.jit(decode_loop, donate_argnums=1),
        (params, state, scalar(jnp.uint32, (2,)), row(jnp.float32), row(jnp.int32),
         row(jnp.float32), scalar(jnp.int32, (max(1, len(config.eos_token_ids)),)),
         row(jnp.int32), scalar(jnp.int32)), mesh, rules,
        f"{batch} rows x {steps_in_loop} tokens (the decode loop's last phase), cache "
        f"of {slots} slots", batch * steps_in_loop, flops, flops, ways,
        per_step=steps_in_loop))
  return out


def _decode_state(state, mesh, rules):
  """Shardings of the decode loop's state from the logical axes the model constrains
  the cache to (rows on `batch`)."""
  def on(x, names):
    spec = sharding.logical_to_spec(names, x.shape, mesh, rules)
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=jax.sharding.NamedSharding(mesh, spec))
  step, logits, cache, tokens, logprobs, done, lengths, pos = state
  cache = llama.KVCache(
      k=tuple(on(k, llama.K_CACHE_AXES) for k in cache.k),
      v=tuple(on(v, llama.V_CACHE_AXES) for v in cache.v),
      segment_ids=on(cache.segment_ids, ("batch", "length")),
      index=on(cache.index, ()))
  return (on(step, ()), on(logits, ("batch", "vocab")), cache,
          on(tokens, ("batch", None)), on(logprobs, ("batch", None)),
          on(done, ("batch",)), on(lengths, ("batch",)), on(pos, ("batch",)))


def build(cfg, mesh: jax.sharding.Mesh, steps: tuple[str, ...] | None = None,
          rules: sharding.Rules | None = None) -> list[Program]:
  """The programs `steps` (default: `default_steps(cfg)`) of the experiment `cfg`,
  sharded by `rules` (default: the config's `sharding_rules`, as training uses)."""
  steps = tuple(steps or default_steps(cfg))
  if rules is None:
    rules = sharding.rules_from_config(cfg.get("sharding_rules", ()))
  unknown = [s for s in steps if s not in STEPS]
  if unknown:
    raise ValueError(f"--steps: unknown {unknown}; known: {', '.join(STEPS)}")
  config, ref_config = model_configs(cfg)
  length = _sequence_length(cfg)
  b = int(cfg.batch_size)
  chunk = int(cfg.get("logprob_chunk", 256))
  # config.data.packing: pair steps take packed rows, one pair per row whose prompt
  # (half the row) is shared by both responses; b rows of `length` tokens in place
  # of 2b. SFT rows are full either way.
  packed = bool(cfg.data.get("packing", False))

  def pairs_batch(with_reference, score_positions):
    # score_positions: DPO and the reference pass (LM head on responses), at the
    # widest; the reward model reads none.
    if packed:
      return _packed_batch(_packed_pair(length, with_reference), b, length, mesh, rules,
                           score_positions)
    return _abstract_batch(_pairs_example(length, with_reference), b, length, mesh,
                           rules, score_positions)

  pair_tokens = b * length if packed else 2 * b * length
  out: list[Program] = []
  if "sft" in steps:
    example = {"tokens": np.ones(length, np.int32),
               "loss_mask": np.ones(length, np.int32)}
    out.append(_update_program(
        "sft", cfg, mesh, rules, objectives.sft_loss(config, chunk),
        llama.abstract_params(config), _abstract_batch(example, b, length, mesh, rules),
        config, b * length, length, lm_head=True))
  if "reward" in steps:
    loss = cfg.get("loss", {})
    loss_fn = objectives.reward_loss(config, float(loss.get("margin", 0.0)),
                                     float(loss.get("center_coef", 0.0)))
    out.append(_update_program(
        "reward", cfg, mesh, rules, loss_fn, reward.abstract_params(config),
        pairs_batch(False, False), config, pair_tokens, length, lm_head=False,
        packed=packed))
  if "reference" in steps:
    batch = pairs_batch(False, True)
    fn = reference.jitted_logps(ref_config, mesh, chunk)
    body, attention, head = _flops(ref_config, length)
    _, attention_run, _ = _flops(ref_config, llama.attended_keys(ref_config, length))
    out.append(Program(
        "reference", fn, (_abstract_llama(ref_config, mesh, rules), batch), mesh, rules,
        f"{b} {'packed rows' if packed else 'pairs'} x {length} tokens, forward only",
        pair_tokens, (body + attention + head) * pair_tokens,
        (body + attention_run + head) * pair_tokens,
        batch_ways((pair_tokens // length, length), mesh, rules)
        * _tensor_ways(ref_config, mesh)))
  for name, live in (("dpo_cached", False), ("dpo_live", True)):
    if name not in steps:
      continue
    options = dpo.loss_options(cfg) if "reference" in cfg else {"chunk": chunk}
    loss_fn = objectives.dpo_loss(config, ref_config=ref_config, live_reference=live,
                                  **options)
    frozen = _abstract_llama(ref_config, mesh, rules) if live else None
    out.append(_update_program(
        name, cfg, mesh, rules, loss_fn, llama.abstract_params(config),
        pairs_batch(not live, True), config, pair_tokens, length, lm_head=True,
        frozen=frozen, packed=packed))
  out += _sampler_programs(cfg, config, mesh, rules, steps)
  order = {s: i for i, s in enumerate(steps)}
  return sorted(out, key=lambda p: order[p.name])
