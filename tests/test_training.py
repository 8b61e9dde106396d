"""Training core end to end: sharding, two processes, preemption and resume, RM learning.

The entry points run as subprocesses, as a launch script would run them, on a small
model (2 layers of width 64) so that each run takes seconds.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from rlhi import sharding
from rlhi.models import llama
from rlhi.models import reward
from rlhi.models import tokenizer as tok_lib
from rlhi.train import objectives
from rlhi.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "hidden_size=64,intermediate_size=128,num_layers=2,num_heads=2,num_kv_heads=1,head_dim=32"




def experiment_cmd(module, config, data_dir, workdir, extra=(), bucket=256):
  """`python -m experiments.<module>` on the SMALL model, short sequences, 8 per batch,
  a checkpoint every 2 steps, metrics every step and no periodic eval."""
  return [sys.executable, "-m", f"experiments.{module}", f"--config={config}",
          f"--workdir={workdir}", f"--config.data.dir={data_dir}",
          f"--config.model.overrides={SMALL}", "--config.data.max_length=256",
          "--config.data.max_response_length=64",
          f"--config.data.bucket_lengths=({bucket},)", "--config.batch_size=8",
          "--config.checkpoint.every=2", "--config.log_every=1",
          "--config.eval_every=0", *extra]


def _reward_cmd(data_dir, workdir, steps, extra=()):
  return experiment_cmd("train_reward", f"configs/reward_model.py:steps={steps}",
                        data_dir, workdir, extra)


def _env(devices, **extra):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _final_state(workdir, step):
  """The saved TrainState as arrays on this process's first device."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        meta)
  return ckptr.restore(path, target)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_trees_equal(a, b, rtol=0.0):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    if rtol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------
# Sharded == single device (in process, 8 simulated devices).
# ----------------------------------------------------------------------------------------


def _pairs_batch(seed, b=8, t=24, vocab=4096):
  r = np.random.default_rng(seed)
  lengths = r.integers(8, t + 1, size=(2, b))
  batch = {"valid": np.ones(b, bool)}
  for i, side in enumerate(("chosen", "rejected")):
    seg = (np.arange(t)[None] < lengths[i][:, None]).astype(np.int32)
    batch[f"{side}_tokens"] = (r.integers(4, vocab, size=(b, t)) * seg).astype(np.int32)
    batch[f"{side}_segment_ids"] = seg
    batch[f"{side}_positions"] = (np.arange(t)[None] * seg).astype(np.int32)
  return batch


def _train_3_steps(mesh):
  config = llama.get_config("tiny", hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16)
  # SGD: the comparison is about the sharded computation; Adam would turn rounding-level
  # differences in near-zero gradients into lr-sized steps (sign flips).
  opt = optax.sgd(0.3)
  loss_fn = objectives.reward_loss(config, 0.0, 0.01)
  with sharding.use_mesh(mesh):
    abstract = jax.eval_shape(
        lambda: step_lib.init_state(reward.abstract_params(config), opt, 0))
    shardings = sharding.logical_shardings(abstract, mesh)
    params = reward.init_params(config, jax.random.PRNGKey(1))
    params["score"]["kernel"] = jnp.full_like(params["score"]["kernel"], 0.01)
    state = jax.jit(lambda p: step_lib.init_state(p, opt, 0),
                    out_shardings=shardings)(params)
    step = jax.jit(step_lib.make_train_step(loss_fn, opt, accum_steps=2),
                   out_shardings=(shardings, None))
    losses = []
    for i in range(3):
      state, m = step(state, sharding.global_batch(_pairs_batch(i), mesh))
      losses.append(float(m["loss"]))
  return jax.device_get(state.params), losses, state


@pytest.mark.parametrize("axes", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, tensor=2)])
def test_sharded_training_equals_one_device(axes):
  one = sharding.make_mesh(dict(fsdp=1), devices=jax.devices()[:1])
  p1, l1, _ = _train_3_steps(one)
  p8, l8, state8 = _train_3_steps(sharding.make_mesh(axes))
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  _assert_trees_equal(p1, p8, rtol=1e-4)
  assert l1[2] != l1[0]  # it trained
  q = state8.params["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert "tensor" in str(q.sharding.spec)  # really sharded


# ----------------------------------------------------------------------------------------
# Persona-conditioned reward model learns what the no-persona ablation cannot.
# ----------------------------------------------------------------------------------------


def _persona_task(n, seed):
  """Persona 'likes cats' prefers the answer 'cats', 'likes dogs' prefers 'dogs'."""
  from rlhi import inputs
  from rlhi.data.schema import Message, PreferencePair
  r = np.random.default_rng(seed)
  questions = ["Which pet should I get?", "What animal do you recommend?",
               "Pick an animal for me.", "Any pet ideas?"]
  pairs = []
  for i in range(n):
    likes = ["cats", "dogs"][r.integers(2)]
    other = "dogs" if likes == "cats" else "cats"
    pairs.append(PreferencePair(
        pair_id=str(i), user_id="u", split="train",
        prompt=(Message("user", questions[r.integers(4)]),),
        chosen=f"Get {likes}.", rejected=f"Get {other}.",
        persona=f"The user likes {likes}.", source="synthetic"))
  fmt = tok_lib.ChatFormatter(tok_lib.load_tokenizer("bundled"))
  out = {}
  for with_persona in (True, False):
    ex, _ = inputs.tokenize_pairs(fmt, pairs, with_persona=with_persona, max_length=64)
    out[with_persona] = inputs.pad_batch(ex, batch_size=n, pad_id=fmt.pad_id,
                                         bucket_lengths=(64,))
  return out


@pytest.mark.slow  # 20-90 s on 2 cores; CI runs it
def test_persona_reward_model_learns_and_ablation_stays_at_chance():
  config = llama.get_config("tiny", hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16)
  loss_fn = objectives.reward_loss(config, 0.0, 0.0)
  train, held_out = _persona_task(64, 0), _persona_task(64, 1)
  opt = optax.adam(3e-3)
  step = jax.jit(step_lib.make_train_step(loss_fn, opt))
  evals = jax.jit(step_lib.make_eval_step(loss_fn))
  acc = {}
  for with_persona in (True, False):
    state = step_lib.init_state(reward.init_params(config, jax.random.PRNGKey(0)), opt, 0)
    for _ in range(150):
      state, m = step(state, train[with_persona])
    s, c = evals(state.params, held_out[with_persona], jax.random.PRNGKey(0))["accuracy"]
    acc[with_persona] = float(s / c)
  assert acc[True] >= 0.9, acc
  assert 0.3 <= acc[False] <= 0.7, acc


# ----------------------------------------------------------------------------------------
# Preemption and crashes: resumed runs equal an uninterrupted one, exactly.
# ----------------------------------------------------------------------------------------


def _wait_for_step(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    assert proc.poll() is None, proc.communicate()
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(l).get("step", 0) for l in f if l.strip()]
      if steps and max(steps) >= step:
        return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_sigterm_and_sigkill_then_resume_equal_an_uninterrupted_run(data_dir, tmp_path):
  steps = 8
  ref = str(tmp_path / "ref")
  subprocess.run(_reward_cmd(data_dir, ref, steps), cwd=REPO, env=_env(2), check=True,
                 capture_output=True)
  want = _final_state(ref, steps)

  # A random step each run (in the failure message): any step must resume exactly.
  # SIGKILL from step 5: by then save(4) has started, which waits for save(2) to be
  # complete, so there is a checkpoint to resume from.
  rng = random.Random()
  for sig, at in ((signal.SIGTERM, rng.randint(1, steps - 3)),
                  (signal.SIGKILL, rng.randint(5, steps - 2))):
    work = str(tmp_path / sig.name)
    proc = subprocess.Popen(_reward_cmd(data_dir, work, steps), cwd=REPO, env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(work, at, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    if sig == signal.SIGTERM:
      assert proc.returncode == 0, err.decode()[-2000:]
      assert b"preempted: saved step" in err
    else:
      assert proc.returncode == -signal.SIGKILL
    saved = sorted(int(s) for s in os.listdir(os.path.join(work, "checkpoints"))
                   if s.isdigit())
    assert saved and saved[-1] < steps, (sig, at, saved)
    subprocess.run(_reward_cmd(data_dir, work, steps), cwd=REPO, env=_env(2),
                   check=True, capture_output=True)
    _assert_trees_equal(_final_state(work, steps), want)


# ----------------------------------------------------------------------------------------
# Two processes on 127.0.0.1 agree with one process.
# ----------------------------------------------------------------------------------------


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_on_two_processes(cmd, timeout=420):
  """`cmd` as 2 processes x 1 CPU device joined by jax.distributed on 127.0.0.1 (as
  tpu/launch.sh runs it on 2 workers); fails with a process's stderr if one fails."""
  port = _free_port()
  procs = [subprocess.Popen(
      cmd, cwd=REPO,
      env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2,
               JAX_PROCESS_ID=i),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
def test_two_processes_agree_with_one(data_dir, tmp_path):
  steps = 2
  one = str(tmp_path / "one")
  subprocess.run(_reward_cmd(data_dir, one, steps), cwd=REPO, env=_env(2), check=True,
                 capture_output=True)
  two = str(tmp_path / "two")
  run_on_two_processes(_reward_cmd(data_dir, two, steps), timeout=300)
  m1, m2 = _metrics(one), _metrics(two)
  assert [m["step"] for m in m1] == [m["step"] for m in m2]
  for a, b in zip(m1, m2):
    for k in a:
      if k.endswith(("loss", "accuracy", "margin", "grad_norm")):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  _assert_trees_equal(_final_state(one, steps), _final_state(two, steps), rtol=1e-5)
  # only process 0 wrote the report and the metrics
  assert os.path.exists(os.path.join(two, "eval_report.md"))
