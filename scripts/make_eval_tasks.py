"""Generate the bundled evaluation tasks, data/eval/, from the validation chapters of the King James Bible.

    python scripts/make_eval_tasks.py            # rewrites data/eval/*.jsonl byte for byte

- kjv-next-verse.jsonl: multiple choice, `{"context", "choices", "answer"}` (the format of
  `python eval.py choice`, and of the lm-eval task data/eval/lm_eval/kjv_next_verse.yaml): a verse, then which
  of four verses follows it (the true next verse and three from other validation chapters).
- kjv-complete.jsonl: generation, `{"prompt", "target"}` (lm-eval task kjv_complete.yaml): the first half of a
  verse's words; the target is the rest of the verse.
"""

from __future__ import annotations

import gzip
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    rng = random.Random(0)
    chapters = []
    with gzip.open(os.path.join(ROOT, "data", "kjv", "kjv-validation.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            chapters.append(json.loads(line)["text"].partition("\n\n")[2].split("\n"))
    choice, complete = [], []
    for _ in range(100):
        c = rng.randrange(len(chapters))
        verses = chapters[c]
        i = rng.randrange(len(verses) - 1)
        others = [rng.choice(chapters[o]) for o in rng.sample([k for k in range(len(chapters)) if k != c], 3)]
        options = others + [verses[i + 1]]
        rng.shuffle(options)
        choice.append({"context": verses[i], "choices": [" " + o for o in options],
                       "answer": options.index(verses[i + 1])})
    for _ in range(50):
        words = rng.choice(rng.choice(chapters)).split(" ")
        half = max(1, len(words) // 2)
        complete.append({"prompt": " ".join(words[:half]), "target": " " + " ".join(words[half:])})
    out = os.path.join(ROOT, "data", "eval")
    os.makedirs(out, exist_ok=True)
    for name, rows in [("kjv-next-verse.jsonl", choice), ("kjv-complete.jsonl", complete)]:
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"wrote {len(choice)} + {len(complete)} items to {out}")


if __name__ == "__main__":
    main()
