r"""Where rlhi's cached DPO step spends its time, on the batches bench/dpo_vs_trl.py made.

  python bench/dpo_vs_trl.py --data rlhi ... --keep /tmp/dvt     # prepares the files
  python bench/profile_dpo.py --spec /tmp/dvt/spec_cached.json --packed --batch 1

Builds batch `--batch` of the spec's data as the harness's rlhi workers do (unpacked:
one row per response, padded to the bucket of the batch's longest sequence; --packed:
pairs packed with the shared prompt), compiles each piece ahead of time and times it
`--reps` times (median), one after the other in this process:

  step        the cached DPO train step (loss, gradient, AdamW update)
  loss+grad   the loss and its gradient, no optimizer
  backbone    forward + backward of the layers alone (no LM head)
  attention   the attention core (llama.dot_product_attention with the batch's mask,
              blocks of config.attention_block queries) forward + backward, once per
              layer: the part that grows with the square of the row length
  LM head     LM head + log-softmax forward + backward on the response targets
              (score_positions) in one piece, without the remat and chunks of
              llama.token_logprobs (which recomputes the head in the backward)
  optimizer   the AdamW update alone

The pieces overlap (attention is inside backbone, both inside loss+grad); "of step" is
each piece's time over the step's. Reference log-probs are zeros (timing only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import dpo_vs_trl
from rlhi import inputs
from rlhi import sharding
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.train import objectives
from rlhi.train import reference
from rlhi.train import step as step_lib


def timed(fn, *args, reps: int) -> float:
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))  # warm
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--spec", required=True, help="spec_cached.json of dpo_vs_trl --keep")
  p.add_argument("--packed", action="store_true")
  p.add_argument("--batch", type=int, default=0, help="which batch of the data")
  p.add_argument("--reps", type=int, default=3)
  a = p.parse_args()
  spec = json.load(open(a.spec))
  config = llama.get_config(spec["model"])
  b = spec["pairs"]
  pairs = dpo_vs_trl.rows_of(json.load(open(spec["data"])))[a.batch * b:(a.batch + 1) * b]
  examples = [{k: np.asarray(e[k], np.int32) for k in dpo_vs_trl.PAIR_KEYS}
              | {reference.CHOSEN: np.float32(0), reference.REJECTED: np.float32(0)}
              for e in pairs]
  options = dict(spec["options"], length=spec["length"])
  host = dpo_vs_trl._host_batch(examples, options, a.packed)  # pylint: disable=protected-access
  mesh = sharding.make_mesh({"fsdp": -1})
  with sharding.use_mesh(mesh):
    shardings = sharding.logical_shardings(llama.abstract_params(config), mesh)
    _, params = hf_io.load_checkpoint(spec["model_dir"], config, shardings=shardings)
    batch = sharding.global_batch(host)
    if a.packed:
      tokens, segments = batch["tokens"], batch["segment_ids"]
      responses, cols = batch["response_ids"], batch["score_positions"]
    else:
      cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
      tokens, segments, responses = cat("tokens"), cat("segment_ids"), None
      cols = cat("score_positions")
    rows, length = tokens.shape
    real = int(np.count_nonzero(np.asarray(segments)))
    print(f"{spec['model']}, batch {a.batch}: {b} pairs, "
          f"{'packed' if a.packed else 'unpacked'} {rows} rows x {length} "
          f"({real:,} real tokens, {real / tokens.size:.0%} of the rows), LM head on "
          f"{cols.shape[1]} columns per row; attention_block {config.attention_block}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)

    loss = objectives.dpo_loss(config, loss_type="sigmoid", beta=0.1, chunk=256)
    opt = optax.adamw(1e-5)
    state = step_lib.init_state(params, opt, 0)
    train_step = step_lib.make_train_step(loss, opt)
    out = {"step": timed(train_step, state, batch, reps=a.reps)}
    out["loss+grad"] = timed(
        lambda q, bt: jax.grad(lambda q: loss(q, bt, None)[0])(q), params, batch,
        reps=a.reps)
    positions = batch["positions"] if a.packed else cat("positions")
    fwd = lambda q, x: llama.forward(q, config, *x)
    inputs_ = (tokens, positions, segments, None, responses)
    out["backbone"] = timed(lambda q, x: jax.grad(lambda q: fwd(q, x).sum())(q),
                            params, inputs_, reps=a.reps)
    h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    r = np.random.default_rng(0)
    q = jnp.asarray(r.standard_normal((rows, length, h, d)), jnp.float32)
    k = jnp.asarray(r.standard_normal((rows, kv, d, length)), jnp.float32)
    v = jnp.asarray(r.standard_normal((rows, kv, length, d)), jnp.float32)
    slots = jnp.arange(length)
    mask = llama.attention_mask(slots, slots, segments, segments, config.sliding_window,
                                responses, responses)
    core = lambda q, k, v, m: (llama.dot_product_attention(
        q, k, v, m, config.attention_block) ** 2).sum()
    out["attention"] = config.num_layers * timed(
        lambda q, k, v, m: jax.grad(core, argnums=(0, 1, 2))(q, k, v, m), q, k, v, mask,
        reps=a.reps)
    hidden = jax.jit(fwd)(params, inputs_)
    targets = batch["targets"] if a.packed else cat("targets")

    def head(q, hid, tgt, cols):
      picked = jnp.take_along_axis(hid, cols[..., None], axis=1)
      tgt = jnp.take_along_axis(tgt, cols, axis=1)
      logits = llama.lm_logits(q, config, picked)
      return (jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
              - jax.nn.logsumexp(logits, -1)).sum()

    out["LM head"] = timed(
        lambda q, hid, t, c: jax.grad(head, argnums=(0, 1))(q, hid, t, c), params,
        hidden, targets, cols, reps=a.reps)
    grads = jax.tree.map(jnp.ones_like, params)
    opt_state = opt.init(params)
    out["optimizer"] = timed(
        lambda q, o, g: optax.apply_updates(q, opt.update(g, o, q)[0]), params,
        opt_state, grads, reps=a.reps)
  print("\n| piece | ms | of step |\n|---|---|---|")
  for name, s in out.items():
    print(f"| {name} | {s * 1e3:,.0f} | {s / out['step']:.0%} |")


if __name__ == "__main__":
  main()
