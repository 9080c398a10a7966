"""SFT end to end: packed conversations stay independent, and a random HF checkpoint fine-tuned here and
exported back loads in transformers with our logits and its tokenizer files."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import (
    CHAT_TRAIN,
    TOKENIZER,
    convert_cli,
    eval_cli,
    first_lines,
    forward,
    max_rel_error,
    train_cli,
)
from flax import nnx

from granite_jax.config import load_preset
from granite_jax.data.chat_template import chat_format
from granite_jax.data.sft import load_sft_samples, sft_dataset
from granite_jax.data.tokenizer import load_tokenizer
from granite_jax.model import GraniteForCausalLM


@pytest.mark.slow
def test_packed_conversations_do_not_see_each_other(tmp_path):
    """Logits of a packed SFT row equal each of its conversations run alone (attention and SSM state reset), on
    the tiny model cut to one Mamba and one attention layer: each kind of layer once is what the property needs."""
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(first_lines(CHAT_TRAIN, 24)))
    samples, _ = load_sft_samples([str(path)], chat_format("auto", TOKENIZER), load_tokenizer(TOKENIZER),
                                  seq_len=384, vocab_size=4096)
    rows = iter(sft_dataset(samples, seq_len=384, batch_size=1, seed=0, num_epochs=1))
    row = max(({k: v[0] for k, v in batch.items()} for batch in rows), key=lambda r: r["segment_ids"].max())
    segments = row["segment_ids"]
    assert segments.max() >= 3, "the row should pack several conversations"
    config = load_preset("tiny-hybrid-moe", mamba_chunk_size=16, num_hidden_layers=2,
                         layer_types=["mamba", "attention"])
    model = GraniteForCausalLM(config, rngs=nnx.Rngs(0))
    packed = np.asarray(forward(model, jnp.asarray(row["input_ids"])[None], jnp.asarray(segments)[None],
                                jnp.asarray(row["positions"])[None]).logits[0])
    # Each conversation alone, all in one batch (one compiled forward, not one per conversation length): row i
    # is conversation i + 1 at positions 0.., right-padded. The model is causal, so a row's padding comes after
    # every token compared and changes none of their logits; no segment ids, positions or masks are given.
    conversations = [np.flatnonzero(segments == segment) for segment in range(1, int(segments.max()) + 1)]
    alone_ids = np.zeros((len(conversations), max(map(len, conversations))), np.int32)
    for i, where in enumerate(conversations):
        alone_ids[i, :len(where)] = row["input_ids"][where]
    alone_logits = np.asarray(forward(model, jnp.asarray(alone_ids)).logits)
    for segment, where in enumerate(conversations, start=1):
        alone = alone_logits[segment - 1, :len(where)]
        assert max_rel_error(packed[where], alone) < 1e-5, segment
        # Targets stay inside the conversation: each one is the next input of the same segment, or unweighted.
        inside = row["targets"][where][:-1] == row["input_ids"][where][1:]
        assert inside.all() and row["loss_weights"][where[-1]] in (0.0, 1.0)
    assert not row["loss_weights"][segments == 0].any()


@pytest.mark.slow
def test_sft_from_hf_checkpoint_exports_back_to_transformers(tmp_path, hf_checkpoint):
    """Random tiny HF checkpoint (+ the bundled tokenizer) → SFT 2 steps → export → transformers loads the
    directory, its logits equal ours, and its tokenizer renders the chat template as we do. The checkpoint has one
    Mamba and one attention layer (each kind of layer once, for a smaller train step to compile)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from granite_jax.data.chat import parse_conversation, render_text
    from granite_jax.sources import RunDirectory

    source, _ = hf_checkpoint(vocab_size=4096, pad_token_id=0, bos_token_id=1, eos_token_id=1, num_hidden_layers=2,
                              layer_types=["mamba", "attention"])
    for name in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, name), source)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(first_lines(CHAT_TRAIN, 40)))
    run_dir = tmp_path / "run"
    proc = train_cli("--config", "configs/sft-tiny.yaml", f"init_from=hf:{source}", f"run_dir={run_dir}",
                     f"data.train=[{data}]", f"data.validation=[{data}]", "steps=2", "eval_every=2", "eval_batches=1",
                     "data.seq_len=128", "data.batch_size=2", "checkpoint.every_steps=2").ok()
    assert "chat format: " + os.path.join(source, "tokenizer_config.json") in proc.stdout
    # 40 lines: some truncated to 129 tokens, those cut before their first assistant token dropped; counted.
    report = re.search(r"train data: (\d+) conversations.*; (\d+) truncated.* (\d+) dropped with no assistant",
                       proc.stdout)
    kept, truncated, dropped = map(int, report.groups())
    assert kept + dropped == 40 and truncated > 0 and dropped > 0 and "eval step 2" in proc.stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["tokenizer"] == source  # data.tokenizer: null → the checkpoint directory's

    out = tmp_path / "exported"
    proc = convert_cli("export", run_dir, out).ok()
    assert "tokenizer files copied" in proc.stdout
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))

    ours, _, step = RunDirectory(str(run_dir)).load_with_run()
    ids = np.random.default_rng(0).integers(0, 4096, (2, 48))
    expected = np.asarray(forward(ours, jnp.asarray(ids)).logits)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        actual = hf(torch.tensor(ids), use_cache=False).logits.numpy()
    assert step == 2 and max_rel_error(actual, expected) <= 1e-4
    # The weights moved away from the source checkpoint (training happened).
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        before = original(torch.tensor(ids), use_cache=False).logits.numpy()
    assert max_rel_error(actual, before) > 1e-3

    conversation = json.loads(first_lines(CHAT_TRAIN, 1)[0])
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(conversation["messages"], tools=conversation.get("tools"), tokenize=False)
    assert text == render_text(parse_conversation(conversation))


@pytest.mark.slow
def test_sft_from_a_pretraining_run(tmp_path, reference_losses):
    """init_from=run:DIR starts from our own run's newest checkpoint and takes its tokenizer. The pretraining run
    is the suite's shared 8-step tiny run (test_train.py's; only read here)."""
    _, pretrain = reference_losses("steps=8")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(first_lines(CHAT_TRAIN, 10)))
    run_dir = tmp_path / "sft"
    proc = train_cli("--config", "configs/sft-tiny.yaml", f"init_from=run:{pretrain}", f"run_dir={run_dir}",
                     f"data.train=[{data}]", "data.validation=[]", "steps=2", "data.seq_len=128", "data.batch_size=2",
                     "checkpoint.every_steps=2").ok()
    assert f"training run:{pretrain}" in proc.stdout
    # the pretraining run's own copy of its tokenizer, by absolute path
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["tokenizer"] == str(pretrain / "tokenizer")
    # eval.py reads a run directory as well as an HF one (newest checkpoint, the run's tokenizer).
    generated = eval_cli("generate", "--checkpoint", run_dir, "--chat", "--prompt", "What is 2 + 2?",
                         "--max-new-tokens", "4", "--ignore-eos").ok()
    assert generated.stdout.strip()
    missing = train_cli("--config", "configs/sft-tiny.yaml", f"init_from=run:{tmp_path / 'nothing'}",
                        f"run_dir={tmp_path / 'x'}")
    assert "is not a run directory with checkpoints" in missing.error_line()
