"""DPO reference log-probs: computed once in a sharded pass, cached on disk.

The reference model is frozen, so its summed response log-probs for a fixed set of
tokenized pairs never change: computing them once saves a forward pass per step. The
cache file is named by a hash of everything that fixes them:

  * the reference params (`params_fingerprint`: an exact, layout-independent hash),
  * the model config (dtype, rope, ...; not remat or layer scanning, which change how
    the values are computed, not what they are),
  * the tokenized data (token ids of every prompt and response, and pair ids), which
    already reflects the tokenizer, the chat template and the persona switch; the
    tokenizer name and the system template are hashed too, so that the key names them.

A run with the same inputs reuses the file; any change gives a new key and a new file.
Files are JSON (no pickle), written by process 0, readable from gs:// through etils.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from rlhi import fileio
from rlhi import inputs
from rlhi import sharding
from rlhi.models import llama
from rlhi.train import objectives

CHOSEN, REJECTED = "ref_chosen_logps", "ref_rejected_logps"
_GOLDEN = 0x9E3779B1  # odd multiplier (2^32 / golden ratio): spreads element indices


def params_fingerprint(params: Any) -> str:
  """An exact hash of parameter values, whatever their sharding.

  Each leaf's bits are summed modulo 2^32, plain and weighted by an odd multiple of
  the element index. Integer addition modulo 2^32 is associative, so the result does
  not depend on how XLA splits the reduction over devices (a float sum would), and the
  whole thing runs on device without gathering the params to one host.
  """

  def leaf_hash(x):
    bits = jax.lax.bitcast_convert_type(
        x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
    bits = bits.astype(jnp.uint32).reshape(-1)
    index = jnp.arange(bits.size, dtype=jnp.uint32)
    return jnp.stack([bits.sum(dtype=jnp.uint32),
                      (bits * (index * jnp.uint32(_GOLDEN) + 1)).sum(dtype=jnp.uint32)])

  leaves, treedef = jax.tree.flatten(params)
  hashes = jax.device_get(jax.jit(lambda ls: [leaf_hash(x) for x in ls])(leaves))
  h = hashlib.sha256(str(treedef).encode())
  for x, v in zip(leaves, hashes):
    h.update(f"{x.shape}{x.dtype}".encode())
    h.update(np.asarray(v, np.uint32).tobytes())
  return h.hexdigest()


def data_fingerprint(examples: Sequence[Mapping[str, Any]]) -> str:
  h = hashlib.sha256()
  for e in examples:
    h.update(str(e.get("pair_id", "")).encode() + b"\0")
    for k in inputs.PAIR_KEYS:
      ids = np.asarray(e[k], np.int32)
      h.update(len(ids).to_bytes(4, "little") + ids.tobytes())
  return h.hexdigest()


def cache_key(params_fp: str, config: llama.LlamaConfig, data_fp: str, *,
              tokenizer: str, system_template: str) -> str:
  fields = dataclasses.asdict(config)
  # Layout switches that do not change the values.
  for k in ("remat_policy", "scan_layers"):
    fields.pop(k, None)
  blob = json.dumps({"params": params_fp, "model": fields, "data": data_fp,
                     "tokenizer": tokenizer, "template": system_template},
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:32]


def jitted_logps(config: llama.LlamaConfig, mesh: jax.sharding.Mesh, chunk: int = 256):
  """(params, pairs batch) -> summed response log-probs [2B], replicated: the program
  `compute` runs per batch (rlhi/aot compiles it for a TPU topology)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(lambda p, b: objectives.sequence_logps(p, config, b, chunk)[0],
                 out_shardings=replicated)


def compute(params: Any, config: llama.LlamaConfig,
            examples: Sequence[Mapping[str, Any]], *, mesh: jax.sharding.Mesh,
            batch_size: int, pad_id: int, bucket_lengths: Sequence[int],
            chunk: int = 256, packing: bool = False, rules: sharding.Rules | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
  """Summed response log-probs of chosen and rejected under `params`: float32[N] each.

  One pass over the examples in order, batch-sharded on `mesh` like a train step; every
  process gets the full arrays. With `packing` the batches are packed (a pair's prompt
  once for both responses; rlhi/inputs/batches.py `pack`): the same values up to float32
  rounding, in fewer tokens. `rules` (default sharding.DEFAULT_RULES) shard the batches
  and activations, as `config.sharding_rules` shard training's.
  """
  rules = sharding.DEFAULT_RULES if rules is None else rules
  n_proc = jax.process_count()
  if batch_size % n_proc:
    raise ValueError(f"batch_size {batch_size} must be divisible by {n_proc} processes")
  fn = jitted_logps(config, mesh, chunk)
  out = []
  with sharding.use_mesh(mesh, rules):
    for global_batch, _ in inputs.host_batches(
        examples, batch_size=batch_size, pad_id=pad_id, bucket_lengths=bucket_lengths,
        mesh=mesh, rules=rules, packing=packing, score_positions=True,
        exclude=(CHOSEN, REJECTED)):
      logps = np.asarray(jax.device_get(fn(params, global_batch)), np.float32)
      if packing:  # slot order -> the batch's example order
        index = sharding.to_host(global_batch["example_index"]).reshape(-1)
        n, used = index.size, index >= 0
        ordered = np.zeros(2 * batch_size, np.float32)
        ordered[index[used]] = logps[:n][used]
        ordered[batch_size + index[used]] = logps[n:][used]
        logps = ordered
      out.append(logps)
  # Global batch k holds examples [k * batch_size, (k + 1) * batch_size) in order
  # (no shuffle); each output is [2 * batch_size]: chosen rows, then rejected.
  chosen = np.concatenate([o[:batch_size] for o in out])[:len(examples)]
  rejected = np.concatenate([o[batch_size:] for o in out])[:len(examples)]
  return chosen, rejected


def attach(examples: Sequence[Mapping[str, Any]], chosen: np.ndarray,
           rejected: np.ndarray) -> list[dict[str, Any]]:
  """Copies of `examples` carrying their reference log-probs (rlhi.inputs.PAIR_FLOATS)."""
  if not len(examples) == len(chosen) == len(rejected):
    raise ValueError(f"{len(examples)} examples but {len(chosen)}/{len(rejected)} "
                     f"reference log-probs")
  return [dict(e) | {CHOSEN: np.float32(c), REJECTED: np.float32(r)}
          for e, c, r in zip(examples, chosen, rejected)]


@dataclasses.dataclass
class CacheResult:
  examples: list[dict[str, Any]]  # with reference log-probs attached
  path: str
  reused: bool


def cached(params: Any, config: llama.LlamaConfig,
           examples: Sequence[Mapping[str, Any]], *, cache_dir: str, tokenizer: str,
           system_template: str, params_fp: str | None = None,
           **compute_args: Any) -> CacheResult:
  """`examples` with reference log-probs, from `cache_dir` when a file for exactly these
  inputs exists there, else computed (`compute`) and written by process 0."""
  params_fp = params_fp or params_fingerprint(params)
  data_fp = data_fingerprint(examples)
  key = cache_key(params_fp, config, data_fp, tokenizer=tokenizer,
                  system_template=system_template)
  path = epath.Path(cache_dir) / f"reference_logps_{key}.json"
  if path.exists():
    saved = json.loads(path.read_text())
    if saved.get("data") == data_fp and len(saved["chosen"]) == len(examples):
      logging.info("reference log-probs: reusing %s", path)
      return CacheResult(attach(examples, np.asarray(saved["chosen"], np.float32),
                                np.asarray(saved["rejected"], np.float32)),
                         str(path), True)
    logging.warning("reference log-probs: %s does not match the data; recomputing", path)
  chosen, rejected = compute(params, config, examples, **compute_args)
  if not (np.isfinite(chosen).all() and np.isfinite(rejected).all()):
    raise FloatingPointError("reference log-probs are not finite: check the reference "
                             "checkpoint (config.reference.init) and its dtype")
  if sharding.is_main_process():
    path.parent.mkdir(parents=True, exist_ok=True)
    # float32 -> Python float (float64) is exact, and JSON keeps 17 digits: the values
    # read back are bit-identical. Several runs may share a cache_dir: atomic_write
    # gives each its own temporary file.
    with fileio.atomic_write(os.fspath(path)) as f:
      f.write(json.dumps({
          "key": key, "params": params_fp, "data": data_fp, "tokenizer": tokenizer,
          "template": system_template, "pair_ids": [str(e.get("pair_id", ""))
                                                    for e in examples],
          "chosen": [float(x) for x in chosen], "rejected": [float(x) for x in rejected],
      }))
  return CacheResult(attach(examples, chosen, rejected), str(path), False)
