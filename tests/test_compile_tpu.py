"""rlhi/aot: an experiment's steps compiled for a TPU v5e 2x2 by the TPU compiler.

The compiled programs' parameter, optimizer-state, batch and KV-cache shardings are
checked against a table written out here by hand (not derived from
sharding.DEFAULT_RULES, so that removing or changing a rule fails), and the per-chip
argument bytes against the parameter shapes divided by those shardings. The TPU tests
need libtpu (`pip install -e '.[tpu-compile]'`), are skipped without it and are marked
slow (CI runs them); the same checks run on 4 simulated CPU devices, and the HLO
reader, the accelerator names and the roofline are checked on hand-computed cases,
always.
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import dpo as dpo_config
from rlhi import sharding
from rlhi.aot import check
from rlhi.aot import hlo
from rlhi.aot import programs
from rlhi.aot import roofline
from rlhi.aot import topology
from rlhi.models import llama

_LIBTPU = pytest.mark.skipif(
    not topology.libtpu_available(),
    reason="libtpu is not installed: pip install -e '.[tpu-compile]'")


def needs_libtpu(test):
  """TPU-compiler tests: skipped without libtpu; slow (the tiny programs' compiles take
  a minute on 2 cores), so run by CI and RLHI_SLOW_TESTS=1."""
  return pytest.mark.slow(_LIBTPU(test))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = {"data": 1, "fsdp": 2, "tensor": 2}
BATCH = ("data", "fsdp")
# Where each parameter of the tiny Llama should live on a (data 1, fsdp 2, tensor 2)
# mesh: matrices split over fsdp on the embedding side and over tensor on the heads /
# MLP / vocabulary side; norms over fsdp; the layer axis of scanned params unsplit.
LAYER = {
    "input_layernorm/scale": P("fsdp"),
    "post_attention_layernorm/scale": P("fsdp"),
    "self_attn/q_proj/kernel": P("fsdp", "tensor", None),
    "self_attn/k_proj/kernel": P("fsdp", "tensor", None),
    "self_attn/v_proj/kernel": P("fsdp", "tensor", None),
    "self_attn/o_proj/kernel": P("tensor", None, "fsdp"),
    "mlp/gate_proj/kernel": P("fsdp", "tensor"),
    "mlp/up_proj/kernel": P("fsdp", "tensor"),
    "mlp/down_proj/kernel": P("tensor", "fsdp"),
}
TOP = {
    "embed_tokens/embedding": P("tensor", "fsdp"),
    "norm/scale": P("fsdp"),
    "lm_head/kernel": P("fsdp", "tensor"),
}


def expected_llama(scanned: bool, num_layers: int, lm_head: bool = True) -> dict:
  out = {k: v for k, v in TOP.items() if lm_head or not k.startswith("lm_head")}
  for name, spec in LAYER.items():
    if scanned:
      out[f"layers/{name}"] = P(None, *spec)
    else:
      out.update({f"layers_{i}/{name}": spec for i in range(num_layers)})
  return out


def expected_reward() -> dict:
  out = {f"backbone/{k}": v for k, v in
         expected_llama(True, 0, lm_head=False).items()}
  return out | {"score/kernel": P("fsdp"), "score/bias": P()}


def tiny_config():
  """configs/dpo.py's tiny model on a 2x2 mesh, at small shapes."""
  cfg = dpo_config.get_config("rewrites")
  cfg.mesh = dict(MESH)
  cfg.batch_size = 8
  cfg.data.max_length = 128
  cfg.data.bucket_lengths = (64, 128)
  cfg.logprob_chunk = 64
  cfg.user_rewards.generation_batch_size = 4
  cfg.user_rewards.max_new_tokens = 32
  return cfg


def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def _matches(path: str, name: str) -> bool:
  return path == name or path.endswith("/" + name)


def assert_specs(tree, expected: dict, mesh) -> None:
  """Every leaf of `tree` (shardings) whose path ends with a key of `expected` is
  sharded as that spec says; every key is found."""
  found = set()
  for key_path, s in jax.tree_util.tree_leaves_with_path(tree):
    path = _path(key_path)
    for name, spec in expected.items():
      if _matches(path, name):
        assert s.is_equivalent_to(NamedSharding(mesh, spec), len(spec)), (
            f"{path}: sharded {s.spec}, expected {spec}")
        found.add(name)
  missing = set(expected) - found
  assert not missing, f"not found in the compiled program: {sorted(missing)}"


def expected_argument_bytes(abstract, expected: dict, mesh) -> float:
  """Per-chip bytes of arrays laid out as `expected` says (paths as in assert_specs);
  arrays not listed (scalars, the step) whole."""
  total = 0.0
  for key_path, x in jax.tree_util.tree_leaves_with_path(abstract):
    path = _path(key_path)
    spec = next((s for n, s in expected.items() if _matches(path, n)), P())
    ways = math.prod(math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str)
                                                       else axes))
                     for axes in spec if axes is not None)
    total += math.prod(x.shape) * np.dtype(x.dtype).itemsize / ways
  return total


def check_step(result, cfg, mesh) -> None:
  """The compiled program's shardings and argument bytes against the tables above."""
  assert result.fits, result.error
  compiled = result.compiled
  (args, _), outputs = compiled.input_shardings, compiled.output_shardings
  config = llama.get_config("tiny")
  if result.name == "decode":
    params = expected_llama(False, config.num_layers)
    assert_specs(args[0], params, mesh)
    cache = outputs[2]
    for k in cache.k:
      assert k.is_equivalent_to(NamedSharding(mesh, P(BATCH, "tensor", None, None)), 4)
    for v in cache.v:
      assert v.is_equivalent_to(NamedSharding(mesh, P(BATCH, "tensor", None, None)), 4)
    assert outputs[1].is_equivalent_to(NamedSharding(mesh, P(BATCH, "tensor")), 2)
    return
  params = expected_reward() if result.name == "reward" else expected_llama(
      True, config.num_layers)
  state, batch = args[0], args[1]
  new_state = outputs[0]
  assert_specs(new_state.params, params, mesh)
  assert_specs(state.params, params, mesh)
  # AdamW's moments live where their parameters do.
  for moment in ("mu", "nu"):
    assert_specs(new_state.opt_state, {f"{moment}/{k}": v for k, v in params.items()},
                 mesh)
  for name, s in batch.items():
    if s is None:  # an input the loss does not read (prompt_length): pruned by jit
      continue
    ndim = 2 if name.endswith(("tokens", "targets", "loss_mask", "positions",
                                "segment_ids")) else 1
    assert s.is_equivalent_to(NamedSharding(mesh, P(BATCH, *[None] * (ndim - 1))),
                              ndim), f"batch[{name}]: {s.spec}"
  # Arguments per chip: the state as laid out above, plus each chip's rows of the batch.
  (program,) = programs.build(cfg, mesh, (result.name,))
  state_bytes = expected_argument_bytes(program.args[0], params | {
      f"mu/{k}": v for k, v in params.items()} | {
          f"nu/{k}": v for k, v in params.items()}, mesh)
  batch_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                    for x in jax.tree.leaves(program.args[1])) / 2
  measured = result.memory.arguments
  assert measured == pytest.approx(state_bytes + batch_bytes, rel=0.05), (
      measured, state_bytes, batch_bytes)


STEPS = ("sft", "reward", "dpo_cached", "decode")


@pytest.fixture(scope="module")
def tpu_results():
  s = topology.parse("v5e:2x2")
  cfg = tiny_config()
  mesh = sharding.make_mesh(cfg.mesh, devices=topology.devices(s))
  results = {p.name: check.compile_program(p, s, keep_compiled=True)
             for p in programs.build(cfg, mesh, STEPS)}
  return cfg, mesh, results


@needs_libtpu
@pytest.mark.parametrize("step", STEPS)
def test_tpu_step_is_sharded_as_the_rules_say(tpu_results, step):
  cfg, mesh, results = tpu_results
  assert {d.platform for d in mesh.devices.flat} == {"tpu"}
  check_step(results[step], cfg, mesh)


@needs_libtpu
def test_tpu_train_steps_gather_weights_and_reduce_gradients(tpu_results):
  _, _, results = tpu_results
  for step in ("sft", "reward", "dpo_cached"):
    kinds = results[step].summary.collectives
    assert kinds["all-gather"].count > 0, step  # fsdp: weights gathered per layer
    assert ("all-reduce" in kinds) or ("reduce-scatter" in kinds), step
    # The layer scan's body runs once per layer: trip count read from the HLO.
    assert (results[step].summary.loops and
            not results[step].summary.unknown_loops), step


@needs_libtpu
def test_tpu_packed_pair_steps_compile_with_the_dense_mask():
  """config.data.packing: the reward, reference and DPO steps on packed rows (prompt
  shared by both responses, response ids in the attention mask) compile for the TPU,
  rows sharded over the batch axes; half the rows of the unpacked steps."""
  s = topology.parse("v5e:2x2")
  cfg = tiny_config()
  cfg.data.packing = True
  mesh = sharding.make_mesh(cfg.mesh, devices=topology.devices(s))
  progs = programs.build(cfg, mesh, ("reward", "reference", "dpo_cached", "dpo_live"))
  for program in progs:
    batch = program.args[1]
    assert batch["tokens"].shape == (cfg.batch_size, 128), program.name
    assert batch["response_ids"].sharding.spec[0] == BATCH, program.name
    result = check.compile_program(program, s)
    assert result.fits, (program.name, result.error)
    assert program.tokens == cfg.batch_size * 128


@needs_libtpu
def test_tpu_out_of_memory_is_reported_not_raised():
  s = topology.parse("v5e:2x2")
  cfg = dpo_config.get_config("rewrites,llama3_8b")
  cfg.batch_size = 4
  mesh = sharding.make_mesh({"fsdp": 4}, devices=topology.devices(s))
  (program,) = programs.build(cfg, mesh, ("dpo_cached",))
  result = check.compile_program(program, s)
  assert not result.fits
  assert result.error.startswith("out of HBM")
  assert result.capacity == pytest.approx(s.chip.hbm_bytes)
  assert result.used > result.capacity


@needs_libtpu
def test_meshes_that_need_a_split_torus_axis_build():
  """fsdp=16 x tensor=4 on an 8x8 v6e slice (the 70B config's mesh on v6e-64): each
  mesh axis cannot be a product of whole torus axes, which jax.make_mesh requires off
  v5e; sharding.make_mesh then splits a physical axis."""
  devices = topology.devices(topology.parse("v6e-64"))
  mesh = sharding.make_mesh({"fsdp": 16, "tensor": 4}, devices=devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 4}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def _compile_cli(*args, tmp_path):
  env = dict(os.environ, XLA_FLAGS="", RLHI_QUIET="1")
  return subprocess.run(
      [sys.executable, "-m", "experiments.compile", *args], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600, check=False)


@needs_libtpu
def test_compile_command_prints_the_table_and_exits_1_when_a_step_does_not_fit(
    tmp_path):
  out = tmp_path / "tiny.json"
  r = _compile_cli("--config", "configs/dpo.py:rewrites", "--topology", "v5e:2x2",
                   "--steps", "dpo_cached,decode", "--config.batch_size=8",
                   "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                   f"--json={out}", tmp_path=tmp_path)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "| dpo_cached | 8 packed rows x 512 tokens" in r.stdout  # data.packing
  assert "| decode |" in r.stdout and "collectives per step per chip" in r.stdout
  results = json.loads(out.read_text())
  assert [x["step"] for x in results] == ["dpo_cached", "decode"]
  assert all(x["fits"] and x["memory"]["arguments"] > 0 for x in results)
  # Llama-3.1-8B on 4 v5e chips: refused by the compiler, reported, exit status 1.
  r = _compile_cli("--config", "configs/dpo.py:rewrites,llama3_8b", "--topology",
                   "v5e:2x2", "--steps", "dpo_cached", "--config.batch_size=4",
                   tmp_path=tmp_path)
  assert r.returncode == 1, r.stdout + r.stderr
  assert "**no**: out of HBM: needs" in r.stdout
  assert "Does not fit or does not compile on v5litepod-4: dpo_cached" in r.stdout
  # A slice name that does not exist: what to write instead, exit status 2.
  r = _compile_cli("--config", "configs/dpo.py:rewrites", "--topology", "v5e-48",
                   tmp_path=tmp_path)
  assert r.returncode == 2 and "no standard v5e slice of 48 chips" in r.stderr


def test_cpu_packed_steps_build_and_run_like_the_unpacked():
  """The packed programs' abstract batches are what inputs.pack makes, and the packed
  DPO step compiles on CPU devices."""
  cfg = tiny_config()
  cfg.data.packing = True
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:4])
  (program,) = programs.build(cfg, mesh, ("dpo_cached",))
  batch = program.args[1]
  assert set(batch) >= {"response_ids", "example_index", "chosen_end", "valid",
                        "ref_chosen_logps"}
  assert batch["valid"].shape == (cfg.batch_size, 1)
  assert "packed rows" in program.description
  with sharding.use_mesh(mesh, program.rules):
    program.jitted.lower(*program.args).compile()


def test_cpu_steps_are_sharded_as_the_rules_say():
  """The same programs and checks on 4 of the 8 simulated CPU devices (no libtpu)."""
  cfg = tiny_config()
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:4])
  s = topology.parse("v5e:2x2")  # only its chip figures are used
  for program in programs.build(cfg, mesh, ("dpo_cached", "decode")):
    check_step(check.compile_program(program, s, keep_compiled=True), cfg, mesh)


# ---- The HLO reader, on a hand-written program ---------------------------------------

HLO = """HloModule m, entry_computation_layout={(f32[8,128]{1,0})->f32[8,128]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,128]{1,0} get-tuple-element(%p), index=1
  %g = f32[32,128]{1,0} all-gather(%x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %v = f32[32,128]{1,0:S(1)} copy(%g)
  %s = f32[8,128]{1,0} slice(%v), slice={[0:8], [0:128]}
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%n, %s)
}

%cond (p: (s32[], f32[8,128])) -> pred[] {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[8,128]) -> f32[8,128] {
  %a = f32[8,128]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %t = (s32[], f32[8,128]{1,0}) tuple(%zero, %a)
  %w = (s32[], f32[8,128]{1,0}) while(%t), condition=%cond, body=%body
  %r = f32[8,128]{1,0} get-tuple-element(%w), index=1
  ROOT %ar = f32[8,128]{1,0} all-reduce(%r), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
}
"""


def test_hlo_collectives_count_loop_trips():
  s = hlo.summarize(HLO, num_devices=4)
  assert s.loops == [("body", 5)] and not s.unknown_loops
  gather, reduce = s.collectives["all-gather"], s.collectives["all-reduce"]
  assert (gather.count, reduce.count) == (5, 1)
  # 5 gathers of a [32, 128] float32 result over 4 chips: each receives 3/4 of it.
  assert gather.bytes == 5 * 32 * 128 * 4
  assert gather.ici_bytes == 5 * 32 * 128 * 4 * 3 / 4
  # An all-reduce is a reduce-scatter plus an all-gather: 2 x (g-1)/g of the array.
  assert reduce.ici_bytes == 2 * 8 * 128 * 4 * 3 / 4


def test_hlo_bytes_count_hbm_only():
  s = hlo.summarize(HLO, num_devices=4)
  small, big = 8 * 128 * 4, 32 * 128 * 4
  per_trip = (
      (small + big)  # all-gather: reads x, writes the gathered array
      + big          # copy into VMEM (S(1)): reads HBM, writes on chip
      + small        # slice: reads on chip, writes its result to HBM
      + 3 * 4)       # the counter's add
  condition = 4 + 4 + 1  # compare, run once more than the body
  entry = 2 * small  # all-reduce
  assert s.hbm_bytes == 5 * per_trip + 6 * condition + entry


def test_group_sizes():
  mesh_groups = "replica_groups=mesh['axis_0'=4,'axis_1'=16] {'axis_1'}"
  assert hlo.group_size(mesh_groups, 64) == 16
  assert hlo.group_size("replica_groups=[8,8]<=[64]", 64) == 8
  assert hlo.group_size("replica_groups={{0,1},{2,3}}", 4) == 2
  assert hlo.group_size("channel_id=1", 4) == 4


def test_parse_oom():
  needed, available, temps_only = check.parse_oom(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (22.97G) exceeds available HBM (15.75G).")
  assert (needed, available, temps_only) == (22.97 * 2 ** 30, 15.75 * 2 ** 30, True)
  needed, available, temps_only = check.parse_oom(
      "Ran out of memory in memory space hbm. Used 17.5G of 15.75G hbm. Exceeded hbm "
      "capacity by 1.75G.")
  assert (needed, available, temps_only) == (17.5 * 2 ** 30, 15.75 * 2 ** 30, False)
  assert check.parse_oom("INVALID_ARGUMENT: something else") is None


# ---- Accelerator names, the roofline -------------------------------------------------


@pytest.mark.parametrize("name,chips,topo,accelerator", [
    ("v5litepod-64", 64, "v5e:8x8", "v5litepod-64"),
    ("v5e-256", 256, "v5e:16x16", "v5litepod-256"),
    ("v5p-128", 64, "v5:4x4x4", "v5p-128"),  # v5p names count TensorCores
    ("v6e-64", 64, "v6e:8x8", "v6e-64"),
    ("v5e:2x2", 4, "v5e:2x2", "v5litepod-4"),
    ("v5p:4x4x8", 128, "v5:4x4x8", "v5p-256"),
])
def test_accelerator_names(name, chips, topo, accelerator):
  s = topology.parse(name)
  assert (s.chips, s.topology, s.accelerator) == (chips, topo, accelerator)


@pytest.mark.parametrize("name,message", [
    ("v5p-7", "multiple of 2"), ("v5e-48", "no standard v5e slice"),
    ("v4-8", "unknown accelerator"), ("v5e:8x8x8", "2-D")])
def test_bad_accelerator_names(name, message):
  with pytest.raises(ValueError, match=message):
    topology.parse(name)


def test_roofline_is_the_slowest_term():
  chip = topology.CHIPS["v5e"]
  summary = hlo.HloSummary({"all-gather": hlo.Collective("all-gather", 1, 0.0, 50e9)},
                           hbm_bytes=819e9, loops=[], unknown_loops=[])
  e = roofline.estimate(summary, chip, 64, model_flops=64 * 197e12 * 0.5,
                        flops_per_chip=197e12 * 0.75)
  # compute 0.75 s, HBM 1 s, ICI 50 GB / 200 GB/s = 0.25 s: HBM-bound at 1 s.
  assert (e.compute_s, e.hbm_s, e.ici_s) == pytest.approx((0.75, 1.0, 0.25))
  assert e.bound == "HBM" and e.step_s == pytest.approx(1.0)
  assert e.mfu == pytest.approx(0.5)


def test_search_jumps_to_the_accumulation_that_fits():
  gib = 2 ** 30
  mesh = sharding.make_mesh({"fsdp": 8})
  r = check.StepResult("dpo_cached", "", 0.0, 16 * gib, oom_used=50 * gib,
                       argument_bytes=2 * gib, error="out of HBM")
  # 48 GiB of activations at 1 step; 0.95 x 16 - 2 = 13.2 GiB of room: 4 steps.
  assert check._next_accum(r, 1, 32, mesh, 2) == 4  # pylint: disable=protected-access
  # Far too big: stop where a microbatch of pairs (2 rows each) still splits 8 ways.
  r.oom_used = 500 * gib
  assert check._next_accum(r, 1, 32, mesh, 2) == 8  # pylint: disable=protected-access
  assert check._next_accum(r, 8, 32, mesh, 2) is None  # pylint: disable=protected-access
