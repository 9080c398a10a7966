"""Build the bundled default corpus, data/kjv/kjv.jsonl.gz: the King James Bible, one chapter per document.

The text is public domain and comes from Debian's `bible-kjv` package, whose program prints it:

    apt-get install bible-kjv
    bible "Gen1:1-Rev22:21" > kjv.txt
    python scripts/prepare_kjv_corpus.py kjv.txt

Each chapter becomes {"text": "Genesis 1\\n\\nIn the beginning God created ..."} with one verse per line and
the verse numbers dropped; the last 5% of chapters (every 20th) form data/kjv/kjv-validation.jsonl.gz.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re

HEADING = re.compile(r"^\S.* \d+$")  # "Genesis 1", "1 Kings 3", "Song of Solomon 2"
VERSE = re.compile(r"^\s+\d+ (.*)$")


def chapters(lines):
    title, verses = None, []
    for line in lines:
        line = line.rstrip("\n")
        if HEADING.match(line):
            if title:
                yield title, verses
            title, verses = line, []
        elif (m := VERSE.match(line)):
            verses.append(m.group(1))
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()  # a verse wrapped onto the next line
    if title:
        yield title, verses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="output of `bible \"Gen1:1-Rev22:21\"`")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "kjv"))
    args = parser.parse_args()
    with open(args.source) as f:
        docs = [f"{title}\n\n" + "\n".join(verses) for title, verses in chapters(f)]
    if len(docs) != 1189:
        raise SystemExit(f"expected the 1189 chapters of the KJV, found {len(docs)}: is {args.source} complete?")
    os.makedirs(args.out, exist_ok=True)
    splits = {"kjv.jsonl.gz": [d for i, d in enumerate(docs) if i % 20 != 19],
              "kjv-validation.jsonl.gz": [d for i, d in enumerate(docs) if i % 20 == 19]}
    for name, split in splits.items():
        with gzip.open(os.path.join(args.out, name), "wt", compresslevel=9) as f:
            for doc in split:
                f.write(json.dumps({"text": doc}) + "\n")
        print(f"{name}: {len(split)} documents, {sum(map(len, split)):,} characters")


if __name__ == "__main__":
    main()
