"""The preference (DPO) input pipeline: JSON lines of (prompt, chosen, rejected) → two token sequences per pair,
loss weights on the reply only → pairs packed whole into rows → batches.

A line is TRL's preference layout, conversational or with plain-string replies:

    {"prompt": [{"role": "user", "content": ...}, ...] | "user text",
     "chosen": [{"role": "assistant", "content": ...}, ...] | "assistant text",
     "rejected": [...] | "assistant text", "tools": [...]?, "documents": [...]?}

Without `prompt` (TRL's "implicit prompt"), `chosen` and `rejected` are whole conversations and the prompt is
the messages they share from the start. Each of prompt + chosen and prompt + rejected is rendered with the run's
chat format (as SFT renders a conversation) and tokenized; a target's loss weight is 1 on the reply's assistant
tokens (content, tool calls, closing `<|end_of_text|>`), 0 on the prompt, assistant turns of a multi-turn
prompt included.

Packing: a pair is one unit of first-fit packing (never split across rows); inside the row its chosen sequence
is segment 2k - 1 and its rejected sequence segment 2k, for the row's k-th pair, positions restarting at each.
That numbering is the batch's pairing convention: `train/dpo.py` sums log-probs per segment and reads chosen
from the odd segments, rejected from the even ones. Rows carry the SFT fields (`input_ids`, `segment_ids`,
`positions`, `targets`, `loss_weights`), so the model, the batch sharding and the dry run need nothing new.
"""

from __future__ import annotations

import dataclasses
import time

import grain
import numpy as np

from granite_jax.data.chat import ChatFormatError, Conversation, Piece, parse_conversation
from granite_jax.data.chat_template import ChatTemplateError
from granite_jax.data.sft import chat_records, check_chat_inputs, tokenize_pieces
from granite_jax.data.sources import BadLines, DataError, shuffled_stream
from granite_jax.data.tokenizer import Tokenizer


class PreferenceFormatError(ChatFormatError):
    """A preference line does not follow the layout; the message names the field."""


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One checked line: the shared prompt and the two replies, as message lists."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    tools: list[dict] | None = None
    documents: list[dict] | None = None


@dataclasses.dataclass
class PreferenceStats:
    """What reading and tokenizing the preference files found; `summary()` is printed at the start of a run."""

    pairs: int = 0
    bad_lines: list[str] = dataclasses.field(default_factory=list)
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_untrainable: int = 0  # a reply with no token left after truncation
    tokens: int = 0
    reply_tokens: int = 0

    def summary(self, seq_len: int) -> str:
        share = self.reply_tokens / max(self.tokens, 1)
        text = (f"{self.pairs:,} preference pairs, {self.tokens:,} tokens ({share:.0%} reply tokens in the loss); "
                f"{self.truncated} pairs truncated to fit {seq_len} tokens, "
                f"{self.dropped_overlong} dropped as longer, {self.dropped_untrainable} dropped with no reply token "
                f"left, {len(self.bad_lines)} bad lines skipped")
        if self.bad_lines:
            text += " (first: " + self.bad_lines[0] + ")"
        return text


def _messages(value, field: str, reply_role: str) -> list[dict]:
    """A message list from a list of messages or a plain string (one message of `reply_role`)."""
    if isinstance(value, str):
        return [{"role": reply_role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return value
    raise PreferenceFormatError(f"'{field}' must be a list of {{role, content}} messages or a string, "
                                f"got {type(value).__name__}")


def parse_preference(record) -> PreferencePair:
    """Check one preference line (a decoded JSON object): `chosen` and `rejected` present, each with an assistant
    reply after the prompt, every message valid (`parse_conversation`'s checks, naming the field)."""
    if not isinstance(record, dict):
        raise PreferenceFormatError(f"expected a JSON object with 'chosen' and 'rejected', got {type(record).__name__}")
    for field in ("chosen", "rejected"):
        if record.get(field) is None:
            raise PreferenceFormatError(f"'{field}' is missing")
        if record[field] in ("", []):
            raise PreferenceFormatError(f"'{field}' is empty: there is no reply to score")
    chosen = _messages(record["chosen"], "chosen", "assistant")
    rejected = _messages(record["rejected"], "rejected", "assistant")
    if record.get("prompt") is not None:
        prompt = _messages(record["prompt"], "prompt", "user")
    else:  # implicit prompt: the messages both conversations start with
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        for field, reply in (("chosen", chosen), ("rejected", rejected)):
            if reply and reply[0].get("role") != "assistant":
                raise PreferenceFormatError(
                    f"without 'prompt', 'chosen' and 'rejected' must share every message before the reply; they "
                    f"differ first at message {shared}, which in '{field}' is a {reply[0].get('role')!r} message: "
                    "the two replies answer different prompts")
    if chosen == rejected:
        raise PreferenceFormatError("'chosen' and 'rejected' are the same reply: the pair prefers nothing "
                                    "(its loss is log 2 and its gradient 0 whatever the model)")
    for field, reply in (("chosen", chosen), ("rejected", rejected)):
        if not any(m.get("role") == "assistant" for m in reply):
            raise PreferenceFormatError(f"'{field}' has no assistant message after the prompt: nothing to score")
        try:
            parse_conversation({"messages": prompt + reply, "tools": record.get("tools"),
                                "documents": record.get("documents")})
        except ChatFormatError as e:
            raise PreferenceFormatError(f"prompt + {field}: {e}") from None
    return PreferencePair(prompt, chosen, rejected, record.get("tools") or None, record.get("documents") or None)


def reply_pieces(prompt: list[dict], reply: list[dict], chat_format, *, tools=None, documents=None) -> list[Piece]:
    """prompt + reply rendered by `chat_format`, only the reply's assistant pieces trainable. The prompt's own
    rendering must be a prefix of the whole (it is for any template that renders conversations incrementally)."""
    pieces = chat_format.render(Conversation(prompt + reply, tools, documents))
    prompt_end = 0
    if prompt:
        prompt_text = chat_format.render_text(Conversation(prompt, tools, documents))
        if not "".join(p.text for p in pieces).startswith(prompt_text):
            raise ChatTemplateError(f"chat template {chat_format.origin} does not render the prompt as a prefix of "
                                    "prompt + reply; cannot tell the reply's tokens")
        prompt_end = len(prompt_text)
    marked, offset = [], 0
    for piece in pieces:
        marked.append(Piece(piece.text, piece.trainable and offset >= prompt_end))
        offset += len(piece.text)
    return marked


def fit_pair(chosen_len: int, rejected_len: int, seq_len: int) -> tuple[int, int]:
    """Token counts (each sequence's input length + 1) to keep so the pair's inputs fit `seq_len`: a pair that
    fits is kept whole; otherwise the shorter keeps what fits in half the row and the longer takes the rest."""
    c, r = chosen_len - 1, rejected_len - 1
    if c + r <= seq_len:
        return chosen_len, rejected_len
    half = seq_len // 2
    if c <= half:
        return chosen_len, seq_len - c + 1
    if r <= half:
        return seq_len - r + 1, rejected_len
    return seq_len - half + 1, half + 1


def pair_sample(chosen: tuple[np.ndarray, np.ndarray], rejected: tuple[np.ndarray, np.ndarray]) -> dict:
    """One packing unit from the two (ids, trainable) sequences: inputs, next-token targets and weights made per
    sequence (no target crosses into the other), positions restarting at the rejected one, and its flag."""
    parts = []
    for flag, (ids, trainable) in enumerate((chosen, rejected)):
        n = len(ids) - 1
        parts.append(dict(input_ids=ids[:-1], targets=ids[1:], loss_weights=trainable[1:].astype(np.float32),
                          sequence_positions=np.arange(n, dtype=np.int32), is_rejected=np.full(n, flag, np.int32)))
    return {k: np.concatenate([parts[0][k], parts[1][k]]) for k in parts[0]}


def load_preference_samples(paths: list[str], chat_format, tokenizer: Tokenizer, *, seq_len: int, vocab_size: int,
                            bad_lines: str = "error", overlong: str = "truncate",
                            progress=print) -> tuple[list[dict], PreferenceStats]:
    """Read, check, render and tokenize every pair of `paths`; returns the packing units (`pair_sample`, inputs
    ≤ seq_len tokens) and what was found. A malformed line is an error naming file, line and field (or skipped
    and counted under bad_lines=skip)."""
    bad = BadLines(bad_lines)
    check_chat_inputs(tokenizer, vocab_size, overlong)
    stats, samples, last_report = PreferenceStats(bad_lines=bad.skipped), [], time.monotonic()

    def tokenize_pair(record) -> list[tuple[np.ndarray, np.ndarray]]:
        pair = parse_preference(record)
        return [tokenize_pieces(reply_pieces(pair.prompt, reply, chat_format, tools=pair.tools,
                                             documents=pair.documents), tokenizer)
                for reply in (pair.chosen, pair.rejected)]

    for path, number, sequences in chat_records(paths, bad, tokenize_pair):
        keep = fit_pair(len(sequences[0][0]), len(sequences[1][0]), seq_len)
        if keep != (len(sequences[0][0]), len(sequences[1][0])):
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            sequences = [(ids[:n], trainable[:n]) for (ids, trainable), n in zip(sequences, keep)]
            stats.truncated += 1
        if not all(trainable[1:].any() for _, trainable in sequences):
            stats.dropped_untrainable += 1
            continue
        top = max(int(ids.max()) for ids, _ in sequences)
        if top >= vocab_size:
            raise DataError(f"{path}:{number}: token id {top} is outside the model's vocabulary [0, {vocab_size})")
        sample = pair_sample(*sequences)
        samples.append(sample)
        stats.pairs += 1
        stats.tokens += len(sample["input_ids"])
        stats.reply_tokens += int(sample["loss_weights"].sum())
        if time.monotonic() - last_report > 10:
            progress(f"  tokenized {stats.pairs:,} pairs ({path}:{number})")
            last_report = time.monotonic()
    if not samples:
        raise DataError(f"no usable preference pairs in {paths}: " + stats.summary(seq_len))
    return samples, stats


def _to_row(packed: dict) -> dict:
    """A packed row with the pairing convention: pair k's chosen sequence is segment 2k - 1, its rejected 2k."""
    pairs = packed["input_ids_segment_ids"]
    segments = np.where(pairs > 0, 2 * pairs - 1 + packed["is_rejected"], 0).astype(np.int32)
    return {"input_ids": packed["input_ids"], "segment_ids": segments, "positions": packed["sequence_positions"],
            "targets": packed["targets"], "loss_weights": packed["loss_weights"]}


def preference_dataset(samples: list[dict], *, seq_len: int, batch_size: int, seed: int, shard_index: int = 0,
                       shard_count: int = 1, num_epochs: int | None = None,
                       packing_bins: int = 16) -> grain.IterDataset:
    """Batches of rows of packed pairs for this host (numpy, leading dim `batch_size`); infinite unless
    `num_epochs`."""
    stream = shuffled_stream(samples, seed=seed, shard_index=shard_index, shard_count=shard_count,
                             num_epochs=num_epochs, what="preference pairs")
    lengths = {name: seq_len for name in samples[0]}
    rows = grain.experimental.FirstFitPackIterDataset(stream, length_struct=lengths, num_packing_bins=packing_bins,
                                                      seed=seed)
    return rows.map(_to_row).batch(batch_size, drop_remainder=True)
