"""Layer 3 of rlhi.inputs: examples -> fixed-shape, resumable batches: padding to a
bucket (`pad_batch`), packing (`pack`, `pack_batch`), this host's slice as a grain
`MapDataset` (`make_batches`) and its checkpointable iterator (`make_iterator`), and one
ordered pass in global batches (`host_batches`)."""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from rlhi.inputs.tokenization import (
    Batch,
    DEFAULT_BUCKETS,
    Example,
    PAIR_FLOATS,
    SEQUENCE_FIELDS,
    example_kind,
    example_layout,
    normalise_example,
)

# ----------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------


def bucket_length(n: int, bucket_lengths: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """The smallest bucket that holds `n` tokens."""
  for b in bucket_lengths:
    if n <= b:
      return b
  raise ValueError(f"an example of {n} tokens is longer than the largest bucket "
                   f"{bucket_lengths[-1]}; tokenize with max_length <= "
                   f"{bucket_lengths[-1]} or add a bucket")


def _pad_rows(seqs: Sequence[np.ndarray], masks: Sequence[np.ndarray], batch_size: int,
              length: int, pad_id: int) -> Batch:
  """Right-padded [batch_size, length] arrays; rows past len(seqs) are all padding.

  `masks` mark target tokens in the sequence; the batch's loss_mask marks positions
  whose *target* (the next token) is one of them.
  """
  tokens = np.full((batch_size, length), pad_id, np.int32)
  loss_mask = np.zeros((batch_size, length), np.float32)
  positions = np.zeros((batch_size, length), np.int32)
  segment_ids = np.zeros((batch_size, length), np.int32)
  for i, (seq, mask) in enumerate(zip(seqs, masks)):
    n = len(seq)
    tokens[i, :n] = seq
    loss_mask[i, :n - 1] = mask[1:]
    positions[i, :n] = np.arange(n)
    segment_ids[i, :n] = 1
  targets = np.full_like(tokens, pad_id)
  targets[:, :-1] = tokens[:, 1:]
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
          "positions": positions, "segment_ids": segment_ids}


def score_width(count: int, length: int) -> int:
  """Columns of `score_positions` for rows of `length` with at most `count` response
  targets: the smallest multiple of length / 4 that holds them (at most 4 widths per
  length, so few compiled shapes)."""
  quarter = max(length // 4, 1)
  return min(length, _round_up(count, quarter))


def score_columns(loss_mask: np.ndarray, width: int) -> np.ndarray:
  """int32 [R, width]: the columns of each row where loss_mask is 1, in order, then
  the last column (whose loss_mask is always 0: its target is past the row). The LM
  head runs on these columns only (objectives.sequence_logps), not on prompts or
  padding."""
  rows, length = loss_mask.shape
  out = np.full((rows, width), length - 1, np.int32)
  for r in range(rows):
    cols = np.flatnonzero(loss_mask[r])
    if len(cols) > width:
      raise ValueError(f"score_columns: {len(cols)} response targets in a row, "
                       f"width {width}")
    out[r, :len(cols)] = cols
  return out


def pad_batch(examples: Sequence[Mapping[str, Any]], *, batch_size: int, pad_id: int,
              bucket_lengths: Sequence[int] = DEFAULT_BUCKETS,
              with_metadata: bool = False, length_of: Sequence[Mapping[str, Any]] = (),
              score_positions: bool = False) -> Batch:
  """Examples (all SFT or all pairs) -> one fixed-shape batch; see docs/inputs.md.

  SFT: tokens, targets, loss_mask, positions, segment_ids: [B, L]; valid: bool[B].
  Pairs: chosen_* and rejected_* (the same five, both [B, L], one L for both so they
  stack into one forward pass), prompt_length: int32[B], valid: bool[B], float32[B]
  `ref_chosen_logps` / `ref_rejected_logps` when the examples carry them, and with
  `score_positions` (for DPO log-probs) `*_score_positions` int32 [B, K]: the columns
  whose target is a response token (`score_columns`).
  L is the smallest bucket holding the longest sequence of `length_of` (default: of
  `examples`): a host pads its rows to the bucket of the whole global batch, so that
  every host builds the same shape. Rows past len(examples) (a last partial batch) are
  padding with valid=False.
  """
  examples = [normalise_example(e) for e in examples]
  length_of = [normalise_example(e) for e in length_of] or examples
  if not 0 <= len(examples) <= batch_size or not length_of:
    raise ValueError(f"pad_batch: {len(examples)} examples for batch size {batch_size}")
  kind = example_kind(length_of[0])
  valid = np.arange(batch_size) < len(examples)
  if kind == "sft":
    length = bucket_length(max(len(e["tokens"]) for e in length_of), bucket_lengths)
    batch = _pad_rows([e["tokens"] for e in examples],
                      [e["loss_mask"] for e in examples], batch_size, length, pad_id)
  else:
    length = bucket_length(
        max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
            for e in length_of), bucket_lengths)
    width = score_width(max(max(len(e["chosen_ids"]), len(e["rejected_ids"]))
                            for e in length_of), length)
    batch = {"prompt_length": np.zeros(batch_size, np.int32)}
    batch["prompt_length"][:len(examples)] = [len(e["prompt_ids"]) for e in examples]
    for side in ("chosen", "rejected"):
      seqs = [np.concatenate([e["prompt_ids"], e[f"{side}_ids"]]) for e in examples]
      masks = [np.concatenate([np.zeros(len(e["prompt_ids"]), np.int32),
                               np.ones(len(e[f"{side}_ids"]), np.int32)])
               for e in examples]
      rows = _pad_rows(seqs, masks, batch_size, length, pad_id)
      if score_positions:
        rows["score_positions"] = score_columns(rows["loss_mask"], width)
      batch |= {f"{side}_{k}": v for k, v in rows.items()}
    for k in PAIR_FLOATS:
      if k in length_of[0]:
        batch[k] = np.zeros(batch_size, np.float32)
        batch[k][:len(examples)] = [e[k] for e in examples]
  batch["valid"] = valid
  if with_metadata:
    for k in example_layout(kind)[1]:
      batch[k] = np.array([e[k] for e in examples] + [""] * (batch_size - len(examples)))
  return batch


def stack_pairs(batch: Mapping[str, np.ndarray]) -> Batch:
  """Pairs batch -> one [2B, L] batch, chosen rows first, for a single forward pass.

  Returns tokens, targets, loss_mask, positions, segment_ids: [2B, L];
  prompt_length: int32[2B]; valid: bool[2B]. Row i and row B + i are one pair.
  """
  out = {k: np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
         for k in SEQUENCE_FIELDS}
  for k in ("prompt_length", "valid"):
    out[k] = np.concatenate([batch[k], batch[k]])
  return out


# ----------------------------------------------------------------------------------------
# Packing: several examples per row; a pair's prompt once, shared by both responses.
# ----------------------------------------------------------------------------------------


def packed_length(example: Mapping[str, Any]) -> int:
  """Tokens an example takes in a packed row.

  SFT: its tokens. A pair: the prompt once and each response after a copy of the
  prompt's last token (len(prompt) + len(chosen) + len(rejected) + 1), see `pack`.
  """
  if "tokens" in example:
    return len(example["tokens"])
  return (len(example["prompt_ids"]) + len(example["chosen_ids"])
          + len(example["rejected_ids"]) + 1)


def plan_rows(lengths: Sequence[int], length: int) -> list[list[int]]:
  """First-fit decreasing: which examples (indices into `lengths`) share each row of
  `length` tokens. Deterministic; ties keep the input order."""
  rows: list[list[int]] = []
  room: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    n = lengths[i]
    if n > length:
      raise ValueError(f"a packed example of {n} tokens does not fit a row of {length}")
    for r, free in enumerate(room):
      if n <= free:
        rows[r].append(i)
        room[r] -= n
        break
    else:
      rows.append([i])
      room.append(length - n)
  return [sorted(r) for r in rows]


def pack(examples: Sequence[Mapping[str, Any]], rows: Sequence[Sequence[int]], *,
         num_rows: int, length: int, slots: int, pad_id: int, first_index: int = 0,
         width: int | None = None) -> Batch:
  """Examples laid out in `num_rows` rows of `length` tokens, `rows[r]` in row r.

  Every array is [R, ...] so that sharding and accumulation split rows, and all an
  example's numbers travel with its row. Example j of row r has segment id j + 1
  (`slots` per row at most) and positions from 0; its values are in slot j of the
  per-slot arrays [R, slots]; `pair_index` / `example_index` is its index in the
  global batch (`first_index` + its index in `examples`), -1 on an empty slot.

  SFT: tokens, targets, loss_mask, positions, segment_ids [R, L] as in `pad_batch`,
  `valid` [R, slots]; the loss sums over loss_mask, so it is the unpacked loss.

  Pairs (Wang & Hegde 2024, arXiv 2410.20305): one segment holds
  [prompt[:-1], prompt[-1], chosen, prompt[-1], rejected] with response_ids
  0 ... 0, 1 ... 1, 2 ... 2; both responses continue the prompt's positions, and the
  attention mask (llama.attention_mask) lets each see the prompt and itself only. The
  prompt's last token is repeated so that each response has the query that predicts
  its first token: the copy sees exactly what the prompt's last token sees in an
  unpacked row. loss_mask marks positions whose target is a token of the same
  response; with a `width`, `score_positions` [R, width] lists those columns
  (`score_columns`; for DPO log-probs). Per slot: valid,
  prompt_length, chosen_end / rejected_end (column of each response's last token,
  where the reward model reads its score) and the reference log-probs when the
  examples carry them.
  """
  kind = example_kind(examples[0]) if examples else "pairs"
  tokens = np.full((num_rows, length), pad_id, np.int32)
  loss_mask = np.zeros((num_rows, length), np.float32)
  positions = np.zeros((num_rows, length), np.int32)
  segment_ids = np.zeros((num_rows, length), np.int32)
  response_ids = np.zeros((num_rows, length), np.int32)
  per_slot = {"valid": np.zeros((num_rows, slots), bool),
              "example_index": np.full((num_rows, slots), -1, np.int32)}
  if kind == "pairs":
    per_slot |= {k: np.zeros((num_rows, slots), np.int32)
                 for k in ("prompt_length", "chosen_end", "rejected_end")}
    per_slot |= {k: np.zeros((num_rows, slots), np.float32)
                 for k in PAIR_FLOATS if examples and k in examples[0]}
  if len(rows) > num_rows:
    raise ValueError(f"pack: {len(rows)} rows planned for {num_rows}")
  for r, members in enumerate(rows):
    if len(members) > slots:
      raise ValueError(f"pack: {len(members)} examples in a row of {slots} slots")
    o = 0
    for j, i in enumerate(members):
      e = examples[i]
      per_slot["valid"][r, j] = True
      per_slot["example_index"][r, j] = first_index + i
      if kind == "sft":
        n = len(e["tokens"])
        tokens[r, o:o + n] = e["tokens"]
        loss_mask[r, o:o + n - 1] = e["loss_mask"][1:]
        positions[r, o:o + n] = np.arange(n)
        segment_ids[r, o:o + n] = j + 1
        o += n
        continue
      p, c, x = e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]
      n = len(p)
      if n == 0:
        raise ValueError("pack: a pair with an empty prompt cannot share it")
      pieces = [(p[:-1], 0, 0), (np.concatenate([p[-1:], c]), 1, n - 1),
                (np.concatenate([p[-1:], x]), 2, n - 1)]
      for ids, resp, pos0 in pieces:
        k = len(ids)
        tokens[r, o:o + k] = ids
        positions[r, o:o + k] = pos0 + np.arange(k)
        segment_ids[r, o:o + k] = j + 1
        response_ids[r, o:o + k] = resp
        if resp:
          loss_mask[r, o:o + k - 1] = 1.0
          per_slot["chosen_end" if resp == 1 else "rejected_end"][r, j] = o + k - 1
        o += k
      per_slot["prompt_length"][r, j] = n
      for k in PAIR_FLOATS:
        if k in per_slot:
          per_slot[k][r, j] = e[k]
  targets = np.full_like(tokens, pad_id)
  targets[:, :-1] = tokens[:, 1:]
  batch = {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
           "positions": positions, "segment_ids": segment_ids} | per_slot
  if kind == "pairs":
    batch["response_ids"] = response_ids
    if width is not None:
      batch["score_positions"] = score_columns(loss_mask, width)
  return batch


def is_packed(batch: Mapping[str, Any]) -> bool:
  """Whether a batch was made by `pack` (per-slot arrays) rather than `pad_batch`."""
  return "example_index" in batch


def _round_up(n: int, multiple: int) -> int:
  return -(-max(n, 1) // multiple) * multiple


def pack_batch(examples: Sequence[Mapping[str, Any]], *, pad_id: int,
               bucket_lengths: Sequence[int] = DEFAULT_BUCKETS, row_multiple: int = 1,
               hosts: Sequence[Sequence[Mapping[str, Any]]] = (), host: int = 0,
               score_positions: bool = False) -> Batch:
  """`pack` with a shape every host agrees on: this host's `examples` (hosts[host],
  when the global batch's `hosts` are given), in rows of the smallest bucket that
  holds the longest packed example of the global batch (a pair may need up to twice
  the largest bucket: that length is allowed), as many rows as the fullest host
  needs rounded up to `row_multiple`, and a power of two of slots; with
  `score_positions` (pairs, for DPO log-probs), a `score_positions` width that holds
  the fullest row of any host."""
  examples = [normalise_example(e) for e in examples]
  hosts = [[normalise_example(e) for e in h] for h in hosts] or [examples]
  everything = [e for h in hosts for e in h]
  if not everything:
    raise ValueError("pack_batch: no examples")
  buckets = tuple(bucket_lengths) + (2 * bucket_lengths[-1],)
  length = bucket_length(max(packed_length(e) for e in everything), buckets)
  plans = [plan_rows([packed_length(e) for e in h], length) for h in hosts]
  num_rows = _round_up(max(len(p) for p in plans), row_multiple)
  most = max((len(r) for p in plans for r in p), default=1)
  slots = 1 << (most - 1).bit_length()
  first = sum(len(h) for h in hosts[:host])
  width = None
  if score_positions and example_kind(everything[0]) == "pairs":
    # Response targets of the fullest row of any host: hosts agree on the width.
    count = max(sum(len(h[i]["chosen_ids"]) + len(h[i]["rejected_ids"]) for i in r)
                for h, p in zip(hosts, plans) for r in p)
    width = score_width(count, length)
  return pack(examples, plans[host], num_rows=num_rows, length=length, slots=slots,
              pad_id=pad_id, first_index=first, width=width)


@dataclasses.dataclass(frozen=True)
class _Padder:
  """grain batch_fn: a global batch -> this host's rows, padded to the global bucket.

  (A class, not a lambda, so that grain worker processes can pickle it.)
  """
  per_host_batch_size: int
  pad_id: int
  bucket_lengths: tuple[int, ...]
  with_metadata: bool
  process_index: int = 0
  process_count: int = 1
  packing: bool = False
  row_multiple: int = 1
  score_positions: bool = False

  def __call__(self, examples: Sequence[Example]) -> Batch:
    start = self.process_index * self.per_host_batch_size
    if self.packing:
      b = self.per_host_batch_size
      hosts = [examples[i * b:(i + 1) * b] for i in range(self.process_count)]
      batch = pack_batch(hosts[self.process_index], pad_id=self.pad_id,
                         bucket_lengths=self.bucket_lengths,
                         row_multiple=self.row_multiple, hosts=hosts,
                         host=self.process_index,
                         score_positions=self.score_positions)
      if self.with_metadata:
        raise ValueError("with_metadata is not supported with packing")
      return batch
    return pad_batch(examples[start:start + self.per_host_batch_size],
                     batch_size=self.per_host_batch_size, pad_id=self.pad_id,
                     bucket_lengths=self.bucket_lengths,
                     with_metadata=self.with_metadata, length_of=examples,
                     score_positions=self.score_positions)


def _shuffle_seed(seed: int) -> int:
  # grain shuffles epoch e with seed + e; mixing the user seed first keeps runs with
  # seeds s and s + 1 from sharing an epoch order.
  return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


def make_batches(source: Sequence[Example], *, per_host_batch_size: int, pad_id: int,
                 bucket_lengths: Sequence[int] = DEFAULT_BUCKETS, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, process_index: int = 0,
                 process_count: int = 1, with_metadata: bool = False,
                 packing: bool = False, row_multiple: int = 1,
                 score_positions: bool = False) -> grain.MapDataset:
  """Source of tokenized examples -> grain MapDataset of this host's fixed-shape batches.

  Pipeline: source -> shuffle (deterministic in (seed, epoch), different every epoch)
  -> repeat `num_epochs` (None: forever) -> global batches of
  `per_host_batch_size * process_count` -> this host's contiguous block of rows,
  right-padded to the bucket of the whole global batch (`pad_batch`).

  So the global batch is the same whatever the number of hosts (a run resumed on another
  topology sees the same data), every host builds the same shapes, and host i's rows
  are rows [i * per_host, (i + 1) * per_host) of the global batch, the order in which
  `sharding.global_batch` assembles them. Batches run across epoch boundaries; with a
  finite `num_epochs` and drop_remainder=False the last batch is completed with padding
  rows (valid=False) so that shapes stay fixed.

  With `packing`, each host's examples are packed into rows (`pack_batch`: a pair's
  prompt is shared by its two responses) instead of one example per row: the batch
  still holds `per_host_batch_size` examples, in a number of rows that varies with
  their lengths (a multiple of `row_multiple`; give the number of batch shards times
  accum_steps, over the processes) and per-slot arrays; see docs/inputs.md.
  `score_positions`: pairs batches carry the columns of the response targets, where
  DPO's log-probs run the LM head (`score_columns`); the reward model needs none.
  """
  if per_host_batch_size <= 0:
    raise ValueError(f"per_host_batch_size must be positive, got {per_host_batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  buckets = tuple(int(b) for b in bucket_lengths)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
    raise ValueError(f"bucket_lengths must be positive and increasing, got {buckets}")
  ds = grain.MapDataset.source(source)
  if len(ds) == 0:
    raise ValueError("make_batches: the source has no examples")
  if shuffle:
    ds = ds.shuffle(seed=_shuffle_seed(seed))
  ds = ds.repeat(num_epochs)
  if row_multiple <= 0:
    raise ValueError(f"row_multiple must be positive, got {row_multiple}")
  return ds.batch(per_host_batch_size * process_count, drop_remainder=drop_remainder,
                  batch_fn=_Padder(per_host_batch_size, pad_id, buckets, with_metadata,
                                   process_index, process_count, packing, row_multiple,
                                   score_positions))


def host_batches(examples: Sequence[Example], *, batch_size: int, pad_id: int,
                 bucket_lengths: Sequence[int] = DEFAULT_BUCKETS, mesh: Any = None,
                 rules: Any = None, packing: bool = False, score_positions: bool = False,
                 exclude: Sequence[str] = ()) -> Iterator[tuple[dict[str, Any], Batch]]:
  """One ordered pass over `examples` (no shuffle), as (global batch, host batch).

  The pass every evaluation-style caller makes (held-out metrics, reference log-probs,
  reward-model scores): each process batches its own rows of each global batch of
  `batch_size` examples (`make_batches`; at least one row per process), and
  `sharding.global_batch` makes them global arrays on `mesh` (None: the mesh in
  context) with `rules` (None: the rules in context, `sharding.current_rules()`). The last batch is completed
  with padding rows (valid=False). The host batch keeps what stays on the host
  (metadata strings). `exclude`: host columns not sent to the devices.
  """
  import jax  # pylint: disable=g-import-not-at-top  (this module is jax-free otherwise)
  from rlhi import sharding  # pylint: disable=g-import-not-at-top
  rules = sharding.current_rules() if rules is None else rules
  n_proc = jax.process_count()
  row_multiple = 1
  if packing:
    row_multiple = sharding.row_multiple(
        mesh if mesh is not None else jax.sharding.get_mesh(), rules=rules)
  batches = make_batches(
      examples, per_host_batch_size=max(1, batch_size // n_proc), pad_id=pad_id,
      bucket_lengths=tuple(bucket_lengths), shuffle=False, num_epochs=1,
      drop_remainder=False, process_index=jax.process_index(), process_count=n_proc,
      packing=packing, row_multiple=row_multiple, score_positions=score_positions)
  for host_batch in batches:
    sent = {k: v for k, v in host_batch.items() if k not in exclude}
    yield sharding.global_batch(sent, mesh, rules), host_batch


class BatchIterator(grain.DatasetIterator):
  """A grain iterator whose state also records the pipeline it belongs to.

  `get_state()` is {'next_index': int, 'pipeline': {...}}, JSON-ready; `set_state`
  refuses a state saved by a different pipeline (batch size, seed, hosts, data size),
  which would otherwise resume at a silently wrong position.
  """

  def __init__(self, parent: grain.DatasetIterator, pipeline: Mapping[str, Any]):
    super().__init__(parent)
    self._pipeline = json.loads(json.dumps(dict(pipeline)))  # JSON types only

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return dict(self._parent.get_state()) | {"pipeline": self._pipeline}

  def set_state(self, state: Mapping[str, Any]) -> None:
    state = dict(state)
    saved = state.pop("pipeline", None)
    if saved is not None and saved != self._pipeline:
      diff = {k: (saved.get(k), v) for k, v in self._pipeline.items()
              if saved.get(k) != v}
      raise ValueError(f"input state was saved by a different pipeline; "
                       f"(saved, now): {diff}")
    self._parent.set_state(state)


def make_iterator(source: Sequence[Example], *, num_threads: int = 0,
                  prefetch_buffer_size: int = 4, **batch_options: Any) -> BatchIterator:
  """`make_batches(source, **batch_options)` as an iterator with a restorable state.

  Use num_threads > 0 when the source reads from disk or a bucket (array_record); 0 is
  best for an in-memory HF source (no GIL contention).
  """
  bound = inspect.signature(make_batches).bind(source, **batch_options)
  bound.apply_defaults()
  # What fixes the sequence of global batches; not the host layout (a run may resume
  # on another number of hosts) nor the row layout (packing), and with_metadata only
  # adds columns.
  args = bound.arguments
  pipeline = {k: v for k, v in args.items() if k not in (
      "source", "with_metadata", "per_host_batch_size", "process_index",
      "process_count", "packing", "row_multiple", "score_positions")}
  pipeline["global_batch_size"] = args["per_host_batch_size"] * args["process_count"]
  pipeline["num_examples"] = len(source)
  batches = make_batches(source, **batch_options)
  it = batches.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)).__iter__()
  return BatchIterator(it, pipeline)
