"""Layer 2 of rlhi.inputs: sources of tokenized examples with random access: an HF
`datasets.Dataset` (`hf_source`, the default), the data work directory's pair sets
(`pair_sets`, one loader for DPO and the reward model), or a TFDS data set in
array_record format (`write_array_record_dataset` + `tfds_source`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhi.data import files
from rlhi.data import schema
from rlhi.inputs.tokenization import (
    Example,
    InputStats,
    example_kind,
    example_layout,
    normalise_example,
    tokenize_conversations,
    tokenize_pairs,
)

# ----------------------------------------------------------------------------------------
# Sources: HF datasets (default) and TFDS array_record.
# ----------------------------------------------------------------------------------------


def hf_source(examples: Sequence[Example]):
  """Tokenized examples -> `datasets.Dataset` with random access (numpy format).

  `examples` is a list from `tokenize_*`, or a `datasets.Dataset` of them (e.g. saved
  with `save_to_disk` and reloaded with `datasets.load_from_disk`).
  """
  import datasets  # pylint: disable=g-import-not-at-top  (heavy; TFDS users skip it)
  if isinstance(examples, datasets.Dataset):
    example_kind({k: None for k in examples.column_names})  # checks the columns
    return examples.with_format("numpy")
  if not examples:
    raise ValueError("hf_source: no examples (were they all dropped? see InputStats)")
  ids, meta = example_layout(example_kind(examples[0]))
  features = datasets.Features(
      {k: datasets.List(datasets.Value("int32")) for k in ids}
      | {k: datasets.Value("string") for k in meta})
  columns = {k: [np.asarray(e[k], np.int32) for e in examples] for k in ids}
  columns |= {k: [str(e.get(k, "")) for e in examples] for k in meta}
  return datasets.Dataset.from_dict(columns, features=features).with_format("numpy")


def pairs_source(path: str, fmt, *, with_persona: bool, max_length: int,
                 max_response_length: int | None = None):
  """`pairs_rewrites.<split>.jsonl` -> (HF source of tokenized pairs, InputStats)."""
  pairs = schema.read_jsonl(path, schema.PreferencePair)
  examples, stats = tokenize_pairs(fmt, pairs, with_persona=with_persona,
                                   max_length=max_length,
                                   max_response_length=max_response_length)
  return hf_source(examples), stats


def pair_sets(fmt, data_dir: str, wanted: Sequence[tuple[str, str, bool]], *,
              max_length: int, max_response_length: int | None = None
              ) -> tuple[dict[tuple[str, bool], Any], dict[tuple[str, bool], InputStats]]:
  """Tokenized pair sets from a data-prep directory, with their counts.

  `wanted` lists (pattern, split, with_persona), the pattern a file name such as
  'pairs_rewrites.{split}.jsonl'; returns ({(split, with_persona): examples},
  {(split, with_persona): InputStats}). A missing file is an error naming the command
  that makes it (rlhi.data.files.input_path).
  """
  sets, stats = {}, {}
  for pattern, split, with_persona in wanted:
    path = files.input_path(data_dir, pattern.format(split=split))
    sets[split, with_persona], stats[split, with_persona] = pairs_source(
        path, fmt, with_persona=with_persona, max_length=max_length,
        max_response_length=max_response_length)
  return sets, stats


def conversations_source(path: str, fmt, *, max_length: int,
                         max_response_length: int | None = None,
                         personas: Mapping[str, str] | None = None):
  """`conversations.jsonl` -> (HF source of tokenized SFT examples, InputStats)."""
  conversations = schema.read_jsonl(path, schema.Conversation)
  examples, stats = tokenize_conversations(fmt, conversations, max_length=max_length,
                                           max_response_length=max_response_length,
                                           personas=personas)
  return hf_source(examples), stats


def _tfds_features(kind: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ids, meta = example_layout(kind)
  return tfds.features.FeaturesDict(
      {k: tfds.features.Tensor(shape=(None,), dtype=np.int32) for k in ids}
      | {k: tfds.features.Text() for k in meta})


def write_array_record_dataset(splits: Mapping[str, Sequence[Example]], data_dir: str,
                               *, name: str = "rlhi_pairs", version: str = "1.0.0",
                               num_shards: int = 1, overwrite: bool = False) -> str:
  """Writes tokenized examples as a TFDS data set in array_record format.

  Layout: `{data_dir}/{name}/{version}/{name}-{split}.array_record-0000i-of-0000n` plus
  dataset_info.json and features.json, readable with `tfds_source` (no TensorFlow).
  Written with array_record and `tfds.folder_dataset.write_metadata` rather than a
  DatasetBuilder: the builder path needs modules a TensorFlow-free install lacks.

  Args:
    splits: split name -> examples (all SFT or all pairs).
    data_dir: a local directory; copy it to a bucket for a pod (docs/inputs.md).
    name: TFDS data set name (snake_case).
    version: 'x.y.z'.
    num_shards: files per split; more shards let many hosts read in parallel.
    overwrite: replace an existing data set of the same name and version.

  Returns:
    The data set directory.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"TFDS data set name {name!r}: expected snake_case [a-z][a-z0-9_]*")
  kinds = {example_kind(e) for examples in splits.values() for e in examples}
  if len(kinds) != 1:
    raise ValueError(f"write_array_record_dataset: expected examples of one kind "
                     f"(SFT or pairs) in all splits, got {sorted(kinds) or 'none'}")
  features = _tfds_features(kinds.pop())
  out = os.path.join(data_dir, name, version)
  if os.path.exists(os.path.join(out, "dataset_info.json")) and not overwrite:
    raise FileExistsError(f"{out} already holds a data set; pass overwrite=True")
  os.makedirs(out, exist_ok=True)
  split_infos = []
  for split, examples in splits.items():
    n_shards = max(1, min(num_shards, len(examples)))
    lengths, num_bytes = [], 0
    for s in range(n_shards):
      lo, hi = s * len(examples) // n_shards, (s + 1) * len(examples) // n_shards
      path = os.path.join(out, f"{name}-{split}.array_record-{s:05d}-of-{n_shards:05d}")
      # group_size:1 makes each record its own chunk: cheapest random access.
      writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      for e in examples[lo:hi]:
        writer.write(features.serialize_example(normalise_example(e)))
      writer.close()
      lengths.append(hi - lo)
      num_bytes += os.path.getsize(path)
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                           num_bytes=num_bytes))
  tfds.folder_dataset.write_metadata(
      data_dir=out, features=features, split_infos=split_infos, version=version,
      check_data=False, description="rlhi tokenized examples (rlhi.inputs)")
  return out


def tfds_source(name: str, split: str, data_dir: str, version: str = "1.0.0"):
  """Random-access source over a data set written by `write_array_record_dataset`.

  `data_dir` may be a bucket path (gs://...) on a pod: each host reads only the records
  of its slice.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.data_source(f"{name}:{version}", split=split, data_dir=data_dir,
                          download=False)
