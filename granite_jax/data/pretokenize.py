"""Pre-tokenize a corpus into ArrayRecord files, so training reads token ids instead of tokenizing text.

    python -m granite_jax.data.pretokenize --input data/kjv/kjv.jsonl.gz --tokenizer data/tokenizer \\
        --out data/kjv/kjv.arrayrecord

Each record is one document's token ids followed by the tokenizer's EOS, as little-endian int32 bytes. Point
`data.train` at `.arrayrecord` files to use them (`data.tokenizer` is then only used for its vocabulary size).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from granite_jax.data.sources import BadLines, DataError, check_data_file, read_documents
from granite_jax.data.tokenizer import load_tokenizer, one_line

RECORD_DTYPE = np.dtype("<i4")


def encode_record(ids) -> bytes:
    return np.asarray(ids, RECORD_DTYPE).tobytes()


def decode_record(record: bytes) -> np.ndarray:
    return np.frombuffer(record, RECORD_DTYPE).astype(np.int32)


def pretokenize(inputs: list[str], tokenizer_path: str, out: str, text_field: str = "text", bad_lines=None) -> int:
    """Write every document of `inputs` to `out`; returns the number of documents. The records go to
    `out.partial`, renamed to `out` only once every input was read: a failed run leaves no `out` that looks
    complete. Malformed lines go to `bad_lines` (`sources.read_documents`; an error by default)."""
    for path in inputs:
        check_data_file(path)
    if os.path.isdir(out):
        raise DataError(f"--out {out!r} is a directory; expected the path of the .arrayrecord file to write")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise DataError(f"--out {out!r}: directory {os.path.dirname(out)!r} does not exist")
    tokenizer = load_tokenizer(tokenizer_path)
    partial = out + ".partial"
    writer = ArrayRecordWriter(partial, "group_size:1")
    if not writer.ok():
        raise DataError(f"--out {out!r}: cannot write {partial!r} ({writer.status()})")
    count, done = 0, False
    try:
        for path in inputs:
            for text in read_documents(path, text_field, bad_lines):
                if text.strip():
                    writer.write(encode_record(tokenizer.encode(text) + [tokenizer.eos_id]))
                    count += 1
        done = True
    finally:
        writer.close()
        if done:
            os.replace(partial, out)
        else:
            os.remove(partial)
    return count


def main(argv=None) -> int:
    """A mistake (missing input, bad line, corrupt tokenizer, unwritable --out) is one `error:` line on stderr
    and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--bad-lines", choices=["error", "skip"], default="error",
                        help="a malformed input line (not UTF-8, not JSON, no text field): stop, or skip and count it")
    args = parser.parse_args(argv)
    bad = BadLines(args.bad_lines, hint="pass --bad-lines skip to skip such lines")
    try:
        count = pretokenize(args.input, args.tokenizer, args.out, args.text_field, bad)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {count} documents to {args.out}" + (f"; {bad.summary()}" if bad.skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
