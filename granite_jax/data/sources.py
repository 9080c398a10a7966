"""Document sources: plain text, JSONL (a text field), Parquet (a text column). Gzip is read transparently.
Paths may be object-storage URLs (`gs://`, `s3://`, any fsspec protocol; `granite_jax.storage`), except
pre-tokenized `.arrayrecord` files, which array_record reads from local (or mounted) paths only.

Every text reader goes through `data_lines`, which checks the path, opens it (gunzipping `.gz`), and decodes
each line as UTF-8 on its own, so that a line that is not valid UTF-8 is one bad line, named by file and line
number, like a line of malformed JSON: `BadLines` decides whether it is an error (`data.bad_lines=error`, the
default) or skipped and counted (`skip`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib
from typing import Iterator, NamedTuple

import grain

from granite_jax import storage

BAD_LINE_POLICIES = ("error", "skip")
TEXT_FORMATS = ".jsonl, .json, .txt or .parquet (optionally .gz)"


class DataError(ValueError):
    """A data path or its content is unusable; the message names the file (and line) and what was expected."""


@dataclasses.dataclass
class BadLines:
    """What to do with a malformed line (`policy`: "error" or "skip") and the lines skipped so far
    ("path:line: reason"). `hint` tells the user how to skip such lines instead (appended to the error)."""

    policy: str = "error"
    hint: str = "set data.bad_lines=skip to skip such lines"
    skipped: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.policy not in BAD_LINE_POLICIES:
            raise DataError(f"data.bad_lines={self.policy!r}: expected one of {BAD_LINE_POLICIES}")

    def found(self, where: str, reason: str) -> None:
        """A bad line at `where` ("path:line"): raise under "error", record it under "skip"."""
        if self.policy == "error":
            raise DataError(f"{where}: {reason}" + (f" ({self.hint})" if self.hint else ""))
        self.skipped.append(f"{where}: {reason}")

    def summary(self) -> str:
        text = f"{len(self.skipped)} bad lines skipped"
        return text + (" (first: " + self.skipped[0] + ")" if self.skipped else "")


def bad_lines_of(bad_lines: str | BadLines | None) -> BadLines:
    """A `BadLines` from a policy name (or the default, "error")."""
    return bad_lines if isinstance(bad_lines, BadLines) else BadLines(bad_lines or "error")


class Line(NamedTuple):
    number: int  # 1-based
    text: str | None  # without its line ending; None when the line is not valid UTF-8
    problem: str | None  # why `text` is None


def check_data_file(path: str, expected: str = TEXT_FORMATS) -> None:
    """A data path must be an existing regular file; the error says what it is instead and what was expected."""
    try:
        if storage.is_url(path):
            if not storage.exists(path):
                raise DataError(f"data file {path!r} does not exist")
            if not storage.isfile(path):
                raise DataError(f"data file {path!r} is a directory; expected a file: {expected}")
            return
    except OSError as e:  # a missing fsspec package, the store's refusal
        raise DataError(f"data file {path!r}: cannot be read ({e})") from None
    if os.path.isdir(path):
        raise DataError(f"data file {path!r} is a directory; expected a file: {expected}")
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} is not a regular file; expected a file: {expected}")


def _decode(raw: bytes, number: int) -> Line:
    """One line's bytes → `Line`; invalid UTF-8 is reported with the offending byte and its position."""
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    try:
        return Line(number, raw.decode("utf-8"), None)
    except UnicodeDecodeError as e:
        return Line(number, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)")


def data_lines(path: str, expected: str = TEXT_FORMATS) -> Iterator[Line]:
    """The lines of a text file, gunzipped if its name ends in `.gz`, each decoded as UTF-8 on its own.

    A missing path, a directory, an unreadable file or a `.gz` that is not gzip data is a `DataError` naming
    the file; a line that is not UTF-8 comes as a `Line` with `text=None`, for the caller's `BadLines`."""
    check_data_file(path, expected)
    gzipped = path.endswith(".gz")
    number = 0
    try:
        with storage.open_file(path, "rb") as raw_file, \
                (gzip.GzipFile(fileobj=raw_file) if gzipped else raw_file) as f:
            for number, raw in enumerate(f, 1):
                yield _decode(raw, number)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        where = f" after line {number}" if number else ""
        raise DataError(f"data file {path!r}: not valid gzip data{where} ({e}); a .gz name must hold "
                        "gzip-compressed text") from None
    except OSError as e:
        raise DataError(f"data file {path!r}: cannot be read ({e.strerror or e})") from None


class RecordError(ValueError):
    """A JSON record its reader cannot use; `json_records` hands it to `BadLines` with the file and line."""


JSON_LINES = "JSON lines (.jsonl or .json, optionally .gz)"


def json_records(paths: list[str], parse, bad: BadLines, expected: str = JSON_LINES,
                 also_refused: tuple[type[Exception], ...] = ()) -> Iterator[tuple[str, int, object]]:
    """(path, line number, parse(record)) for every non-blank JSON line of `paths`: the one reader of the JSONL
    formats (pretraining text, chat, preference pairs, multiple-choice tasks). A line that is not UTF-8, not
    JSON, or that `parse` refuses (raising a `RecordError` or one of `also_refused`) is handed to `bad`: an
    error naming file, line and reason, or skipped and counted (data.bad_lines)."""
    for path in paths:
        check_data_file(path, expected)
        name = path[:-3] if path.endswith(".gz") else path
        if not name.endswith((".jsonl", ".json")):
            raise DataError(f"data file {path!r}: expected {expected}")
        for number, line, problem in data_lines(path, expected):
            if line is not None and not line.strip():
                continue
            try:
                if line is None:
                    raise RecordError(problem)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"not valid JSON ({e.msg} at column {e.colno})") from None
                parsed = parse(record)
            except (RecordError, *also_refused) as e:
                bad.found(f"{path}:{number}", str(e))
                continue
            yield path, number, parsed


def _jsonl_documents(path: str, text_field: str, bad: BadLines) -> Iterator[str]:
    def text_of(record) -> str:
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise RecordError(f"expected an object with a string field {text_field!r}")
        return record[text_field]

    return (text for _, _, text in json_records([path], text_of, bad, TEXT_FORMATS))


def _text_documents(path: str, bad: BadLines) -> Iterator[str]:
    """Blank-line-separated paragraphs. A paragraph with a line that is not UTF-8 is dropped whole under
    `skip` (the document would otherwise miss a line); the bad line is what is reported and counted."""
    paragraph, broken = [], False
    for number, line, problem in data_lines(path):
        if line is None:
            bad.found(f"{path}:{number}", problem)
            broken = True
        elif line.strip():
            paragraph.append(line)
        else:
            if paragraph and not broken:
                yield "\n".join(paragraph)
            paragraph, broken = [], False
    if paragraph and not broken:
        yield "\n".join(paragraph)


def _parquet_documents(path: str, text_field: str, bad: BadLines) -> Iterator[str]:
    """The rows' `text_field`, a string column; a null row is a bad line (as a JSONL line without the text),
    an empty one is skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_data_file(path)
    try:
        if storage.is_url(path):
            with storage.open_file(path, "rb") as f:
                table = pq.read_table(f, columns=[text_field])
        else:
            table = pq.read_table(path, columns=[text_field])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"data file {path!r}: cannot read it as Parquet with a column {text_field!r} ({e})") from None
    column = table.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"data file {path!r}: column {text_field!r} holds {column.type}, not text (string)")
    for row, text in enumerate(column.to_pylist()):
        if text is None:
            bad.found(f"{path}:row {row}", f"{text_field!r} is null")
        elif text:
            yield text


def read_documents(path: str, text_field: str = "text", bad_lines: str | BadLines | None = None) -> Iterator[str]:
    """Yield the documents of one file: a JSONL line's `text_field`, a Parquet row's column, or a whole text
    file's blank-line-separated paragraphs. Malformed lines (not UTF-8, not JSON, no string `text_field`) go to
    `bad_lines` (a policy name or a `BadLines` that counts them; default: an error)."""
    bad = bad_lines_of(bad_lines)
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".jsonl") or name.endswith(".json"):
        yield from _jsonl_documents(path, text_field, bad)
    elif name.endswith(".parquet"):
        yield from _parquet_documents(path, text_field, bad)
    elif name.endswith(".txt"):
        yield from _text_documents(path, bad)
    else:
        check_data_file(path)
        raise DataError(f"data file {path!r}: unknown format; expected {TEXT_FORMATS}")


def load_documents(paths: list[str], text_field: str = "text", bad_lines: str | BadLines | None = None):
    """All documents of `paths`: a list of strings, or, when every path is an `.arrayrecord` file of
    pre-tokenized documents (`granite_jax.data.pretokenize`), a random-access source of their records.
    `bad_lines` as in `read_documents` (pass a `BadLines` to learn what was skipped)."""
    if paths and all(p.endswith(".arrayrecord") for p in paths):
        import grain

        for path in paths:
            if storage.is_url(path):
                raise DataError(f"data file {path!r}: pre-tokenized .arrayrecord files are read from local paths "
                                "only (array_record opens local files); copy them to local disk or a mounted "
                                "bucket, or give the text files")
            check_data_file(path, "a pre-tokenized .arrayrecord file")
        source = grain.sources.ArrayRecordDataSource(list(paths))
        if len(source) == 0:
            raise DataError(f"no documents in {paths} (empty corpus)")
        return source
    if any(p.endswith(".arrayrecord") for p in paths):
        raise DataError(f"data paths {paths} mix pre-tokenized .arrayrecord files with text files")
    bad = bad_lines_of(bad_lines)
    docs = [doc for path in paths for doc in read_documents(path, text_field, bad) if doc.strip()]
    if not docs:
        raise DataError(f"no documents in {paths} (empty corpus)")
    return docs


def shuffled_stream(items, *, seed: int, shard_index: int, shard_count: int, num_epochs: int | None,
                    what: str) -> grain.IterDataset:
    """This host's share of `items` (documents, conversations, preference pairs: every `shard_count`-th from
    `shard_index`) in a new order every epoch, infinite unless `num_epochs`.

    A list (items already in memory) is read in the calling thread: grain's default reads ahead 500 items on
    16 threads, which for a list adds thread hand-offs and GIL contention to the training loop and nothing
    else (grain recommends no threads for in-memory data). A source on disk (pre-tokenized `.arrayrecord`
    files) keeps the read-ahead. The items, their order and the iterator's state are the same either way."""
    source = grain.MapDataset.source(items)[shard_index::shard_count]
    if len(source) == 0:
        raise DataError(f"host {shard_index} of {shard_count} has no {what}: fewer {what} than hosts")
    in_memory = isinstance(items, (list, tuple))
    return source.shuffle(seed=seed).repeat(num_epochs).to_iter_dataset(
        grain.ReadOptions(num_threads=0) if in_memory else None)
