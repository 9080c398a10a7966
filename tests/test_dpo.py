"""DPO: reply log-probs and the loss against transformers in torch and TRL's formula, packed pairs against pairs
alone, bad input and settings named, and short runs through the train loop (full weights and LoRA)."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PREFERENCE_TRAIN, PREFERENCE_VALIDATION, TOKENIZER, first_lines
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


def _packed_batch(pairs, seq_len: int) -> dict:
    """All pairs packed into rows of seq_len (first-fit), every row the pipeline makes, as jnp arrays."""
    samples = [pair_sample(*p) for p in pairs]
    rows = list(preference_dataset(samples, seq_len=seq_len, batch_size=1, seed=0, num_epochs=1, packing_bins=2))
    batch = {k: jnp.asarray(np.concatenate([r[k] for r in rows])) for k in rows[0]}
    assert int((batch["segment_ids"].max(axis=1) // 2).sum()) == len(pairs)
    return batch


def _pair_order(batch, pairs) -> np.ndarray:
    """(pairs, 2): the (row, pair slot) where each of `pairs` was packed, found by its chosen sequence's ids."""
    where = {}
    segments, ids = np.asarray(batch["segment_ids"]), np.asarray(batch["input_ids"])
    for row in range(segments.shape[0]):
        for slot in range(segments[row].max() // 2):
            where[ids[row][segments[row] == 2 * slot + 1].tobytes()] = (row, slot)
    return np.asarray([where[chosen[0][:-1].tobytes()] for chosen, _ in pairs])


_jitted_loss = jax.jit(dpo_loss_fn, static_argnums=1, static_argnames=("beta", "label_smoothing", "loss", "chunk"))


def _loss(model, reference, batch, **dpo):
    """dpo_loss_fn of the model against a reference model's parameters (beta 0.1 unless given), jitted."""
    graphdef, params = nnx.split(model, nnx.Param)
    return _jitted_loss(params, graphdef, batch, chunk=16, reference=nnx.state(reference, nnx.Param),
                        **{"beta": 0.1, **dpo})


@nnx.jit(static_argnames="chunk")
def _reply_log_probs(model, batch, chunk: int = 16):
    return reply_log_probs(token_log_probs(model, batch, chunk=chunk)[0], batch)


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
def test_log_probs_and_loss_match_transformers_and_trl(hf_checkpoint):
    """Reply log-probs of packed pairs (policy and reference) equal transformers' per sequence; the DPO loss and
    rewards equal TRL 1.16's sigmoid / IPO formulas (DPOTrainer._compute_loss, written out in torch: it is a
    method of a full trainer) and cDPO's smoothed loss."""
    import torch
    import torch.nn.functional as F

    policy_dir, policy_hf = hf_checkpoint(seed=0, name="policy")
    reference_dir, reference_hf = hf_checkpoint(seed=1, name="reference")
    policy, reference = load_hf_checkpoint(policy_dir), load_hf_checkpoint(reference_dir)
    pairs = _random_pairs(0, 5)
    batch = _packed_batch(pairs, seq_len=48)
    expected = {"policy": _torch_reply_log_probs(policy_hf, pairs),
                "reference": _torch_reply_log_probs(reference_hf, pairs)}
    order = _pair_order(batch, pairs)
    for name, model in (("policy", policy), ("reference", reference)):
        chosen, rejected = _reply_log_probs(model, batch)
        ours = np.stack([np.asarray(chosen)[order[:, 0], order[:, 1]], np.asarray(rejected)[order[:, 0], order[:, 1]]],
                        -1)
        np.testing.assert_allclose(ours, expected[name], rtol=1e-5, atol=1e-5)

    beta = 0.1
    pc, pr = (torch.tensor(expected["policy"][:, i]) for i in (0, 1))
    rc, rr = (torch.tensor(expected["reference"][:, i]) for i in (0, 1))
    delta = (pc - rc) - (pr - rr)
    lengths = torch.tensor([[t[1:].sum() for _, t in p] for p in pairs], dtype=torch.float64)
    trl = {"sigmoid": -F.logsigmoid(beta * delta),
           "ipo": ((pc - rc) / lengths[:, 0] - (pr - rr) / lengths[:, 1] - 1 / (2 * beta)) ** 2}
    _, metrics = _loss(policy, reference, batch, beta=beta)
    np.testing.assert_allclose(float(metrics["loss"]), float(trl["sigmoid"].mean()), rtol=1e-5, atol=1e-6)
    # The other losses, from our log-probs of the packed pairs (one compiled step is enough for the plumbing).
    policy_lp, reference_lp = (_reply_log_probs(m, batch) for m in (policy, reference))
    tokens = [np.asarray(t)[order[:, 0], order[:, 1]] for t in pair_sums(batch["loss_weights"], batch["segment_ids"])]
    cdpo = -(0.9 * F.logsigmoid(beta * delta) + 0.1 * F.logsigmoid(-beta * delta))
    for settings, expected_loss in ((dict(loss="ipo"), trl["ipo"]), (dict(label_smoothing=0.1), cdpo)):
        losses, _, _ = dpo_pair_losses(*(np.asarray(x)[order[:, 0], order[:, 1]] for x in (*policy_lp, *reference_lp)),
                                       beta=beta, chosen_tokens=tokens[0], rejected_tokens=tokens[1], **settings)
        np.testing.assert_allclose(np.asarray(losses), expected_loss.numpy(), rtol=1e-5, atol=1e-6)
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    np.testing.assert_allclose(float(metrics["reward_chosen"]), float(chosen_rewards.mean()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["reward_margin"]), float((chosen_rewards - rejected_rewards).mean()),
                               rtol=1e-5, atol=1e-6)
    accuracy = float((chosen_rewards > rejected_rewards).double().mean())
    assert float(metrics["reward_accuracy"]) == pytest.approx(accuracy)
    assert float(metrics["pairs"]) == 5


@pytest.mark.slow
def test_packed_pairs_equal_pairs_alone(hf_checkpoint):
    """Pairs packed several to a row give the loss, pair metrics and gradients of each pair in a row of its own."""
    policy_dir, _ = hf_checkpoint(seed=0, name="policy")
    reference_dir, _ = hf_checkpoint(seed=1, name="reference")
    policy, reference = load_hf_checkpoint(policy_dir), load_hf_checkpoint(reference_dir)
    pairs = _random_pairs(1, 4)
    packed = _packed_batch(pairs, seq_len=64)
    alone = {k: jnp.concatenate([_packed_batch([p], seq_len=64)[k] for p in pairs]) for k in packed}
    rows = packed["segment_ids"].shape[0]
    assert rows < len(pairs) == alone["segment_ids"].shape[0]
    # Rows of padding (segment 0, no weight) fill the packed batch to the same shape: one compilation for both.
    packed = {k: jnp.pad(v, [(0, len(pairs) - rows), (0, 0)]) for k, v in packed.items()}
    graphdef, params = nnx.split(policy, nnx.Param)
    reference_params = nnx.state(reference, nnx.Param)

    @jax.jit
    def loss_and_grads(params, batch):
        return jax.value_and_grad(lambda p: dpo_loss_fn(p, graphdef, batch, beta=0.5, chunk=16,
                                                        reference=reference_params), has_aux=True)(params)

    (_, packed_metrics), packed_grads = loss_and_grads(params, packed)
    (_, alone_metrics), alone_grads = loss_and_grads(params, alone)
    for name in ("loss", "reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin", "pairs", "tokens"):
        np.testing.assert_allclose(float(packed_metrics[name]), float(alone_metrics[name]), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    assert float(packed_metrics["pairs"]) == 4 and float(packed_metrics["loss"]) > 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(packed_grads), jax.tree.leaves(alone_grads)):
        scale = max(float(jnp.abs(b).max()), 1e-6)
        assert float(jnp.abs(a - b).max()) / scale < 1e-4, jax.tree_util.keystr(path)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(packed_grads))


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
def test_lora_reference_is_the_base_model(hf_checkpoint):
    """With LoRA the reference is the model with its adapters off: its log-probs equal the base model's exactly,
    while the adapted policy's differ."""
    from granite_jax.model.lora import apply_lora
    from granite_jax.train.dpo import reference_model

    directory, _ = hf_checkpoint(seed=0)
    batch = _packed_batch(_random_pairs(2, 3), seq_len=64)
    base = _reply_log_probs(load_hf_checkpoint(directory), batch)
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
    """A few DPO steps through the train loop on the bundled preference set (its first 300 pairs: 3 steps use
    about 12) and its validation set: the loss starts at log 2 (policy = reference), reward accuracy and rewards
    are logged per step and evaluated; with LoRA too (no evaluation)."""
    from granite_jax.train.loop import train

    run_dir, pairs = tmp_path / "run", tmp_path / "pairs.jsonl"
    pairs.write_text("".join(first_lines(PREFERENCE_TRAIN, 300)))
    overrides = [
        f"run_dir={run_dir}", "steps=3", "data.format=preference", f"data.train=[{pairs}]",
        f"data.validation=[{PREFERENCE_VALIDATION}]" if not lora else "data.validation=[]",
        f"data.tokenizer={TOKENIZER}",
        "data.seq_len=192",
        "data.batch_size=2", "dpo={beta: 0.5}", "model_overrides={num_hidden_layers: 2, layer_types: [mamba, "
        "attention], mamba_chunk_size: 32}", "optimizer={lr: 3.0e-3, schedule: constant, warmup_steps: 0}",
        "checkpoint.every_steps=3", "checkpoint.async_save=false", "log_every=1", "eval_every=3", "eval_batches=1"]
    if lora:
        overrides.append("lora={rank: 4, alpha: 8}")
    losses = train(load_run_config(None, overrides))
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(2.0), abs=1e-5)  # the first step's policy is the reference
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # policy = reference: no margin (to float rounding: the adapters' zero product is added in another fusion)
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert all(0.0 <= r["reward_accuracy"] <= 1.0 and r["pairs"] >= 2 for r in records)
    assert any(abs(r["reward_margin"]) > 1e-3 for r in records[1:])  # the policy moved away from the reference
    out = capsys.readouterr().out
    assert "preference pairs" in out and "reward acc " in out
    assert lora or re.search(r"eval step 3: loss [0-9.]+ \| reward acc [0-9.]+ chosen", out)
