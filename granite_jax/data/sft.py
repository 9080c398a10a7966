"""The SFT input pipeline: chat JSONL → checked conversations → tokens with an assistant-only loss mask →
rows packed with first-fit (a sample never spans two rows) → batches.

    JSONL lines (`granite_jax.data.chat` convention) → render (the tokenizer's chat template or the built-in
    Granite 4.0 format) → token ids + trainable mask → truncate or drop samples longer than seq_len + 1 →
    shuffle (new order every epoch) → FirstFitPack into rows of seq_len → batch

Each sample's next-token targets are made before packing, so no target crosses into another sample; the loss
weight of a target is 1 where the target token is the assistant's (content, tool calls and the closing
`<|end_of_text|>`), else 0. Rows carry the pretraining pipeline's fields — `input_ids`, `segment_ids` (one per
sample, 0 = padding), `positions` (restarting per sample), `targets`, `loss_weights` — so the model sees no
attention or SSM state across samples and the same training step serves both.

The files are read and tokenized once, up front, so that bad lines and overlong samples are found and counted
before any compilation (`SFTStats`); a 1M-conversation file takes minutes (progress is printed).
"""

from __future__ import annotations

import dataclasses
import time

import grain
import numpy as np

from granite_jax.data.chat import END_OF_TEXT, SPECIAL_TOKENS, parse_conversation
from granite_jax.data.chat_template import ChatTemplateError
from granite_jax.data.sources import BadLines, DataError, json_records, shuffled_stream
from granite_jax.data.tokenizer import Tokenizer

OVERLONG_POLICIES = ("truncate", "drop")


@dataclasses.dataclass
class SFTStats:
    """What reading and tokenizing the SFT files found; `summary()` is printed at the start of a run."""

    conversations: int = 0  # samples kept
    bad_lines: list[str] = dataclasses.field(default_factory=list)  # "path:line: reason" of skipped lines
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_untrainable: int = 0  # nothing of the assistant's left after truncation
    tokens: int = 0
    trainable_tokens: int = 0

    def summary(self, seq_len: int) -> str:
        text = (f"{self.conversations:,} conversations, {self.tokens:,} tokens "
                f"({self.trainable_tokens / max(self.tokens, 1):.0%} assistant tokens in the loss); "
                f"{self.truncated} truncated to {seq_len + 1} tokens, {self.dropped_overlong} dropped as longer "
                f"than {seq_len + 1}, {self.dropped_untrainable} dropped with no assistant token left, "
                f"{len(self.bad_lines)} bad lines skipped")
        if self.bad_lines:
            text += " (first: " + self.bad_lines[0] + ")"
        return text


def check_chat_tokenizer(tokenizer: Tokenizer, origin: str) -> None:
    """The chat format's markers must be single tokens, and `<|end_of_text|>` the tokenizer's EOS."""
    for marker in SPECIAL_TOKENS:
        ids = tokenizer.encode(marker)
        if len(ids) != 1:
            raise DataError(f"tokenizer {origin!r} splits {marker!r} into {len(ids)} tokens; SFT in the Granite chat "
                            "format needs a tokenizer with the Granite special tokens (a Granite checkpoint "
                            "directory, or the bundled data/tokenizer)")
    if tokenizer.encode(END_OF_TEXT) != [tokenizer.eos_id]:
        raise DataError(f"tokenizer {origin!r}: {END_OF_TEXT!r} is not its end-of-sequence token "
                        f"(eos id {tokenizer.eos_id})")


def tokenize_conversation(conversation, chat_format, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered conversation and, per token, whether it is the assistant's."""
    return tokenize_pieces(chat_format.render(conversation), tokenizer)


def tokenize_pieces(pieces, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of rendered chat pieces and, per token, whether its piece is trainable; the pieces must
    tokenize as the whole text does (else the mask would not match what the model sees at inference)."""
    ids, trainable = [], []
    for piece in pieces:
        piece_ids = tokenizer.encode(piece.text)
        ids += piece_ids
        trainable += [piece.trainable] * len(piece_ids)
    if ids != tokenizer.encode("".join(p.text for p in pieces)):
        raise ChatTemplateError("tokenizing the chat text piece by piece differs from tokenizing it whole: the "
                                "tokenizer merges across an assistant-turn boundary, so the loss mask would not "
                                "match what the model sees at inference")
    return np.asarray(ids, np.int32), np.asarray(trainable, bool)


def check_chat_inputs(tokenizer: Tokenizer, vocab_size: int, overlong: str) -> None:
    """What every chat-format reader (SFT, preference) checks before reading a line."""
    if overlong not in OVERLONG_POLICIES:
        raise DataError(f"data.overlong={overlong!r}: expected one of {OVERLONG_POLICIES}")
    check_chat_tokenizer(tokenizer, getattr(tokenizer, "path", "?"))
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}")


def chat_records(paths: list[str], bad: BadLines, parse):
    """`sources.json_records` for the chat formats: a record that `parse` (or the chat template it renders
    with) refuses is a bad line."""
    return json_records(paths, parse, bad, also_refused=(ChatTemplateError,))


def load_sft_samples(paths: list[str], chat_format, tokenizer: Tokenizer, *, seq_len: int, vocab_size: int,
                     bad_lines: str = "error", overlong: str = "truncate",
                     progress=print) -> tuple[list[dict], SFTStats]:
    """Read, check, render and tokenize every conversation of `paths`; returns per-sample
    `{"input_ids", "targets", "loss_weights"}` (length ≤ seq_len) and what was found."""
    bad = BadLines(bad_lines)
    check_chat_inputs(tokenizer, vocab_size, overlong)
    stats, samples, last_report = SFTStats(bad_lines=bad.skipped), [], time.monotonic()
    tokenized = chat_records(paths, bad, lambda record: tokenize_conversation(parse_conversation(record),
                                                                             chat_format, tokenizer))
    for path, number, (ids, trainable) in tokenized:
        if len(ids) > seq_len + 1:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids, trainable = ids[:seq_len + 1], trainable[:seq_len + 1]
            stats.truncated += 1
        if not trainable[1:].any():
            stats.dropped_untrainable += 1
            continue
        if ids.max() >= vocab_size:
            raise DataError(f"{path}:{number}: token id {int(ids.max())} is outside the model's vocabulary "
                            f"[0, {vocab_size})")
        samples.append({"input_ids": ids[:-1], "targets": ids[1:],
                        "loss_weights": trainable[1:].astype(np.float32)})
        stats.conversations += 1
        stats.tokens += len(ids) - 1
        stats.trainable_tokens += int(trainable[1:].sum())
        if time.monotonic() - last_report > 10:
            progress(f"  tokenized {stats.conversations:,} conversations ({path}:{number})")
            last_report = time.monotonic()
    if not samples:
        raise DataError(f"no usable conversations in {paths}: " + stats.summary(seq_len))
    return samples, stats


def _to_row(packed: dict) -> dict:
    return {"input_ids": packed["input_ids"], "segment_ids": packed["input_ids_segment_ids"],
            "positions": packed["input_ids_positions"], "targets": packed["targets"],
            "loss_weights": packed["loss_weights"]}


def sft_dataset(samples: list[dict], *, seq_len: int, batch_size: int, seed: int, shard_index: int = 0,
                shard_count: int = 1, num_epochs: int | None = None, packing_bins: int = 16) -> grain.IterDataset:
    """Batches of packed SFT rows for this host (numpy, leading dim `batch_size`); infinite unless `num_epochs`."""
    stream = shuffled_stream(samples, seed=seed, shard_index=shard_index, shard_count=shard_count,
                             num_epochs=num_epochs, what="conversations")
    lengths = {"input_ids": seq_len, "targets": seq_len, "loss_weights": seq_len}
    rows = grain.experimental.FirstFitPackIterDataset(stream, length_struct=lengths, num_packing_bins=packing_bins,
                                                      seed=seed)
    return rows.map(_to_row).batch(batch_size, drop_remainder=True)
