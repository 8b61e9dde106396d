"""Reward-model checkpoints: save and load a trained persona-conditioned reward model.

A reward-model directory (what rlhi/train/reward.py exports to
`<workdir>/reward_model`) holds:

    config.json, model.safetensors[, index]   the backbone, in HF safetensors layout
                                              (hf_io), as a model with tied embeddings:
                                              a reward model has no LM head
    score/head.safetensors                    the scalar head: score.kernel [E] and
                                              score.bias []
    reward_model.json                         rlhi metadata: format, the backbone's own
                                              tie_embeddings flag, the system template the
                                              persona went in with, with_persona, ...
    tokenizer files                           when a tokenizer is given to `save`

so that evaluation scores answers with the same tokenizer and the same persona template
that training used:

    reward_io.save(params, config, path, tokenizer=fmt.tok,
                   system_template=cfg.data.system_template)
    config, params = reward_io.load(path, mesh=mesh)
    meta = reward_io.load_metadata(path)            # {'system_template': ...}

No pickle: safetensors and JSON only. `path` may be local or remote (gs://...; see
rlhi.fileio).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from rlhi import fileio
from rlhi import sharding as sharding_lib
from rlhi.data import schema
from rlhi.models import builder
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.models import reward
from rlhi.models import tokenizer as tokenizer_lib

Params = Any

FORMAT = "rlhi-reward-v1"
# In a subdirectory: hf_io reads every *.safetensors at the top level as backbone shards.
HEAD_FILE = os.path.join("score", "head.safetensors")
META_FILE = "reward_model.json"
DEFAULT_SYSTEM_TEMPLATE = schema.PERSONA_TEMPLATE


def save(params: Params, config: llama.LlamaConfig, path: str, *, tokenizer: Any = None,
         system_template: str = DEFAULT_SYSTEM_TEMPLATE, with_persona: bool = True,
         extra: dict[str, Any] | None = None) -> None:
  """Writes a reward-model directory (see the module docstring).

  Collective with several processes (like hf_io.save_checkpoint): every process calls
  it, only process 0 writes.

  Args:
    params: {'backbone': ..., 'score': {'kernel', 'bias'}} (rlhi.models.reward), any
      sharding.
    config: the backbone's LlamaConfig.
    path: output directory (created).
    tokenizer: an HF tokenizer saved alongside (save_pretrained), or None.
    system_template: how the persona was put into the system slot in training.
    with_persona: whether training saw the persona (False: the no-persona ablation).
    extra: more JSON-ready metadata to keep in reward_model.json.
  """
  if set(params) != {"backbone", "score"}:
    raise ValueError(f"reward_io.save: expected reward-model params with keys "
                     f"'backbone' and 'score' (rlhi.models.reward), got {sorted(params)}")
  # The backbone has no LM head; saved as a tied-embedding model it is a complete HF
  # checkpoint, and the true flag goes to reward_model.json.
  tied = dataclasses.replace(config, tie_embeddings=True)
  hf_io.save_checkpoint(params["backbone"], tied, path)
  head = {f"score.{k}": sharding_lib.to_host(params["score"][k]).astype(np.float32)
          for k in ("kernel", "bias")}
  if jax.process_index() != 0:
    return
  fileio.makedirs(os.path.join(path, os.path.dirname(HEAD_FILE)))
  # save(), not save_file(): bytes go to a remote path as well as a local one.
  fileio.write_bytes(os.path.join(path, HEAD_FILE),
                     safetensors.numpy.save(head, metadata={"format": "np"}))
  meta = {"format": FORMAT, "tie_embeddings": bool(config.tie_embeddings),
          "system_template": system_template, "with_persona": bool(with_persona),
          **(extra or {})}
  with fileio.open(os.path.join(path, META_FILE), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
    f.write("\n")
  if tokenizer is not None:
    tokenizer_lib.save_tokenizer(tokenizer, path)


def load_metadata(path: str) -> dict[str, Any]:
  """reward_model.json of a reward-model directory; says what is wrong if it is not."""
  file = os.path.join(path, META_FILE)
  if not fileio.exists(file):
    hint = ""
    if fileio.exists(os.path.join(path, hf_io.CONFIG_FILE)):
      hint = (" (this looks like a language-model checkpoint, not a reward model; "
              "experiments/train_reward.py exports one to <workdir>/reward_model)")
    raise FileNotFoundError(f"{file} not found: {path} is not a reward-model directory "
                            f"written by rlhi.models.reward_io.save{hint}")
  with fileio.open(file) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{file}: field 'format' is {meta.get('format')!r}, expected "
                     f"{FORMAT!r}")
  return meta


def load(path: str, mesh: jax.sharding.Mesh | None = None, *, shardings: Any = None,
         **config_overrides: Any) -> tuple[llama.LlamaConfig, Params]:
  """Loads a reward-model directory into (config, params).

  Args:
    path: a directory written by `save`.
    mesh: place the params by the logical-axis rules on this mesh; default (with no
      `shardings`) the first device.
    shardings: explicit shardings for the reward params (overrides `mesh`).
    **config_overrides: LlamaConfig fields to set (e.g. scan_layers=False).

  Returns:
    (config, params) with params = {'backbone', 'score'} as rlhi.models.reward builds.
  """
  meta = load_metadata(path)
  spec = builder.ModelSpec(init=path)
  config = builder.model_config(spec, **config_overrides)
  config = dataclasses.replace(config, tie_embeddings=meta["tie_embeddings"])
  if shardings is None:
    abstract = reward.abstract_params(config)
    if mesh is not None:
      shardings = sharding_lib.logical_shardings(abstract, mesh)
    else:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: device, sharding_lib.strip_boxes(abstract))
  # Saved as a tied-embedding model (see `save`).
  tied = dataclasses.replace(config, tie_embeddings=True)
  backbone = builder.init_params(spec, tied, shardings["backbone"])

  head_file = os.path.join(path, HEAD_FILE)
  if not fileio.exists(head_file):
    raise FileNotFoundError(f"{head_file} not found: the reward model's score head is "
                            f"missing from {path}")
  # A few KB: read whole (also from a remote path, where safe_open cannot mmap).
  head = safetensors.numpy.load(fileio.read_bytes(head_file))
  if set(head) != {"score.kernel", "score.bias"}:
    raise ValueError(f"{head_file}: expected tensors score.kernel and score.bias, got "
                     f"{sorted(head)}")
  kernel, bias = head["score.kernel"], head["score.bias"]
  if kernel.shape != (config.hidden_size,) or bias.shape != ():
    raise ValueError(f"{head_file}: score.kernel has shape {kernel.shape} and score.bias "
                     f"{bias.shape}; expected ({config.hidden_size},) and () for "
                     f"hidden_size={config.hidden_size} in config.json")
  # From a callback, so that each process builds only its own shards (multi-host).
  place = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i])
  score = {"kernel": place(kernel, shardings["score"]["kernel"]),
           "bias": place(bias, shardings["score"]["bias"])}
  return config, {"backbone": backbone, "score": score}
