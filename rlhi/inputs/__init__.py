r"""Tokenized examples -> fixed-shape, resumable batches (grain).

Three layers, each a module usable on its own (this package re-exports their public
names: `inputs.make_batches` is `inputs.batches.make_batches`):

1. `tokenization` (pure, numpy int32). `tokenize_conversation` / `tokenize_completion`
   give SFT examples {tokens, loss_mask}; `tokenize_pair` gives preference examples
   {prompt_ids, chosen_ids, rejected_ids} for the reward model and DPO. Each returns a
   `Tokenized` (the example, or None when it cannot fit, plus what truncation did);
   `tokenize_conversations` / `tokenize_pairs` run them over a data set and count
   everything in `InputStats`.
2. `sources`: sources of tokenized examples with random access: an HF `datasets.Dataset`
   (`hf_source`, the default), the work directory's pair sets (`pair_sets`) or a TFDS
   data set in array_record format (`write_array_record_dataset` + `tfds_source`, read
   without TensorFlow) so that pod hosts read a prepared data set from a bucket.
3. `batches`: `make_batches`: source -> this host's slice -> shuffle (seed, epoch) ->
   repeat -> batch -> right-pad to a bucket length (or pack), as a grain `MapDataset`;
   `make_iterator` wraps it in an iterator whose `get_state()` is a JSON-ready dict for
   checkpoints; `host_batches` is one ordered pass in global batches.

Typical use::

  fmt = tokenizer.ChatFormatter(tokenizer.load_tokenizer("bundled"))
  pairs = schema.read_jsonl(f"{workdir}/pairs_rewrites.train.jsonl",
                            schema.PreferencePair)
  examples, stats = inputs.tokenize_pairs(fmt, pairs, with_persona=True,
                                          max_length=1024, max_response_length=512)
  it = inputs.make_iterator(
      inputs.hf_source(examples), per_host_batch_size=8, pad_id=fmt.pad_id,
      seed=0, process_index=jax.process_index(), process_count=jax.process_count())
  batch = next(it)                   # numpy; sharding.py makes global arrays
  checkpoint["input"] = it.get_state()

See docs/inputs.md for the batch layout and the truncation rule. This module imports
jax only inside `host_batches` (one ordered pass in global batches, for evaluation):
conversion to global device arrays lives in rlhi/sharding.py.
"""

from rlhi.inputs.batches import (
    bucket_length,
    score_width,
    score_columns,
    pad_batch,
    stack_pairs,
    packed_length,
    plan_rows,
    pack,
    is_packed,
    pack_batch,
    make_batches,
    host_batches,
    BatchIterator,
    make_iterator,
)
from rlhi.inputs.sources import (
    hf_source,
    pairs_source,
    pair_sets,
    conversations_source,
    write_array_record_dataset,
    tfds_source,
)
from rlhi.inputs.tokenization import (
    DEFAULT_BUCKETS,
    SFT_KEYS,
    SFT_META,
    PAIR_KEYS,
    PAIR_META,
    PAIR_FLOATS,
    SEQUENCE_FIELDS,
    Example,
    Batch,
    Truncation,
    Tokenized,
    InputStats,
    tokenize_completion,
    tokenize_conversation,
    tokenize_pair,
    tokenize_pairs,
    tokenize_conversations,
    example_kind,
    example_layout,
    normalise_example,
)

__all__ = [
    "bucket_length",
    "score_width",
    "score_columns",
    "pad_batch",
    "stack_pairs",
    "packed_length",
    "plan_rows",
    "pack",
    "is_packed",
    "pack_batch",
    "make_batches",
    "host_batches",
    "BatchIterator",
    "make_iterator",
    "hf_source",
    "pairs_source",
    "pair_sets",
    "conversations_source",
    "write_array_record_dataset",
    "tfds_source",
    "DEFAULT_BUCKETS",
    "SFT_KEYS",
    "SFT_META",
    "PAIR_KEYS",
    "PAIR_META",
    "PAIR_FLOATS",
    "SEQUENCE_FIELDS",
    "Example",
    "Batch",
    "Truncation",
    "Tokenized",
    "InputStats",
    "tokenize_completion",
    "tokenize_conversation",
    "tokenize_pair",
    "tokenize_pairs",
    "tokenize_conversations",
    "example_kind",
    "example_layout",
    "normalise_example",
]
