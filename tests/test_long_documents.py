"""Long documents stream: the packer tokenizes a text piece by piece as rows need it, its rows are those of
concat-then-split packing (Grain's, the oracle here), its position restores mid-document (and from a position
concat-then-split packing recorded), and a document of millions of tokens costs the host what a row does."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import grain
import numpy as np
import pytest
from conftest import KJV_TRAIN, ROOT, TOKENIZER

from granite_jax.data import packing
from granite_jax.data.packing import PackedRows, piece_end
from granite_jax.data.sources import load_documents
from granite_jax.data.tokenizer import load_tokenizer


class Digits:
    """Test tokenizer: the text "5 6 7" is the ids [5, 6, 7]; cut only at spaces, as a byte-level BPE."""
    vocab_size, eos_id, pad_id = 10**6, 1, 0

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


# Documents in memory are read in the calling thread, as the trainer reads them (data/sources.py): grain's
# default read-ahead threads would only add thread hand-offs (most of these tests' time), not other rows.
IN_MEMORY = grain.ReadOptions(num_threads=0)


def concat_then_split(documents, tokenizer, seq_len: int):
    """The oracle: whole documents tokenized, then Grain's concat-then-split packing."""
    tokens = grain.MapDataset.source(documents).repeat(None).map(
        lambda d: {"input_ids": np.asarray(tokenizer.encode(d) + [tokenizer.eos_id], np.int32)})
    return grain.experimental.ConcatThenSplitIterDataset(tokens.to_iter_dataset(IN_MEMORY),
                                                         length_struct={"input_ids": seq_len})


def packed(documents, tokenizer, seq_len: int):
    return PackedRows(grain.MapDataset.source(documents).repeat(None).to_iter_dataset(IN_MEMORY), tokenizer,
                      tokenizer.vocab_size, seq_len)


def rows(iterator, count: int) -> list:
    out = []
    for _ in range(count):
        row = next(iterator)
        out.append([row[k].tolist() for k in (("input_ids", "segment_ids", "positions") if "segment_ids" in row else
                                              ("input_ids", "input_ids_segment_ids", "input_ids_positions"))])
    return out


def random_documents(rng: random.Random) -> list[str]:
    return [" ".join(str(rng.randint(2, 99)) for _ in range(rng.choice([1, 2, 5, 30, 100])))
            for _ in range(rng.randint(1, 8))]


@pytest.mark.parametrize("seq_len", [2, 3, 7, 16, 31, 64])
def test_rows_are_those_of_concat_then_split_packing(monkeypatch, seq_len):
    """Pieces of 9 characters (a document of 100 numbers is ~30 pieces): the rows, their segment ids and
    positions over two epochs of random corpora equal Grain's packing of whole documents, documents longer than
    several rows, exact fits and one-token rows included."""
    monkeypatch.setattr(packing, "PIECE_CHARS", 9)
    rng = random.Random(seq_len)
    for _ in range(15):
        documents = random_documents(rng)
        count = 2 * sum(len(d.split()) + 1 for d in documents) // seq_len
        assert rows(iter(packed(documents, Digits(), seq_len)), count) == \
            rows(iter(concat_then_split(documents, Digits(), seq_len)), count), documents


def test_a_position_restores_mid_document_and_from_concat_then_split_packing(monkeypatch):
    """A state taken after any row (inside a document, inside a piece) gives the same next rows on a new
    iterator; so does a state that concat-then-split packing wrote (checkpoints of earlier runs)."""
    monkeypatch.setattr(packing, "PIECE_CHARS", 9)
    rng = random.Random(0)
    for _ in range(25):
        documents, seq_len, skip = random_documents(rng), rng.choice([3, 7, 16, 31]), rng.randint(0, 10)
        for make in (packed, concat_then_split):
            iterator = iter(make(documents, Digits(), seq_len))
            rows(iterator, skip)
            state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
            expected = rows(iterator, 5)
            restored = iter(packed(documents, Digits(), seq_len))
            restored.set_state(state)
            assert rows(restored, 5) == expected, (make.__name__, documents, seq_len, skip, state)


def test_pieces_tokenize_like_the_whole_text():
    """The bundled byte-level BPE: a text cut where `piece_end` cuts it (pieces of 64 to 1,000 characters)
    tokenizes piece by piece into the tokens of the whole, for the corpus's texts and odd spacing and Unicode;
    a run without a space between words is cut at the limit."""
    tokenizer = load_tokenizer(TOKENIZER)
    texts = load_documents([KJV_TRAIN])[:60] + [
        "a  b   c\t d \n e f", "Ünïcödé — “quotes” 123 4567 don't it's 'quoted' x", " leading space", "trailing  ",
        "a \u00a0b \u3000c d", "tabs\tand\nnewlines\r\nmixed \r\n end"]
    for limit in (64, 1000):
        for text in texts:
            ids, start = [], 0
            while start < len(text):
                end = piece_end(text, start, limit)
                assert start < end <= start + limit and (end == len(text) or text[end] == " "), (text, start, end)
                ids += tokenizer.encode(text[start:end])
                start = end
            assert ids == tokenizer.encode(text), (limit, text[:80])
    assert piece_end("x" * 50, 0, 20) == 20 and piece_end("ab" + " " * 30 + "cd", 0, 20) == 20


def test_a_document_of_millions_of_tokens_costs_the_host_what_a_row_costs(tmp_path):
    """A 2M-token document (the corpus twice as one JSONL line, and as one plain-text paragraph) against the
    corpus's 1,130 short documents, 3 rows of 8,192 tokens each, each in a fresh child forked from a process
    that has imported the pipeline: the peak RSS is within 64 MB and the rows come within seconds
    (whole-document tokenization: more than 5 minutes, killed). A SIGTERM sent while further rows are being
    built is handled within a second (the trainer's handler stops the run after the step; a long native call
    would hold it off for as long as it runs). The children start from the imports' resident memory, not their
    peak: a process's own imports peak at about 270 MB, above what the rows cost (measured: 128 MB short,
    143 MB long in the children; 270 MB for all three as separate processes), which would hide a regression."""
    texts = load_documents([KJV_TRAIN])
    long_text = "\n\n".join(texts * 2)
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": long_text}) + "\n")
    (tmp_path / "long.txt").write_text(long_text.replace("\n\n", "\n") + "\n")
    script = (
        "import json, os, resource, signal, sys, threading, time\n"
        "from granite_jax.data.pipeline import pretraining_dataset\n"
        "from granite_jax.data.sources import load_documents\n"
        "from granite_jax.data.tokenizer import load_tokenizer\n"
        "def measure(path):\n"
        "    started = time.time()\n"
        f"    rows = iter(pretraining_dataset(load_documents([path]), load_tokenizer({TOKENIZER!r}), "
        "vocab_size=4096, seq_len=8192, batch_size=1, seed=0))\n"
        "    batches = [next(rows) for _ in range(3)]\n"
        "    measured = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.time() - started]\n"
        "    times = {}\n"
        "    signal.signal(signal.SIGTERM, lambda *_: times.setdefault('handled', time.time()))\n"
        "    def send():\n"
        "        times['sent'] = time.time()\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    threading.Timer(0.2, send).start()\n"
        "    while 'handled' not in times:\n"
        "        next(rows)\n"
        "    return measured + [times['handled'] - times['sent']]\n"
        "for path in sys.argv[1:]:\n"  # the imports above started no thread: forking is safe
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        print(json.dumps([os.path.basename(path), measure(path)]), flush=True)\n"
        "        os._exit(0)\n"
        "    assert os.waitpid(child, 0)[1] == 0, path\n")
    names = ("short.jsonl", "long.jsonl", "long.txt")
    done = subprocess.run([sys.executable, "-c", script, *(str(tmp_path / name) for name in names)], cwd=ROOT,
                          capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr
    measured = dict(json.loads(line) for line in done.stdout.splitlines())
    assert sorted(measured) == sorted(names), done.stdout
    for name in ("long.jsonl", "long.txt"):
        assert measured[name][0] < measured["short.jsonl"][0] + 64, measured
        assert measured[name][1] < 10, measured
        assert measured[name][2] < 1, measured
