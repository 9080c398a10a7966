"""Generate the bundled SFT corpus, data/chat/{train,validation}.jsonl.gz, from a fixed seed, and train the
bundled tokenizer, data/tokenizer/ (a 4096-token byte-level BPE with the Granite special tokens and chat
template), on the King James Bible plus the rendered training conversations.

    python scripts/make_chat_corpus.py            # rewrites data/chat/ and data/tokenizer/

Each line is one conversation in the OpenAI / Hugging Face convention (`{"messages": [...], "tools": [...]?,
"documents": [...]?}`), in five kinds that exercise every part of the Granite 4.0 chat format:

- arithmetic: "What is 37 + 45?" → "37 + 45 = 82." (some with a system prompt asking for the number only);
- verse lookup with a tool: the assistant calls `lookup_verse`, the tool returns the verse from the bundled
  King James Bible (data/kjv), and the assistant quotes it;
- weather with a tool: a call to `get_weather`, a JSON result, an answer built from it; some ask for two
  cities at once (two calls in one turn, two tool responses);
- documents (RAG): a chapter excerpt given as a document; the user asks for its first verse;
- multi-turn: arithmetic followed by a follow-up question on the previous result.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOOLS = {
    "lookup_verse": {"type": "function", "function": {
        "name": "lookup_verse", "description": "Return the text of one verse of the King James Bible.",
        "parameters": {"type": "object", "properties": {
            "book": {"type": "string", "description": "Book name, e.g. Genesis"},
            "chapter": {"type": "integer"}, "verse": {"type": "integer"}},
            "required": ["book", "chapter", "verse"]}}},
    "get_weather": {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
}
CITIES = ["Paris", "London", "Rome", "Madrid", "Berlin", "Lisbon", "Vienna", "Athens", "Dublin", "Oslo",
          "Prague", "Warsaw", "Zurich", "Cairo", "Lima", "Tokyo", "Delhi", "Austin", "Boston", "Denver"]
CONDITIONS = ["sunny", "cloudy", "raining", "snowing", "windy", "foggy"]
OPERATIONS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b),
              "*": ("times", lambda a, b: a * b)}


def load_verses(path: str) -> list[tuple[str, int, int, str]]:
    verses = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            title, _, body = json.loads(line)["text"].partition("\n\n")
            book, _, chapter = title.rpartition(" ")
            for number, verse in enumerate(body.split("\n"), 1):
                if len(verse) < 160:
                    verses.append((book, int(chapter), number, verse))
    return verses


def arithmetic(rng: random.Random) -> dict:
    symbol = rng.choice(list(OPERATIONS))
    word, op = OPERATIONS[symbol]
    a, b = rng.randint(0, 99), rng.randint(0, 99 if symbol != "*" else 12)
    question = rng.choice([f"What is {a} {symbol} {b}?", f"What is {a} {word} {b}?", f"Compute {a} {symbol} {b}.",
                           f"{a} {symbol} {b} = ?"])
    messages = [{"role": "user", "content": question}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "Answer with the number only."})
        answer = str(op(a, b))
    else:
        answer = f"{a} {symbol} {b} = {op(a, b)}."
    return {"messages": messages + [{"role": "assistant", "content": answer}]}


def follow_up(rng: random.Random) -> dict:
    a, b = rng.randint(0, 50), rng.randint(1, 9)
    total = a + b
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": f"{a} + {b} = {total}."},
                         {"role": "user", "content": rng.choice(["Now double it.", "And twice that?"])},
                         {"role": "assistant", "content": f"2 * {total} = {2 * total}."}]}


def verse_lookup(rng: random.Random, verses) -> dict:
    book, chapter, number, text = rng.choice(verses)
    call = {"name": "lookup_verse", "arguments": {"book": book, "chapter": chapter, "verse": number}}
    return {"tools": [TOOLS["lookup_verse"]], "messages": [
        {"role": "user", "content": rng.choice([f"Quote {book} {chapter}:{number}.",
                                                f"What does {book} {chapter}:{number} say?"])},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": json.dumps({"reference": f"{book} {chapter}:{number}", "text": text})},
        {"role": "assistant", "content": f"{book} {chapter}:{number}: \"{text}\""}]}


def weather(rng: random.Random) -> dict:
    cities = rng.sample(CITIES, 2 if rng.random() < 0.3 else 1)
    reports = [{"city": c, "temperature_c": rng.randint(-10, 35), "condition": rng.choice(CONDITIONS)} for c in cities]
    question = (f"What's the weather in {cities[0]}?" if len(cities) == 1
                else f"Compare the weather in {cities[0]} and {cities[1]}.")
    answer = " ".join(f"In {r['city']} it is {r['temperature_c']}°C and {r['condition']}." for r in reports)
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": "Let me check." if rng.random() < 0.2 else "",
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}}
                                for c in cities]}]
    messages += [{"role": "tool", "content": json.dumps(r)} for r in reports]
    messages.append({"role": "assistant", "content": answer})
    tools = [TOOLS["get_weather"], TOOLS["lookup_verse"]] if rng.random() < 0.5 else [TOOLS["get_weather"]]
    return {"tools": tools, "messages": messages}


def documents(rng: random.Random, verses) -> dict:
    start = rng.randrange(len(verses) - 3)
    passage = verses[start:start + 3]
    book, chapter, number, _ = passage[0]
    return {"documents": [{"doc_id": 1, "title": f"{book} {chapter}", "text": " ".join(v[3] for v in passage)}],
            "messages": [{"role": "user", "content": "What is the first sentence of the document?"},
                         {"role": "assistant", "content": passage[0][3]}]}


def conversations(count: int, seed: int, verses) -> list[dict]:
    rng = random.Random(seed)
    kinds = [(arithmetic, 0.4), (follow_up, 0.1), (lambda r: verse_lookup(r, verses), 0.2), (weather, 0.2),
             (lambda r: documents(r, verses), 0.1)]
    makers, weights = zip(*kinds)
    return [rng.choices(makers, weights)[0](rng) for _ in range(count)]


def write(path: str, rows: list[dict]) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as raw:
        raw.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "data", "chat"))
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "data", "tokenizer"),
                        help="where to train the bundled tokenizer ('' to skip)")
    args = parser.parse_args(argv)
    verses = load_verses(os.path.join(ROOT, "data", "kjv", "kjv.jsonl.gz"))
    os.makedirs(args.out, exist_ok=True)
    write(os.path.join(args.out, "train.jsonl.gz"), conversations(args.train, 0, verses))
    write(os.path.join(args.out, "validation.jsonl.gz"), conversations(args.validation, 1, verses))
    print(f"wrote {args.train} + {args.validation} conversations to {args.out}")
    if args.tokenizer:
        from granite_jax.data.chat import parse_conversation, render_text
        from granite_jax.data.sources import read_documents
        from granite_jax.data.tokenizer import train_byte_level_bpe

        bible = list(read_documents(os.path.join(ROOT, "data", "kjv", "kjv.jsonl.gz")))
        chats = [render_text(parse_conversation(c)) for c in conversations(args.train, 0, verses)]
        print("trained", train_byte_level_bpe(bible + chats, 4096, args.tokenizer))


if __name__ == "__main__":
    main()
