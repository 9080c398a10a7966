"""Generate the bundled preference (DPO) set, data/preferences/{train,validation}.jsonl.gz, from a fixed seed.

    python scripts/make_preference_corpus.py            # rewrites data/preferences/

Each line is one pair in TRL's preference layout: an arithmetic question (the kind of data/chat's arithmetic
conversations, scripts/make_chat_corpus.py) with the correct answer, in the requested form, as `chosen`, and as
`rejected` one of three replies a user would not want:

- a refusal ("I'm sorry, I can't help with arithmetic."),
- the right answer buried in hedging ("I think it might be 12, but I am not sure. I am not sure."),
- the right answer in the wrong form (the whole equation when the system prompt asks for the number only).

The preference is one of manner, not of arithmetic: a model of the demo's size (10M parameters) cannot tell a
right sum from a wrong one (an earlier version of this set, right vs wrong results, left its reward accuracy at
chance), but it can learn within a few dozen DPO steps to prefer the direct answer in the form asked for. The
lines use the three layouts `granite_jax.data.preference` reads: conversational prompt and replies (most),
plain-string replies, and the implicit prompt (`chosen` / `rejected` whole conversations, no `prompt`).
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


REFUSALS = ("I'm sorry, I can't help with arithmetic.", "I cannot answer that question.",
            "Sorry, I am not able to do calculations.", "That is not something I can help with.")
HEDGES = ("I think it might be {answer}, but I am not sure. I am not sure.",
          "Hmm, maybe {answer}? Or maybe not. It is hard to say.",
          "It could be {answer}, I guess, but please check it yourself.")
NUMBER_ONLY = "Answer with the number only."


def rejected_reply(rng: random.Random, equation: str, answer: int, number_only: bool) -> str:
    """A reply the user would not want: a refusal, hedging, or (asked for the number only) the whole equation."""
    kinds = ["refusal", "hedge"] + (["form"] if number_only else [])
    kind = rng.choice(kinds)
    if kind == "refusal":
        return rng.choice(REFUSALS)
    if kind == "hedge":
        return rng.choice(HEDGES).format(answer=answer)
    return f"{equation} = {answer}."


def pair(rng: random.Random) -> dict:
    """One arithmetic preference pair, in one of the three layouts."""
    symbol = rng.choice(list(OPERATIONS))
    word, op = OPERATIONS[symbol]
    a, b = rng.randint(0, 99), rng.randint(0, 99 if symbol != "*" else 12)
    question = rng.choice([f"What is {a} {symbol} {b}?", f"What is {a} {word} {b}?", f"Compute {a} {symbol} {b}.",
                           f"{a} {symbol} {b} = ?"])
    answer, equation = op(a, b), f"{a} {symbol} {b}"
    prompt = [{"role": "user", "content": question}]
    number_only = rng.random() < 0.4
    if number_only:
        prompt.insert(0, {"role": "system", "content": NUMBER_ONLY})
    chosen = str(answer) if number_only else f"{equation} = {answer}."
    rejected = rejected_reply(rng, equation, answer, number_only)
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
    parser.add_argument("--out", default=os.path.join(ROOT, "data", "preferences"))
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--validation", type=int, default=200)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    write(os.path.join(args.out, "train.jsonl.gz"), pairs(args.train, 0))
    write(os.path.join(args.out, "validation.jsonl.gz"), pairs(args.validation, 1))
    print(f"wrote {args.train} + {args.validation} preference pairs to {args.out}")


if __name__ == "__main__":
    main()
