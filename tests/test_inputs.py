"""Bad inputs to data loading and evaluation: nothing is lost silently and nothing reaches the user as a
traceback. A line that is not UTF-8 is a bad line (file:line, or skipped and counted); a fake .gz, a directory,
a corrupt tokenizer, another model's tokenizer are each one `error:` line; eval's JSON is always valid JSON."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import types

import pytest
from conftest import ROOT, TOKENIZER, eval_cli

from granite_jax.data.sources import DataError, load_documents

WITH_TOKENIZER = dict(vocab_size=4096, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=1)
BAD_UTF8 = b"bad \xff byte"  # 0xff never occurs in UTF-8


def _one_error_line(capsys) -> str:
    """stderr of a command that failed: exactly one `error:` line and no traceback; returns that line."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _write(path, lines: list[bytes]) -> str:
    data = b"".join(line + b"\n" for line in lines)
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return str(path)


# ------------------------------------------------------------------------------------------- invalid UTF-8
@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.txt"])
def test_invalid_utf8_is_a_bad_line_in_pretraining_data(tmp_path, name):
    if name.endswith(".txt"):  # three paragraphs; the second holds the bad line (line 4)
        lines = [b"first para", b"", b"second para", BAD_UTF8, b"", b"third para"]
        bad_number, kept = 4, ["first para", "third para"]
    else:
        lines = [b'{"text": "first"}', b'{"text": "' + BAD_UTF8 + b'"}', b'{"text": "third"}']
        bad_number, kept = 2, ["first", "third"]
    path = _write(tmp_path / name, lines)
    with pytest.raises(DataError, match=rf"{name}:{bad_number}: not valid UTF-8 \(byte 0xff.*data.bad_lines=skip"):
        load_documents([path])
    from granite_jax.data.sources import BadLines

    bad = BadLines("skip")
    assert load_documents([path], bad_lines=bad) == kept  # a .txt paragraph with a bad line is dropped whole
    assert len(bad.skipped) == 1 and f"{name}:{bad_number}: not valid UTF-8" in bad.skipped[0]


def test_invalid_utf8_is_a_bad_line_in_sft_data(tmp_path):
    from granite_jax.data.chat_template import chat_format
    from granite_jax.data.sft import load_sft_samples
    from granite_jax.data.tokenizer import load_tokenizer

    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bad = b'{"messages": [{"role": "user", "content": "' + BAD_UTF8 + b'"}, {"role": "assistant", "content": "x"}]}'
    path = _write(tmp_path / "chat.jsonl.gz", [good.encode(), bad, good.encode()])
    args = dict(chat_format=chat_format("builtin", TOKENIZER), tokenizer=load_tokenizer(TOKENIZER), seq_len=128,
                vocab_size=4096)
    with pytest.raises(DataError, match=r"chat.jsonl.gz:2: not valid UTF-8 .*data.bad_lines=skip"):
        load_sft_samples([path], **args)
    samples, stats = load_sft_samples([path], bad_lines="skip", **args)
    assert len(samples) == 2 and len(stats.bad_lines) == 1 and ":2: not valid UTF-8" in stats.bad_lines[0]


# --------------------------------------------------------------------------- unreadable paths and files
def test_fake_or_truncated_gzip_and_directories_are_one_error(tmp_path):
    from granite_jax.data.chat_template import chat_format
    from granite_jax.data.sft import load_sft_samples
    from granite_jax.data.tokenizer import load_tokenizer

    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text('{"text": "not compressed"}\n')
    truncated = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress(b"".join(b'{"text": "document %d"}\n' % i for i in range(2000)))
    truncated.write_bytes(whole[: len(whole) // 2])
    for path in (fake, truncated):
        with pytest.raises(DataError, match=rf"{path.name}': not valid gzip data"):
            load_documents([str(path)])
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match=r"folder.jsonl' is a directory; expected a file"):
        load_documents([str(folder)])
    chat = dict(chat_format=chat_format("builtin", TOKENIZER), tokenizer=load_tokenizer(TOKENIZER), seq_len=128,
                vocab_size=4096)
    with pytest.raises(DataError, match=r"fake.jsonl.gz': not valid gzip data"):
        load_sft_samples([str(fake)], **chat)
    with pytest.raises(DataError, match=r"folder.jsonl' is a directory; expected a file: JSON lines"):
        load_sft_samples([str(folder)], **chat)


def _corrupt_tokenizer(tmp_path) -> str:
    directory = tmp_path / "corrupt_tokenizer"
    shutil.copytree(TOKENIZER, directory)
    text = (directory / "tokenizer.json").read_text()
    (directory / "tokenizer.json").write_text(text[: len(text) // 2])  # cut in the middle
    return str(directory)


def test_corrupt_tokenizer_json_is_one_error(tmp_path):
    from granite_jax.data.tokenizer import load_tokenizer

    corrupt = _corrupt_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"corrupt_tokenizer/tokenizer.json: not a readable tokenizer.json"):
        load_tokenizer(corrupt)
    (tmp_path / "corrupt_tokenizer" / "tokenizer_config.json").write_text("{oops")
    shutil.copy(os.path.join(TOKENIZER, "tokenizer.json"), tmp_path / "corrupt_tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: not readable JSON"):
        load_tokenizer(corrupt)


def test_pretokenize_command_errors_are_one_line(tmp_path, capsys):
    from granite_jax.data.pretokenize import main

    data = _write(tmp_path / "docs.jsonl", [b'{"text": "In the beginning"}', b'{"text": "' + BAD_UTF8 + b'"}'])
    out = tmp_path / "docs.arrayrecord"
    cases = [
        (["--input", str(tmp_path / "nope.jsonl")], "nope.jsonl' does not exist"),
        (["--input", str(tmp_path)], "is a directory; expected a file"),
        (["--input", data], "docs.jsonl:2: not valid UTF-8 (byte 0xff at byte 15 of the line) (pass --bad-lines skip"),
        (["--input", data, "--tokenizer", _corrupt_tokenizer(tmp_path)], "not a readable tokenizer.json"),
        (["--input", data, "--out", str(tmp_path / "no" / "x.arrayrecord")], "directory"),
        (["--input", data, "--out", str(tmp_path)], "is a directory; expected the path of the .arrayrecord"),
    ]
    for flags, message in cases:
        argv = ["--tokenizer", TOKENIZER, "--out", str(out), *flags]  # a later flag wins
        assert main(argv) == 2, argv
        assert message in _one_error_line(capsys), argv
        assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")  # nothing half-written
    assert main(["--input", data, "--tokenizer", TOKENIZER, "--out", str(out), "--bad-lines", "skip"]) == 0
    assert "wrote 1 documents" in capsys.readouterr().out and os.path.isfile(out)


def test_tokenizer_train_command_errors_are_one_line(tmp_path, capsys):
    from granite_jax.data.tokenizer import main

    data = _write(tmp_path / "docs.jsonl", [b'{"text": "In the beginning"}', b'{"text": "' + BAD_UTF8 + b'"}'])
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["--input", str(tmp_path / "nope.txt")], "nope.txt' does not exist"),
        (["--input", data], "docs.jsonl:2: not valid UTF-8"),
        (["--kind", "sentencepiece", "--input", data, "--out", str(tmp_path / "sp")], "docs.jsonl:2: not valid UTF-8"),
        (["--input", data, "--vocab-size", "5"], "--vocab-size 5: a byte-level-bpe tokenizer needs at least 264"),
        (["--input", data, "--out", str(tmp_path / "a_file")], "is a file; expected a directory"),
        (["--input", data, "--out", str(tmp_path / "a_file" / "sub")], "cannot create the directory"),
        (["--kind", "sentencepiece", "--input", data, "--out", str(tmp_path / "no" / "sp")], "does not exist"),
    ]
    for flags, message in cases:
        argv = ["train", "--vocab-size", "300", "--out", str(tmp_path / "tok"), *flags]
        assert main(argv) == 2, argv
        assert message in _one_error_line(capsys), argv


# ------------------------------------------------------------------------------------------------- eval
def _checkpoint(hf_checkpoint, name="hf", **overrides) -> str:
    directory, _ = hf_checkpoint(name=name, **{**WITH_TOKENIZER, **overrides})
    for file in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, file), directory)
    return directory


def test_tokenizer_must_match_the_models_vocabulary():
    """Ids outside the model: refused. Fewer tokens than the model: accepted when the gap is padding (released
    checkpoints pad to a multiple), refused when it is another model's tokenizer, unless explicitly allowed."""
    from granite_jax.eval.checkpoints import EvalCheckpointError, check_tokenizer_fits

    model = lambda vocab: types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=vocab, eos_token_id=1))  # noqa: E731
    tokenizer = lambda size: types.SimpleNamespace(vocab_size=size, eos_id=1)  # noqa: E731
    check_tokenizer_fits(model(100352), tokenizer(100352), "t")
    check_tokenizer_fits(model(100352), tokenizer(100277), "t")  # padded to a multiple
    check_tokenizer_fits(model(4160), tokenizer(4096), "t")
    with pytest.raises(EvalCheckpointError, match="has 1000 tokens but the model's vocabulary has 100352: 99352 ids "
                                                  "unused.*--allow-vocab-mismatch"):
        check_tokenizer_fits(model(100352), tokenizer(1000), "t")
    check_tokenizer_fits(model(100352), tokenizer(1000), "t", allow_vocab_mismatch=True)
    with pytest.raises(EvalCheckpointError, match="has 100352 tokens but the model's vocabulary has 1000"):
        check_tokenizer_fits(model(1000), tokenizer(100352), "t", allow_vocab_mismatch=True)  # never allowed


def test_eval_refuses_another_models_tokenizer_and_a_corrupt_one(hf_checkpoint, tmp_path):
    bigger = _checkpoint(hf_checkpoint, name="vocab8192", vocab_size=8192)  # its own files: the 4096-token tokenizer
    ran = eval_cli("generate", "--checkpoint", bigger, "--prompt", "x", "--max-new-tokens", "2")
    assert "has 4096 tokens but the model's vocabulary has 8192: 4096 ids unused" in ran.error_line()
    ran = eval_cli("perplexity", "--checkpoint", bigger, "--tokenizer", _corrupt_tokenizer(tmp_path),
                   "--data", os.path.join(ROOT, "data", "eval", "kjv-complete.jsonl"))
    assert "not a readable tokenizer.json" in ran.error_line()


def test_perplexity_bad_lines_and_non_finite_loss_give_valid_json(hf_checkpoint, tmp_path):
    """A non-UTF-8 line of --data is an error naming it (or skipped and counted with --bad-lines skip); a loss
    that is NaN is written as null with a note, never as the NaN that JSON does not have."""
    import torch

    directory = _checkpoint(hf_checkpoint)
    data = _write(tmp_path / "docs.jsonl", [b'{"text": "In the beginning"}', b'{"text": "' + BAD_UTF8 + b'"}'])
    argv = ["perplexity", "--checkpoint", directory, "--data", data, "--seq-len", "32", "--batch-size", "1"]
    assert "docs.jsonl:2: not valid UTF-8" in eval_cli(*argv).error_line()

    from transformers import AutoModelForCausalLM

    broken = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    broken.save_pretrained(directory)
    out = eval_cli(*argv, "--bad-lines", "skip").ok().stdout.strip().splitlines()[-1]
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON output: {out}"))
    assert result["skipped_lines"] == 1 and result["documents"] == 1
    assert result["loss"] is None and result["perplexity"] is None and result["bits_per_byte"] is None
    assert any("non-finite log-probabilities" in note for note in result["notes"])
