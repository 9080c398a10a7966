"""Document sources: plain text, JSONL (a text field), Parquet (a text column). Gzip is read transparently."""

from __future__ import annotations

import gzip
import json
import os
from typing import Iterator


class DataError(ValueError):
    """A data path or its content is unusable; the message names the file (and line) and what was expected."""


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one file: a JSONL line's `text_field`, a Parquet row's column, or a whole text
    file's blank-line-separated paragraphs."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".jsonl") or name.endswith(".json"):
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{path}:{number}: expected an object with a string field {text_field!r}")
                yield record[text_field]
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[text_field])
        yield from (t for t in table.column(text_field).to_pylist() if t)
    elif name.endswith(".txt"):
        with _open_text(path) as f:
            paragraph = []
            for line in f:
                if line.strip():
                    paragraph.append(line.rstrip("\n"))
                elif paragraph:
                    yield "\n".join(paragraph)
                    paragraph = []
            if paragraph:
                yield "\n".join(paragraph)
    else:
        raise DataError(
            f"data file {path!r}: unknown format; expected .jsonl, .json, .txt or .parquet (optionally .gz)")


def load_documents(paths: list[str], text_field: str = "text"):
    """All documents of `paths`: a list of strings, or, when every path is an `.arrayrecord` file of
    pre-tokenized documents (`granite_jax.data.pretokenize`), a random-access source of their records."""
    if paths and all(p.endswith(".arrayrecord") for p in paths):
        import grain

        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"data files {missing} do not exist")
        source = grain.sources.ArrayRecordDataSource(list(paths))
        if len(source) == 0:
            raise DataError(f"no documents in {paths} (empty corpus)")
        return source
    if any(p.endswith(".arrayrecord") for p in paths):
        raise DataError(f"data paths {paths} mix pre-tokenized .arrayrecord files with text files")
    docs = [doc for path in paths for doc in read_documents(path, text_field) if doc.strip()]
    if not docs:
        raise DataError(f"no documents in {paths} (empty corpus)")
    return docs
