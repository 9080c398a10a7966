"""Pre-tokenize a corpus into ArrayRecord files, so training reads token ids instead of tokenizing text.

    python -m granite_jax.data.pretokenize --input data/kjv/kjv.jsonl.gz --tokenizer data/tokenizer \\
        --out data/kjv/kjv.arrayrecord

Each record is one document's token ids followed by the tokenizer's EOS, as little-endian int32 bytes. Point
`data.train` at `.arrayrecord` files to use them (`data.tokenizer` is then only used for its vocabulary size).
"""

from __future__ import annotations

import argparse

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from granite_jax.data.sources import read_documents
from granite_jax.data.tokenizer import load_tokenizer

RECORD_DTYPE = np.dtype("<i4")


def encode_record(ids) -> bytes:
    return np.asarray(ids, RECORD_DTYPE).tobytes()


def decode_record(record: bytes) -> np.ndarray:
    return np.frombuffer(record, RECORD_DTYPE).astype(np.int32)


def pretokenize(inputs: list[str], tokenizer_path: str, out: str, text_field: str = "text") -> int:
    tokenizer = load_tokenizer(tokenizer_path)
    writer = ArrayRecordWriter(out, "group_size:1")
    count = 0
    try:
        for path in inputs:
            for text in read_documents(path, text_field):
                if text.strip():
                    writer.write(encode_record(tokenizer.encode(text) + [tokenizer.eos_id]))
                    count += 1
    finally:
        writer.close()
    return count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--text-field", default="text")
    args = parser.parse_args(argv)
    print(f"wrote {pretokenize(args.input, args.tokenizer, args.out, args.text_field)} documents to {args.out}")


if __name__ == "__main__":
    main()
