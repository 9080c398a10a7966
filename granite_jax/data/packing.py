"""Packing documents into rows of `seq_len` tokens as their text is read.

The rows are those of concat-then-split packing (Grain's `ConcatThenSplitIterDataset`): documents in order,
each followed by EOS, fill a row greedily; a document longer than what is left of a row continues in the next
row as a new segment (segment ids restart at 1 in every row, positions restart at 0). What differs is memory:
a text is tokenized in pieces of at most `PIECE_CHARS` characters, one piece at a time as the rows need its
tokens, so the host holds one row and one piece however long the document is, and a batch is built in time
proportional to the batch, not to the documents it starts in (tokenizing a 1M-token document whole before its
first row took about 5 minutes here: benchmarks/RESULTS.md, "Long documents").

Pieces end where tokenizing the two sides separately gives the tokens of the whole: before a single space
between two non-space characters (`"word| next"`). A byte-level BPE (Granite's tokenizer, the bundled one)
pre-tokenizes so that no token spans that position, and sentencepiece's default whitespace handling turns the
piece's leading space into the same "▁". A run of `PIECE_CHARS` characters with no such space (not text, in
practice) is cut where the limit falls, and its tokens there may differ from a whole tokenization.

The iterator's state is small and restores without re-reading: the parent's state before the document in
progress, where in that document's text the current piece starts, and how many of the piece's tokens are
already in rows.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from granite_jax.data.pretokenize import decode_record
from granite_jax.data.sources import DataError
from granite_jax.data.tokenizer import Tokenizer

PIECE_CHARS = 1 << 16  # ~15K tokens of English text


def piece_end(text: str, start: int, limit: int | None = None) -> int:
    """The end of the piece of `text` that starts at `start`: the end of the text when fewer than `limit`
    characters are left, else the last position p in (start, start + limit] where text[p] is a space between two
    non-space characters, else start + limit (`limit`: PIECE_CHARS unless given)."""
    end = start + (limit or PIECE_CHARS)
    if end >= len(text):
        return len(text)
    p = text.rfind(" ", start + 1, end + 1)
    while p > start:
        if not text[p - 1].isspace() and not text[p + 1].isspace():
            return p
        p = text.rfind(" ", start + 1, p)
    return end


class _Document:
    """One document being read: its pieces' tokens, one piece at a time (EOS after the last)."""

    def __init__(self, document: str | bytes, tokenizer: Tokenizer, vocab_size: int, start: int = 0):
        self.document, self.tokenizer, self.vocab_size = document, tokenizer, vocab_size
        self.start = start  # where the current piece starts in the text (0 for a pre-tokenized record)
        self.tokens = self._tokenize()
        self.used = 0  # tokens of the current piece already placed in rows

    @property
    def last_piece(self) -> bool:
        return isinstance(self.document, bytes) or self.end == len(self.document)

    def _tokenize(self) -> np.ndarray:
        if isinstance(self.document, bytes):  # a pre-tokenized record (already ends with EOS)
            ids = decode_record(self.document)
        else:
            self.end = piece_end(self.document, self.start)
            ids = self.tokenizer.encode(self.document[self.start:self.end])
            ids = np.asarray(ids + [self.tokenizer.eos_id] if self.last_piece else ids, np.int32)
        if ids.size and (ids.max() >= self.vocab_size or ids.min() < 0):
            raise DataError(f"token id {int(ids.max())} is outside the model's vocabulary [0, {self.vocab_size}): "
                            f"the tokenizer ({self.tokenizer.vocab_size} tokens) does not fit the model")
        return ids

    def next_piece(self) -> bool:
        """Move to the next piece; False when the current one was the last."""
        if self.last_piece:
            return False
        self.start, self.used = self.end, 0
        self.tokens = self._tokenize()
        return True


class PackedRowsIterator(grain.DatasetIterator):
    """Rows {"input_ids", "segment_ids", "positions"} (int32[seq_len]) packed from the parent's documents."""

    def __init__(self, parent: grain.DatasetIterator, tokenizer: Tokenizer, vocab_size: int, seq_len: int):
        super().__init__(parent)
        self.tokenizer, self.vocab_size, self.seq_len = tokenizer, vocab_size, seq_len
        self._document: _Document | None = None
        self._document_state = None  # the parent's state before the document in progress

    def _next_document(self, start: int = 0) -> bool:
        """Start the parent's next document at character `start`; False at the end of the parent."""
        state = self._parent.get_state()
        try:
            document = next(self._parent)
        except StopIteration:
            self._document = None
            return False
        self._document_state = state
        self._document = _Document(document, self.tokenizer, self.vocab_size, start)
        return True

    def __next__(self) -> dict:
        ids, segments, positions = (np.zeros(self.seq_len, np.int32) for _ in range(3))
        filled, segment = 0, 0
        row_document = None  # the document whose tokens were placed last in this row
        while filled < self.seq_len:
            document = self._document
            if document is None or document.used == len(document.tokens):
                if (document is None or not document.next_piece()) and not self._next_document():
                    break
                continue
            if document is not row_document:
                segment, row_document, position = segment + 1, document, 0
            take = min(self.seq_len - filled, len(document.tokens) - document.used)
            ids[filled:filled + take] = document.tokens[document.used:document.used + take]
            segments[filled:filled + take] = segment
            positions[filled:filled + take] = np.arange(position, position + take, dtype=np.int32)
            document.used += take
            filled += take
            position += take
        if filled == 0:
            raise StopIteration
        return {"input_ids": ids, "segment_ids": segments, "positions": positions}

    def get_state(self) -> dict[str, Any]:
        document = self._document
        if document is None:
            return {"documents": self._parent.get_state(), "in_document": False}
        return {"documents": self._document_state, "in_document": True, "piece_start": document.start,
                "piece_tokens_used": document.used}

    def set_state(self, state: dict[str, Any]) -> None:
        if "remainder_slices" in state:  # written by concat-then-split packing
            self._set_concat_then_split_state(state)
            return
        self._parent.set_state(state["documents"])
        self._document = None
        if state["in_document"]:
            if not self._next_document(start=state["piece_start"]):
                raise DataError(f"the data position {state} is past the end of the data")
            self._document.used = state["piece_tokens_used"]

    def _set_concat_then_split_state(self, state: dict[str, Any]) -> None:
        """The position a checkpoint of concat-then-split packing recorded: the document in progress (its
        remaining tokens from `remainder_slices`), then `elements_from_buffer_after_checkpoint` rows on."""
        self._parent.set_state(state["parent_state"])
        self._document = None
        start, _ = state["remainder_slices"]["input_ids"]
        if start >= 0:
            if not self._next_document():
                raise DataError(f"the data position {state} is past the end of the data")
            document = self._document
            while start > len(document.tokens):
                start -= len(document.tokens)
                if not document.next_piece():
                    raise DataError(f"the data position {state} is past the end of its document")
            document.used = start
        for _ in range(state["elements_from_buffer_after_checkpoint"]):
            next(self)


class PackedRows(grain.IterDataset):
    """`PackedRowsIterator` over a parent dataset of documents (texts, or pre-tokenized records as bytes)."""

    def __init__(self, parent: grain.IterDataset, tokenizer: Tokenizer, vocab_size: int, seq_len: int):
        super().__init__(parent)
        self.tokenizer, self.vocab_size, self.seq_len = tokenizer, vocab_size, seq_len

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self._parent.__iter__(), self.tokenizer, self.vocab_size, self.seq_len)
