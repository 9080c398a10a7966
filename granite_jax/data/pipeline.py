"""The pretraining input pipeline (Grain): documents → tokens → packed rows → batches.

    source (this host's slice) → shuffle (new order every epoch) → packing into rows of seq_len, tokenizing
    each text (+ EOS) piece by piece as the rows need it, or reading pre-tokenized ArrayRecord ids
    (`granite_jax.data.packing`) → next-token targets inside each row → batch

Every token of the corpus lands in exactly one row per epoch. A document longer than what is left of a row
continues in the next row as a new segment (segment ids restart, positions restart at 0). Targets never cross
a segment boundary: the last token of each segment piece has weight 0. That is the documented remainder:
one target per document piece (and the final partial batch of an infinite stream never happens).

Rows carry `input_ids`, `segment_ids` (0 = padding), `positions`, `targets` and `loss_weights`. The iterator's
`get_state()` is a small JSON-serialisable dict saved with every checkpoint, one per data stream.
"""

from __future__ import annotations

import grain
import numpy as np

from granite_jax.data.packing import PackedRows
from granite_jax.data.sources import DataError, shuffled_stream
from granite_jax.data.tokenizer import Tokenizer


def add_targets(row: dict) -> dict:
    """Next-token targets and weights from a packed row; a target must be in the same segment as its input."""
    ids, segments = row["input_ids"], row["segment_ids"]
    targets = np.zeros_like(ids)
    targets[:-1] = ids[1:]
    same = np.zeros(ids.shape, bool)
    same[:-1] = (segments[1:] == segments[:-1]) & (segments[:-1] > 0)
    return {"input_ids": ids, "segment_ids": segments, "positions": row["positions"],
            "targets": targets, "loss_weights": same.astype(np.float32)}


def pretraining_dataset(documents, tokenizer: Tokenizer, *, vocab_size: int, seq_len: int,
                        batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                        num_epochs: int | None = None) -> grain.IterDataset:
    """Batches of packed rows (numpy, leading dim `batch_size`) for this host; infinite unless `num_epochs`.

    `documents`: a sequence of texts, or a random-access source of pre-tokenized records (bytes).
    """
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len} must be at least 2")
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    documents = shuffled_stream(documents, seed=seed, shard_index=shard_index, shard_count=shard_count,
                                num_epochs=num_epochs, what="documents")
    rows = PackedRows(documents, tokenizer, vocab_size, seq_len)
    return rows.map(add_targets).batch(batch_size, drop_remainder=True)


class _StreamsIterator:
    """Batches of this process's data streams concatenated row-wise: stream `first + k` gives the k-th
    `batch_size / count` rows of this process's share of every global batch.

    Its state names each stream by its index in the run, `{"count": S, "streams": {"3": state, ...}}`: the
    positions the processes of one job save merge into one map that another process count restores from
    (`granite_jax.train.checkpoint`)."""

    def __init__(self, iterators, first: int, count: int):
        self.iterators, self.first, self.count = iterators, first, count

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        return {"count": self.count,
                "streams": {str(self.first + k): it.get_state() for k, it in enumerate(self.iterators)}}

    def set_state(self, state: dict) -> None:
        streams = state["streams"]
        if isinstance(streams, list):  # a checkpoint of an earlier version: this process's streams, in order
            streams = {str(self.first + k): s for k, s in enumerate(streams)}
        if state.get("count", self.count) != self.count:
            raise DataError(f"the checkpoint's data position has {state['count']} streams, this run "
                            f"{self.count}: resume with data.streams={state['count']}")
        for k, it in enumerate(self.iterators):
            index = str(self.first + k)
            if index not in streams:
                raise DataError(f"the checkpoint's data position has no position for stream {index} (it has "
                                f"{sorted(streams, key=int)})")
            it.set_state(streams[index])


class _Streams:
    def __init__(self, datasets, first: int, count: int):
        self.datasets, self.first, self.count = datasets, first, count

    def __iter__(self):
        return _StreamsIterator([iter(d) for d in self.datasets], self.first, self.count)


def interleave_streams(datasets, first: int, count: int):
    """One batch stream from this process's streams `first, first + 1, ...` of the run's `count` (each giving
    its share of the rows of every batch)."""
    return _Streams(datasets, first, count)
