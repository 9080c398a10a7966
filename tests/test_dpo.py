"""DPO: reply log-probs and the loss against transformers in torch and TRL's formula, packed pairs against pairs
alone, bad input and settings named, and short runs through the train loop (full weights and LoRA)."""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PREFERENCE_TRAIN, PREFERENCE_VALIDATION, TOKENIZER, first_lines, make_hf_model
from flax import nnx

from granite_jax import load_hf_checkpoint
from granite_jax.data.chat_template import chat_format
from granite_jax.data.preference import load_preference_samples, pair_sample, preference_dataset
from granite_jax.data.sources import DataError
from granite_jax.data.tokenizer import load_tokenizer
from granite_jax.train.config import RunConfigError, load_run_config
from granite_jax.train.dpo import dpo_loss_fn, dpo_pair_losses, pair_sums, reply_log_probs, token_log_probs

VOCAB = 128


def _random_pairs(seed: int, count: int) -> list[tuple]:
    """`count` pairs of (ids, trainable) sequences: a shared random prompt, then two random replies."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        prompt = rng.integers(0, VOCAB, int(rng.integers(3, 9)))
        sequences = []
        for _ in range(2):
            reply = rng.integers(0, VOCAB, int(rng.integers(2, 7)))
            ids = np.concatenate([prompt, reply]).astype(np.int32)
            sequences.append((ids, np.arange(len(ids)) >= len(prompt)))
        pairs.append(tuple(sequences))
    return pairs


def _packed_batch(pairs, seq_len: int = 64, rows: int | None = None) -> dict:
    """All pairs packed into rows of seq_len (first-fit), every row the pipeline makes, as jnp arrays; with
    `rows`, rows of padding (segment 0, no weight) fill it to that many, so that batches of several tests and
    checks have one shape (one compilation of each program for all)."""
    samples = [pair_sample(*p) for p in pairs]
    made = list(preference_dataset(samples, seq_len=seq_len, batch_size=1, seed=0, num_epochs=1, packing_bins=2))
    batch = {k: jnp.asarray(np.concatenate([r[k] for r in made])) for k in made[0]}
    assert int((batch["segment_ids"].max(axis=1) // 2).sum()) == len(pairs)
    if rows is not None:
        assert batch["segment_ids"].shape[0] <= rows
        batch = {k: jnp.pad(v, [(0, rows - v.shape[0]), (0, 0)]) for k, v in batch.items()}
    return batch


def _pair_order(batch, pairs) -> np.ndarray:
    """(pairs, 2): the (row, pair slot) where each of `pairs` was packed, found by its chosen sequence's ids."""
    where = {}
    segments, ids = np.asarray(batch["segment_ids"]), np.asarray(batch["input_ids"])
    for row in range(segments.shape[0]):
        for slot in range(segments[row].max() // 2):
            where[ids[row][segments[row] == 2 * slot + 1].tobytes()] = (row, slot)
    return np.asarray([where[chosen[0][:-1].tobytes()] for chosen, _ in pairs])


# The batch shape of every check on the HF models below: 5 rows of 64 tokens (5 pairs, each alone in its row).
ROWS = 5
BETA = 0.1


@functools.partial(jax.jit, static_argnums=1)
def _loss_and_grads(params, graphdef, batch, reference):
    """dpo_loss_fn's (loss, metrics) and gradients for the model `graphdef`+`params` against a reference model's
    parameters: the one compiled DPO step of the packing and parity checks."""
    return jax.value_and_grad(lambda p: dpo_loss_fn(p, graphdef, batch, beta=BETA, chunk=16, reference=reference),
                              has_aux=True)(params)


@nnx.jit(static_argnames="chunk")
def _reply_log_probs(model, batch, chunk: int = 16):
    return reply_log_probs(token_log_probs(model, batch, chunk=chunk)[0], batch)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{"policy", "reference"}: (directory, transformers model, our model loaded from it), random tiny HF
    checkpoints (seeds 0 and 1), shared by the checks below."""
    root = tmp_path_factory.mktemp("dpo-hf")
    models = {}
    for seed, name in enumerate(("policy", "reference")):
        hf_model = make_hf_model(seed)
        hf_model.save_pretrained(root / name)
        models[name] = (str(root / name), hf_model, load_hf_checkpoint(str(root / name)))
    return models


def _torch_reply_log_probs(hf_model, pairs):
    """Per pair (chosen, rejected) Σ log p(token) over the reply, each sequence alone in transformers."""
    import torch

    sequences = [s for pair in pairs for s in pair]
    width = max(len(ids) for ids, _ in sequences)
    ids = np.zeros((len(sequences), width), np.int64)  # right-padded: a causal model's earlier tokens see no padding
    weights = np.zeros((len(sequences), width - 1))
    for row, (sequence, trainable) in enumerate(sequences):
        ids[row, :len(sequence)] = sequence
        weights[row, :len(sequence) - 1] = trainable[1:]
    with torch.no_grad():
        logits = hf_model(torch.tensor(ids), use_cache=False).logits[:, :-1].double()
    token = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0]
    return (token * torch.tensor(weights)).sum(-1).numpy().reshape(len(pairs), 2)


@pytest.mark.slow
def test_log_probs_loss_and_packing_match_transformers_trl_and_pairs_alone(hf_models):
    """One DPO step program (loss, metrics, gradients) checked two ways on 5 random pairs:
    - reply log-probs of the packed pairs (policy and reference) equal transformers' per sequence; the DPO loss and
      rewards equal TRL 1.16's sigmoid / IPO formulas (DPOTrainer._compute_loss, written out in torch: it is a
      method of a full trainer) and cDPO's smoothed loss;
    - pairs packed several to a row give the loss, pair metrics and gradients of each pair in a row of its own.
    One test for both: they share the models and the compiled step."""
    import torch
    import torch.nn.functional as F

    (_, policy_hf, policy), (_, reference_hf, reference) = hf_models["policy"], hf_models["reference"]
    pairs = _random_pairs(0, ROWS)
    made = _packed_batch(pairs)
    assert made["segment_ids"].shape[0] < len(pairs), "several pairs should share a row"
    batch = _packed_batch(pairs, rows=ROWS)
    expected = {"policy": _torch_reply_log_probs(policy_hf, pairs),
                "reference": _torch_reply_log_probs(reference_hf, pairs)}
    order = _pair_order(batch, pairs)
    log_probs = {}
    for name, model in (("policy", policy), ("reference", reference)):
        log_probs[name] = _reply_log_probs(model, batch)
        ours = np.stack([np.asarray(x)[order[:, 0], order[:, 1]] for x in log_probs[name]], -1)
        np.testing.assert_allclose(ours, expected[name], rtol=1e-5, atol=1e-5)

    graphdef, params = nnx.split(policy, nnx.Param)
    reference_params = nnx.state(reference, nnx.Param)
    (_, metrics), grads = _loss_and_grads(params, graphdef, batch, reference_params)
    pc, pr = (torch.tensor(expected["policy"][:, i]) for i in (0, 1))
    rc, rr = (torch.tensor(expected["reference"][:, i]) for i in (0, 1))
    delta = (pc - rc) - (pr - rr)
    lengths = torch.tensor([[t[1:].sum() for _, t in p] for p in pairs], dtype=torch.float64)
    trl = {"sigmoid": -F.logsigmoid(BETA * delta),
           "ipo": ((pc - rc) / lengths[:, 0] - (pr - rr) / lengths[:, 1] - 1 / (2 * BETA)) ** 2}
    np.testing.assert_allclose(float(metrics["loss"]), float(trl["sigmoid"].mean()), rtol=1e-5, atol=1e-6)
    # The other losses, from our log-probs of the packed pairs (one compiled step is enough for the plumbing).
    tokens = [np.asarray(t)[order[:, 0], order[:, 1]] for t in pair_sums(batch["loss_weights"], batch["segment_ids"])]
    cdpo = -(0.9 * F.logsigmoid(BETA * delta) + 0.1 * F.logsigmoid(-BETA * delta))
    for settings, expected_loss in ((dict(loss="ipo"), trl["ipo"]), (dict(label_smoothing=0.1), cdpo)):
        losses, _, _ = dpo_pair_losses(
            *(np.asarray(x)[order[:, 0], order[:, 1]] for x in (*log_probs["policy"], *log_probs["reference"])),
            beta=BETA, chosen_tokens=tokens[0], rejected_tokens=tokens[1], **settings)
        np.testing.assert_allclose(np.asarray(losses), expected_loss.numpy(), rtol=1e-5, atol=1e-6)
    chosen_rewards, rejected_rewards = BETA * (pc - rc), BETA * (pr - rr)
    np.testing.assert_allclose(float(metrics["reward_chosen"]), float(chosen_rewards.mean()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["reward_margin"]), float((chosen_rewards - rejected_rewards).mean()),
                               rtol=1e-5, atol=1e-6)
    accuracy = float((chosen_rewards > rejected_rewards).double().mean())
    assert float(metrics["reward_accuracy"]) == pytest.approx(accuracy)
    assert float(metrics["pairs"]) == ROWS and float(metrics["loss"]) > 0

    # Each pair alone in its row: the same batch shape, so the same compiled step.
    alone = {k: jnp.concatenate([_packed_batch([p])[k] for p in pairs]) for k in batch}
    assert alone["segment_ids"].shape == batch["segment_ids"].shape
    (_, alone_metrics), alone_grads = _loss_and_grads(params, graphdef, alone, reference_params)
    for name in ("loss", "reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin", "pairs", "tokens"):
        np.testing.assert_allclose(float(metrics[name]), float(alone_metrics[name]), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(alone_grads)):
        scale = max(float(jnp.abs(b).max()), 1e-6)
        assert float(jnp.abs(a - b).max()) / scale < 1e-4, jax.tree_util.keystr(path)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def _write_lines(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


GOOD = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": GOOD["prompt"], "rejected": GOOD["rejected"]}, "'chosen' is missing"),
    ({"prompt": GOOD["prompt"], "chosen": GOOD["chosen"]}, "'rejected' is missing"),
    ({**GOOD, "rejected": 5}, "'rejected' must be a list of {role, content} messages or a string"),
    ({**GOOD, "chosen": [{"role": "user", "content": "hi"}]}, "'chosen' has no assistant message after the prompt"),
    ({**GOOD, "prompt": [{"role": "robot", "content": "x"}]}, "prompt + chosen: messages[0].role='robot'"),
    ("{not json", "not valid JSON"),
    ({**GOOD, "rejected": GOOD["chosen"]}, "'chosen' and 'rejected' are the same reply: the pair prefers nothing"),
    ({**GOOD, "chosen": "4", "rejected": "4"}, "'chosen' and 'rejected' are the same reply"),
    ({**GOOD, "rejected": ""}, "'rejected' is empty: there is no reply to score"),
    ({**GOOD, "chosen": []}, "'chosen' is empty: there is no reply to score"),
    ({"chosen": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}],
      "rejected": [{"role": "user", "content": "3 + 3?"}, {"role": "assistant", "content": "5"}]},
     "without 'prompt', 'chosen' and 'rejected' must share every message before the reply; they differ first at "
     "message 0, which in 'chosen' is a 'user' message: the two replies answer different prompts"),
])
def test_bad_preference_lines_name_file_line_and_field(tmp_path, bad, message):
    path = _write_lines(tmp_path / "pairs.jsonl", [GOOD, bad])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {message}")):
        load_preference_samples([path], chat_format("auto", TOKENIZER), load_tokenizer(TOKENIZER), seq_len=128,
                                vocab_size=4096)
    # bad_lines=skip: the line is counted, the good one kept
    samples, stats = load_preference_samples([path], chat_format("auto", TOKENIZER), load_tokenizer(TOKENIZER),
                                             seq_len=128, vocab_size=4096, bad_lines="skip")
    assert len(samples) == 1 and stats.bad_lines[0].startswith(f"{path}:2: ")


def test_string_replies_and_implicit_prompts_tokenize_like_the_conversational_layout(tmp_path):
    """The three layouts of one pair give the same tokens and weights; the weights cover the reply only."""
    plain = {"prompt": GOOD["prompt"], "chosen": "4", "rejected": "5"}
    implicit = {"chosen": GOOD["prompt"] + GOOD["chosen"], "rejected": GOOD["prompt"] + GOOD["rejected"]}
    path = _write_lines(tmp_path / "pairs.jsonl", [GOOD, plain, implicit])
    tokenizer = load_tokenizer(TOKENIZER)
    samples, _ = load_preference_samples([path], chat_format("auto", TOKENIZER), tokenizer, seq_len=128,
                                         vocab_size=4096)
    for other in samples[1:]:
        for name, value in samples[0].items():
            np.testing.assert_array_equal(other[name], value, err_msg=name)
    sample = samples[0]
    reply = sample["targets"][sample["loss_weights"] > 0]
    assert tokenizer.decode(reply.tolist()) == "4<|end_of_text|>5<|end_of_text|>"


@pytest.mark.parametrize("overrides, message", [
    (["data.format=preference", "dpo.beta=0"], "dpo.beta=0.0 must be positive"),
    (["data.format=preference", "dpo.beta=-0.1"], "dpo.beta=-0.1 must be positive"),
    (["data.format=preference", "dpo.label_smoothing=0.5"], "dpo.label_smoothing=0.5 is outside [0, 0.5)"),
    (["data.format=preference", "dpo.loss=hinge"], "dpo.loss='hinge': expected one of ['sigmoid', 'ipo']"),
    (["data.format=preference", "dpo={loss: ipo, label_smoothing: 0.1}"], "applies to loss=sigmoid only"),
    (["data.format=chat", "dpo.beta=0.2"], "dpo is set but data.format='chat'"),
])
def test_bad_dpo_settings_name_the_field(overrides, message):
    with pytest.raises(RunConfigError, match=re.escape(message)):
        load_run_config(None, overrides)


def test_dpo_settings_default_for_preference_data():
    config = load_run_config(None, ["data.format=preference"])
    assert config.dpo is None and config.preference_tuning.beta == 0.1 and config.preference_tuning.loss == "sigmoid"
    assert load_run_config(None, []).preference_tuning is None


@pytest.mark.slow
def test_lora_reference_is_the_base_model(hf_models):
    """With LoRA the reference is the model with its adapters off: its log-probs equal the base model's exactly,
    while the adapted policy's differ."""
    from granite_jax.model.lora import apply_lora
    from granite_jax.train.dpo import reference_model

    directory, _, base_model = hf_models["policy"]
    batch = _packed_batch(_random_pairs(2, 3), rows=ROWS)
    base = _reply_log_probs(base_model, batch)
    model = apply_lora(load_hf_checkpoint(directory), rank=4, alpha=8.0, dropout=0.0,
                       targets=["q_proj", "v_proj", "in_proj", "out_proj"], rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.05, params)  # adapters that change the model (B starts at zero)
    policy = _reply_log_probs(nnx.merge(graphdef, params, frozen), batch)
    reference = _reply_log_probs(reference_model(graphdef, params, frozen=frozen), batch)
    for ours, expected in zip(reference, base):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
    assert np.abs(np.asarray(policy[0]) - np.asarray(base[0])).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_short_dpo_run_logs_reward_accuracy(tmp_path, lora, capsys):
    """Two DPO steps through the train loop on the bundled preference set (its first 40 pairs: 2 steps use about
    4) and its validation set: the loss starts at log 2 (policy = reference), reward accuracy and rewards are
    logged per step and evaluated; with LoRA too (no evaluation)."""
    from granite_jax.train.loop import train

    run_dir, pairs = tmp_path / "run", tmp_path / "pairs.jsonl"
    pairs.write_text("".join(first_lines(PREFERENCE_TRAIN, 40)))
    overrides = [
        f"run_dir={run_dir}", "steps=2", "data.format=preference", f"data.train=[{pairs}]",
        f"data.validation=[{PREFERENCE_VALIDATION}]" if not lora else "data.validation=[]",
        f"data.tokenizer={TOKENIZER}",
        "data.seq_len=128",
        "data.batch_size=2", "dpo={beta: 0.5}", "model_overrides={num_hidden_layers: 2, layer_types: [mamba, "
        "attention], mamba_chunk_size: 32}", "optimizer={lr: 3.0e-3, schedule: constant, warmup_steps: 0}",
        "checkpoint.every_steps=2", "checkpoint.async_save=false", "log_every=1", "eval_every=2", "eval_batches=1"]
    if lora:
        overrides.append("lora={rank: 4, alpha: 8}")
    losses = train(load_run_config(None, overrides))
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(2.0), abs=1e-5)  # the first step's policy is the reference
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # policy = reference: no margin (to float rounding: the adapters' zero product is added in another fusion)
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert all(0.0 <= r["reward_accuracy"] <= 1.0 and r["pairs"] >= 2 for r in records)
    assert abs(records[1]["reward_margin"]) > 1e-3  # the policy moved away from the reference
    out = capsys.readouterr().out
    assert "preference pairs" in out and "reward acc " in out
    assert lora or re.search(r"eval step 2: loss [0-9.]+ \| reward acc [0-9.]+ chosen", out)
