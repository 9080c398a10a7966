"""Generate the bundled preference (DPO) set, data/preference/{train,validation}.jsonl.gz, from a fixed seed.

    python scripts/make_preference_corpus.py            # rewrites data/preference/

Each line is one pair in TRL's preference layout: an arithmetic question (the kind of data/chat's arithmetic
conversations, scripts/make_chat_corpus.py) with the correct answer as `chosen` and a wrong one as `rejected`
(off by a small amount, or the result of another operation). The lines use the three layouts
`granite_jax.data.preference` reads: conversational prompt and replies (most), plain-string replies, and the
implicit prompt (`chosen` / `rejected` whole conversations, no `prompt`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPERATIONS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b),
              "*": ("times", lambda a, b: a * b)}


def wrong_answer(rng: random.Random, a: int, b: int, symbol: str) -> int:
    """A plausible wrong result: off by 1..10, or the result of one of the other operations."""
    right = OPERATIONS[symbol][1](a, b)
    candidates = [right + d for d in range(-10, 11) if d] + [op(a, b) for s, (_, op) in OPERATIONS.items()
                                                            if s != symbol]
    return rng.choice([c for c in candidates if c != right])


def pair(rng: random.Random) -> dict:
    """One arithmetic preference pair, in one of the three layouts."""
    symbol = rng.choice(list(OPERATIONS))
    word, op = OPERATIONS[symbol]
    a, b = rng.randint(0, 99), rng.randint(0, 99 if symbol != "*" else 12)
    question = rng.choice([f"What is {a} {symbol} {b}?", f"What is {a} {word} {b}?", f"Compute {a} {symbol} {b}.",
                           f"{a} {symbol} {b} = ?"])
    right, wrong = op(a, b), wrong_answer(rng, a, b, symbol)
    prompt = [{"role": "user", "content": question}]
    if rng.random() < 0.3:
        prompt.insert(0, {"role": "system", "content": "Answer with the number only."})
        chosen, rejected = str(right), str(wrong)
    else:
        chosen, rejected = f"{a} {symbol} {b} = {right}.", f"{a} {symbol} {b} = {wrong}."
    layout = rng.random()
    if layout < 0.15:  # plain-string replies
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if layout < 0.3:  # implicit prompt
        return {"chosen": prompt + [{"role": "assistant", "content": chosen}],
                "rejected": prompt + [{"role": "assistant", "content": rejected}]}
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def pairs(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [pair(rng) for _ in range(count)]


def write(path: str, rows: list[dict]) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as raw:
        raw.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "data", "preference"))
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--validation", type=int, default=200)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    write(os.path.join(args.out, "train.jsonl.gz"), pairs(args.train, 0))
    write(os.path.join(args.out, "validation.jsonl.gz"), pairs(args.validation, 1))
    print(f"wrote {args.train} + {args.validation} preference pairs to {args.out}")


if __name__ == "__main__":
    main()
