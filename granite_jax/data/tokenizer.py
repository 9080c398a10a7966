"""Tokenizers behind one interface: sentencepiece models and Hugging Face `tokenizer.json` (the released
Granite 4.0 tokenizer is a byte-level BPE in `tokenizer.json`; point at the checkpoint directory).

    python -m granite_jax.data.tokenizer train --input FILES --vocab-size 4096 --out DIR
        a byte-level BPE like Granite's, as an HF tokenizer directory (tokenizer.json, tokenizer_config.json
        with the Granite special tokens and chat template) that transformers' AutoTokenizer loads
    python -m granite_jax.data.tokenizer train --kind sentencepiece --input FILES --vocab-size 4096 --out PREFIX
        a sentencepiece BPE model, PREFIX.model

The bundled tokenizer, data/tokenizer/, is the first kind, trained on the bundled corpora
(scripts/make_chat_corpus.py says how).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Protocol, Sequence

from granite_jax import storage

# The files of an HF tokenizer directory (a checkpoint directory holds them beside the weights).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "chat_template.jinja", "generation_config.json")


def tokenizer_files(path: str) -> list[str]:
    """The files that make up the tokenizer at `path` (as `load_tokenizer` takes it): a sentencepiece `.model`;
    a `tokenizer.json` and the `tokenizer_config.json` beside it; or a directory's HF tokenizer files. `path` may
    be a URL (`granite_jax.storage`)."""
    if storage.isdir(path):
        names = [storage.join(path, name) for name in HF_TOKENIZER_FILES]
    elif path.endswith(".json"):
        names = [path, storage.join(storage.dirname(path), "tokenizer_config.json")]
    else:
        names = [path]
    return [name for name in names if storage.isfile(name)]


def changed_tokenizer_files(source: str, copy_dir: str) -> list[str]:
    """The names of the tokenizer files at `source` (`tokenizer_files`) whose bytes differ from, or are missing in,
    the copy in `copy_dir` (a run's `tokenizer/`): a tokenizer edited in place keeps its path, not its ids."""
    def digest(path: str) -> str | None:
        if not storage.isfile(path):
            return None
        with storage.open_file(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    return [storage.basename(path) for path in tokenizer_files(source)
            if digest(path) != digest(storage.join(copy_dir, storage.basename(path)))]


class TokenizerError(ValueError):
    """A tokenizer path is missing, of an unknown kind, or its files cannot be read; the message names the file."""


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, path: str):
        import sentencepiece

        self.path = path
        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        if self.eos_id < 0:
            raise TokenizerError(f"{path}: the sentencepiece model has no end-of-sequence id "
                                 "(train it with eos_id >= 0)")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer:
    """`tokenizer.json` via the `tokenizers` library; EOS/pad from `tokenizer_config.json` when present."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tokenizer

        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        self.path = file
        try:
            self._tok = _Tokenizer.from_file(file)
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise TokenizerError(f"{file}: not a readable tokenizer.json ({str(e).strip()})") from None
        # The id space, not the token count: ids may have holes, and every id it can produce must fit a model.
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(len(vocab), max(vocab.values(), default=-1) + 1)
        settings = {}
        config_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    settings = json.load(f)
            except (ValueError, OSError) as e:
                raise TokenizerError(f"{config_path}: not readable JSON ({e})") from None
            if not isinstance(settings, dict):
                raise TokenizerError(f"{config_path}: expected a JSON object")
        token_id = lambda t: None if t is None else self._tok.token_to_id(t if isinstance(t, str) else t["content"])  # noqa: E731
        self.eos_id = token_id(settings.get("eos_token")) if settings.get("eos_token") else token_id("<|end_of_text|>")
        self.pad_id = token_id(settings.get("pad_token"))
        if self.eos_id is None:
            raise TokenizerError(f"{file}: cannot tell the end-of-text token (set eos_token in tokenizer_config.json)")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: str) -> Tokenizer:
    """A `.model` sentencepiece file, a `tokenizer.json`, or a directory holding `tokenizer.json`; under a URL
    (`gs://...`) its files are copied to a local cache first. Whatever goes wrong reading it (a missing path, a
    corrupt file) is a `TokenizerError` naming the path."""
    if not storage.exists(path):
        raise TokenizerError(f"tokenizer {path!r} does not exist")
    if storage.is_url(path):
        files = tokenizer_files(path)
        if not files:
            raise TokenizerError(f"tokenizer {path!r}: expected a sentencepiece .model, a tokenizer.json, or a "
                                 "directory with one")
        local = storage.local_copy(storage.dirname(files[0]), [storage.basename(f) for f in files])
        path = os.path.join(local, storage.basename(path)) if not storage.isdir(path) else local
    if path.endswith(".model"):
        kind = SentencePieceTokenizer
    elif path.endswith(".json") or os.path.isfile(os.path.join(path, "tokenizer.json")):
        kind = HFTokenizer
    else:
        raise TokenizerError(f"tokenizer {path!r}: expected a sentencepiece .model, a tokenizer.json, or a directory "
                             "with one")
    try:
        return kind(path)
    except TokenizerError:
        raise
    except (RuntimeError, OSError) as e:  # sentencepiece's errors for a file that is not a model
        raise TokenizerError(f"tokenizer {path!r} cannot be read: {str(e).strip() or type(e).__name__}") from None


# The Granite 4.0 special tokens (docs/fine-tuning.md#chat-format), first in the vocabulary of a
# tokenizer trained here: <|pad|> = 0, <|end_of_text|> = 1 (BOS = EOS, as Granite), then the chat roles and FIM.
GRANITE_SPECIAL_TOKENS = ("<|pad|>", "<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|fim_prefix|>",
                          "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>")


def train_byte_level_bpe(texts, vocab_size: int, out_dir: str) -> str:
    """Train a GPT-2 style byte-level BPE on an iterable of texts and write an HF tokenizer directory.

    `tokenizer_config.json` names EOS (<|end_of_text|>) and pad (<|pad|>), adds no BOS (as Granite) and
    carries the built-in Granite 4.0 chat template, so `AutoTokenizer.from_pretrained(out_dir)` and
    `apply_chat_template` work on it.
    """
    from tokenizers import Tokenizer as _Tokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from granite_jax.data.chat_template import BUILTIN_TEMPLATE_PATH

    tokenizer = _Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(GRANITE_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(BUILTIN_TEMPLATE_PATH, encoding="utf-8") as f:
        template = f.read()
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|end_of_text|>",
                "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>", "add_bos_token": False,
                "model_max_length": 1 << 20, "chat_template": template}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return out_dir


def train_sentencepiece(inputs: list[str], vocab_size: int, out_prefix: str, text_field: str = "text",
                        bad_lines=None) -> str:
    """Train a BPE sentencepiece model on text/JSONL files; ids: pad 0, bos 1, eos 2, unk 3."""
    import sentencepiece

    from granite_jax.data.sources import DataError, read_documents

    failures = []  # sentencepiece turns an error of the iterator into a RuntimeError with a traceback in its text

    def documents():
        try:
            for path in inputs:
                yield from read_documents(path, text_field, bad_lines)
        except DataError as e:
            failures.append(e)
            raise

    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=documents(), model_prefix=out_prefix, vocab_size=vocab_size, model_type="bpe",
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=True, character_coverage=1.0,
            max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError:
        if failures:
            raise failures[0] from None
        raise
    return out_prefix + ".model"


def _check_train_args(args) -> None:
    """Flags a tokenizer trainer would otherwise reject late, with a traceback, or silently adjust."""
    from granite_jax.data.sources import check_data_file

    for path in args.input:
        check_data_file(path)
    smallest = len(GRANITE_SPECIAL_TOKENS) + 256 if args.kind == "byte-level-bpe" else 1
    if args.vocab_size < smallest:
        raise TokenizerError(f"--vocab-size {args.vocab_size}: a {args.kind} tokenizer needs at least {smallest} "
                             f"tokens" + (" (256 bytes + the Granite special tokens)" if smallest > 1 else ""))
    out_dir = args.out if args.kind == "byte-level-bpe" else os.path.dirname(args.out) or "."
    if args.kind == "byte-level-bpe" and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TokenizerError(f"--out {out_dir!r} is a file; expected a directory (new or existing) to write into")
    if args.kind == "byte-level-bpe":
        try:  # fails now, not after training, when it cannot be written
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise TokenizerError(f"--out {out_dir!r}: cannot create the directory ({e.strerror})") from None
    if args.kind == "sentencepiece" and not os.path.isdir(out_dir):
        raise TokenizerError(f"--out {args.out!r}: directory {out_dir!r} does not exist")


def main(argv=None) -> int:
    """The `train` command; a mistake (missing input, bad line, bad --vocab-size, unwritable --out) is one
    `error:` line on stderr and exit status 2."""
    from granite_jax.data.sources import BadLines, read_documents

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a tokenizer")
    train.add_argument("--kind", choices=["byte-level-bpe", "sentencepiece"], default="byte-level-bpe")
    train.add_argument("--input", nargs="+", required=True, help="text (.txt[.gz]) or JSONL (.jsonl[.gz]) files")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True,
                       help="byte-level-bpe: output directory; sentencepiece: prefix of PREFIX.model / PREFIX.vocab")
    train.add_argument("--text-field", default="text")
    train.add_argument("--bad-lines", choices=["error", "skip"], default="error",
                       help="a malformed input line (not UTF-8, not JSON, no text field): stop, or skip and count it")
    args = parser.parse_args(argv)
    bad = BadLines(args.bad_lines, hint="pass --bad-lines skip to skip such lines")
    try:
        _check_train_args(args)
        if args.kind == "sentencepiece":
            path = train_sentencepiece(args.input, args.vocab_size, args.out, args.text_field, bad)
        else:
            texts = (doc for p in args.input for doc in read_documents(p, args.text_field, bad))
            path = train_byte_level_bpe(texts, args.vocab_size, args.out)
        vocab = load_tokenizer(path).vocab_size
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {path} (vocab {vocab})" + (f"; {bad.summary()}" if bad.skipped else ""))
    return 0


def one_line(error: Exception) -> str:
    """An exception as one line for an `error:` message (libraries' messages may carry their own traceback)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
