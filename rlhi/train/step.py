"""Train state and the update step shared by every objective (SFT, reward model, DPO).

The loss protocol: a loss function is pure and returns sums, not means, so that
gradient accumulation and multi-host averaging are exact however a batch is split:

    loss_fn(params, batch, rng) -> LossOutput(loss=Metric(sum, count),
                                              metrics={name: Metric(sum, count)})

Every objective (rlhi/train/objectives.py) returns it. The optimised loss is
sum(loss.sum) / sum(loss.count) over the whole global batch (the count is of tokens
for SFT, of pairs for RM/DPO); each metric is likewise its sum over its count. With
`accum_steps` = k the batch is split into k strided microbatches and the gradients of
the sums are added before dividing once, so k x b equals 1 x kb up to float rounding.

Some objectives need fixed arrays besides the trained params (DPO's live reference
model): `make_train_step(...)(state, batch, frozen)` passes `frozen` to the loss as a
fourth argument, `loss_fn(params, batch, rng, frozen)`; it gets no gradient and, being
an argument rather than a closure constant, is sharded like any input.

A step whose loss or gradient norm is not finite leaves the state unchanged and reports
`finite = 0`; the training loop stops on it with a clear message.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax


class Metric(NamedTuple):
  """A quantity as (sum, count) over examples or tokens; its value is sum / count.
  Metrics of several batches, microbatches or hosts add up leaf by leaf."""
  sum: jax.Array  # scalar
  count: jax.Array  # scalar: the number of tokens or examples summed over


class LossOutput(NamedTuple):
  """What a loss function returns; see the module docstring."""
  loss: Metric  # the optimised loss; the gradient is taken of loss.sum
  metrics: dict[str, Metric]  # reported, not optimised


Metrics = dict[str, Metric]
LossFn = Callable[..., LossOutput]  # (params, batch, rng[, frozen]) -> LossOutput


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2], a raw PRNG key (checkpointable as a plain array)


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int
               ) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed))


def _microbatches(batch: Any, k: int) -> Any:
  """[B, ...] -> [k, B/k, ...]; microbatch j takes rows j, j+k, ... so that each one is
  spread over all devices of a batch-sharded array rather than a contiguous block."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by accum_steps {k}")
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def value_and_grad(loss_fn: LossFn) -> Callable[..., tuple[LossOutput, Any]]:
  """loss_fn -> (params, *args) -> (loss_fn(params, *args), gradient of its loss.sum
  with respect to params)."""
  grad_fn = jax.value_and_grad(lambda p, *a: _with_sum(loss_fn(p, *a)), has_aux=True)

  def fn(params: Any, *args: Any) -> tuple[LossOutput, Any]:
    (_, out), grads = grad_fn(params, *args)
    return out, grads

  return fn


def _with_sum(out: LossOutput) -> tuple[jax.Array, LossOutput]:
  return out.loss.sum, out


def sums_and_grads(loss_fn: LossFn, params: Any, batch: Any, rng: jax.Array,
                   accum_steps: int = 1) -> tuple[LossOutput, Any]:
  """(loss output, gradient of loss.sum) summed over the batch's microbatches."""
  grad_fn = value_and_grad(loss_fn)
  if accum_steps == 1:
    return grad_fn(params, batch, rng)

  def body(carry, xs):
    mb, i = xs
    return jax.tree.map(jnp.add, carry,
                        grad_fn(params, mb, jax.random.fold_in(rng, i))), None

  mbs = _microbatches(batch, accum_steps)
  first = jax.tree.map(lambda x: x[0], mbs)
  shapes = jax.eval_shape(lambda: grad_fn(params, first, rng))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(body, zeros, (mbs, jnp.arange(accum_steps)))
  return total


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    accum_steps: int = 1):
  """(state, batch[, frozen]) -> (state, metrics); jit it with donate_argnums=0."""

  def train_step(state: TrainState, batch: Any, frozen: Any = None
                 ) -> tuple[TrainState, dict[str, Any]]:
    rng, step_rng = jax.random.split(state.rng)
    step_rng = jax.random.fold_in(step_rng, state.step)
    fn = loss_fn if frozen is None else (
        lambda p, b, r: loss_fn(p, b, r, jax.lax.stop_gradient(frozen)))
    out, grads = sums_and_grads(fn, state.params, batch, step_rng, accum_steps)
    den = jnp.maximum(out.loss.count, 1e-9)
    grads = jax.tree.map(lambda g: g / den, grads)
    loss = out.loss.sum / den
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    # A non-finite step changes nothing (the loop then stops): no NaN reaches the
    # parameters, the optimizer moments or a checkpoint.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.int32),
               "denominator": den}
    for name, m in out.metrics.items():
      metrics[name] = m.sum / jnp.maximum(m.count, 1e-9)
    return new, metrics

  return train_step


def make_eval_step(loss_fn: LossFn):
  """(params, batch, rng[, frozen]) -> {name: Metric} including 'loss'; add these
  over batches and divide at the end (exact across batches and hosts)."""

  def eval_step(params: Any, batch: Any, rng: jax.Array, frozen: Any = None) -> Metrics:
    extra = () if frozen is None else (frozen,)
    out = loss_fn(params, batch, rng, *extra)
    return {"loss": out.loss, **out.metrics}

  return eval_step
