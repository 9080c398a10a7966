"""Pretraining: run config, data pipeline invariants, exact resume after SIGKILL / SIGTERM, error paths."""

import gzip
import json
import os
import re
import time

import numpy as np
import pytest
from conftest import (
    KJV_VALIDATION,
    ROOT,
    SIGKILL,
    SIGTERM,
    TINY_MODEL,
    TINY_RUN,
    checkpoint_steps,
    convert_cli,
    copy_of_run,
    forward,
    metrics,
    tiny_config,
    train_cli,
    train_process,
    train_tiny,
)

from granite_jax.data.pipeline import pretraining_dataset
from granite_jax.data.sources import DataError, load_documents
from granite_jax.train.config import RunConfigError, load_run_config


class DigitTokenizer:
    """Test tokenizer: a document "5 6 7" is the ids [5, 6, 7]."""
    vocab_size, eos_id, pad_id = 1000, 1, 0

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


# ------------------------------------------------------------------------------------------- config
def test_yaml_and_overrides():
    config = load_run_config(os.path.join(ROOT, "configs/pretrain-tiny.yaml"),
                             ["steps=7", "optimizer.lr=1e-4", "data.batch_size=3", "init_from=hf:/x"])
    assert (config.steps, config.optimizer.lr, config.data.batch_size, config.init_from) == (7, 1e-4, 3, "hf:/x")
    assert config.model == "tiny-hybrid-moe"


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml")))
def test_every_bundled_run_config_validates(name):
    """Each demo config under configs/ loads and validates as shipped (sft-hf.yaml with its init_from given,
    as its header says to); a field renamed in RunConfig would otherwise break a demo silently."""
    overrides = ["init_from=hf:/checkpoints/granite-4.0-h-tiny"] if name == "sft-hf.yaml" else []
    config = load_run_config(os.path.join(ROOT, "configs", name), overrides)
    assert config.run_dir == f"runs/{name.removesuffix('.yaml')}"


@pytest.mark.parametrize("override, message", [
    (["stepz=3"], r"unknown config key 'stepz'"),
    (["optimizer.lrr=3"], r"unknown config key 'optimizer.lrr'"),
    (["steps=abc"], r"steps='abc' has type str; expected int"),
    (["data.train=file.jsonl"], r"data.train='file.jsonl' must be a list"),
    (["steps"], r"override 'steps' is not of the form key=value"),
    (["steps=0"], r"steps=0 must be positive"),
    (["optimizer.schedule=linear"], r"optimizer.schedule='linear'"),
    (["init_from=/some/dir"], r"init_from='/some/dir': expected 'hf:DIRECTORY'"),
    # values that would train silently wrong, or crash later with a raw traceback
    (["optimizer.lr=-1e-3"], r"optimizer.lr=-0.001 is outside \[0.0, inf\)"),
    (["optimizer.warmup_steps=-1"], r"optimizer.warmup_steps=-1 is outside \[0, inf\)"),
    (["optimizer.min_lr_ratio=1.5"], r"optimizer.min_lr_ratio=1.5 is outside \[0.0, 1.0\]"),
    (["optimizer.clip_norm=0"], r"optimizer.clip_norm=0.0 is outside \(0.0, inf\)"),
    (["optimizer.b1=1"], r"optimizer.b1=1.0 is outside \[0.0, 1.0\)"),
    (["optimizer.b2=-0.1"], r"optimizer.b2=-0.1 is outside \[0.0, 1.0\)"),
    (["optimizer.eps=0"], r"optimizer.eps=0.0 is outside \(0.0, inf\)"),
    (["optimizer.weight_decay=-0.1"], r"optimizer.weight_decay=-0.1 is outside"),
    (["optimizer.decay_fraction=1.5"], r"optimizer.decay_fraction=1.5 is outside \(0.0, 1.0\]"),
    (["z_loss=-1"], r"z_loss=-1.0 is outside"),
    (["eval_batches=0"], r"eval_batches=0 is outside \[1, inf\)"),
    (["data.streams=-1"], r"data.streams=-1 must be positive"),
    (["model_overrides={remat_polcy: full}"], r"model_overrides has unknown model config keys \['remat_polcy'\]"),
    (["model_overrides={num_hidden_layers: 2"], r"override 'model_overrides=.*': the value is not valid YAML"),
    (["data.seq_len=1000000000000"], r"data.seq_len=1,000,000,000,000 is longer than 16,777,216 tokens"),
    (["mesh={data: 2.5}"], r"mesh.data=2.5 must be a whole number of devices"),
    (["data=5", "data.seq_len=64"], r"override 'data.seq_len=64' sets a field of data, which an earlier override "
                                    r"set to 5: give one or the other"),
    (["data.seq_len=64", "data=5"], r"data must be a mapping of its fields, got 5"),  # the later override wins
    (["init_from=hf:/tmp", "init_verify={public_key: [a]}"], r"init_verify.public_key=\['a'\]: expected a string"),
    (["init_from=hf:/tmp", "init_verify={certificate_chain: {a: 1}}"],
     r"init_verify.certificate_chain={'a': 1}: expected a path or a list of paths"),
])
def test_bad_config_is_reported(override, message):
    with pytest.raises(RunConfigError, match=message):
        load_run_config(None, override)


def test_overrides_may_follow_the_flags():
    """`steps=3 --restart optimizer.lr=-1`: the override after the flag is read (argparse alone would refuse it as
    an unrecognised argument); its bad value is the error."""
    assert "optimizer.lr=-1.0 is outside" in train_cli("steps=3", "--restart", "optimizer.lr=-1").error_line()


def test_a_nested_layer_kind_and_a_file_as_run_dir_are_error_lines(tmp_path):
    assert "layer_types[0]=['mamba'] is not a known layer kind" in train_cli(
        *TINY_RUN, f"run_dir={tmp_path}/run", "model_overrides={layer_types: [[mamba]]}").error_line()
    (tmp_path / "file").write_text("")
    assert f"run_dir '{tmp_path}/file' is a file, not a directory" in train_cli(
        *TINY_RUN, f"run_dir={tmp_path}/file").error_line()


# --------------------------------------------------------------------------------------------- data
def _docs(lengths):
    """Document i holds the ids 10*(i+1)*100 + j: distinct per document, so a token names its document."""
    return [" ".join(str(1000 * (i + 1) + j) for j in range(n)) for i, n in enumerate(lengths)]


def test_packed_targets_stay_in_their_document_and_every_token_is_seen_once():
    lengths = [5, 40, 1, 17, 64, 3, 90, 12]
    docs = _docs(lengths)
    tokenizer = DigitTokenizer()
    ds = pretraining_dataset(docs, tokenizer, vocab_size=10**6, seq_len=32, batch_size=1, seed=3, num_epochs=1)
    seen = []
    for batch in ds:
        ids, seg, tgt, w = (batch[k][0] for k in ("input_ids", "segment_ids", "targets", "loss_weights"))
        seen += [int(t) for t, s in zip(ids, seg) if s > 0]
        for i in np.nonzero(w)[0]:
            assert seg[i] > 0 and seg[i + 1] == seg[i] and tgt[i] == ids[i + 1]
            if tgt[i] != tokenizer.eos_id:  # a target comes from the same document as its input
                assert tgt[i] // 1000 == ids[i] // 1000
        positions = batch["positions"][0]
        for i in range(1, 32):  # positions restart at every segment start
            if seg[i] > 0:
                assert positions[i] == (positions[i - 1] + 1 if seg[i] == seg[i - 1] else 0)
    expected = [int(t) for d in docs for t in d.split()] + [tokenizer.eos_id] * len(docs)
    assert sorted(seen) == sorted(expected)  # each token exactly once in the epoch (batch 1: no remainder)


def test_shuffle_changes_between_epochs_and_is_seeded():
    docs = _docs([8] * 6)
    first = lambda seed: [tuple(b["input_ids"][0]) for b in pretraining_dataset(  # noqa: E731
        docs, DigitTokenizer(), vocab_size=10**6, seq_len=9, batch_size=1, seed=seed, num_epochs=2)]
    a = first(0)
    assert a == first(0) and a != first(1)
    assert a[:6] != a[6:12]  # the second epoch is in another order


def test_token_ids_outside_the_vocabulary():
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        next(iter(pretraining_dataset(["5 6 7000"], DigitTokenizer(), vocab_size=6000, seq_len=8, batch_size=1,
                                      seed=0)))
    with pytest.raises(DataError, match="tokenizer has 1000 tokens but the model's vocab_size is 500"):
        pretraining_dataset(["5"], DigitTokenizer(), vocab_size=500, seq_len=8, batch_size=1, seed=0)


def test_missing_empty_and_malformed_data(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents([str(tmp_path / "nope.jsonl")])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty corpus"):
        load_documents([str(tmp_path / "empty.jsonl")])
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as f:
        f.write('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl.gz:2: not valid JSON"):
        load_documents([str(tmp_path / "bad.jsonl.gz")])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="unknown format"):
        load_documents([str(tmp_path / "x.csv")])


# ----------------------------------------------------------------------------------- runs & resume
# The resume family: 8 steps of the tiny run, checkpoints every 4; each interrupted run must repeat these losses.
RESUMED = "steps=8"


@pytest.mark.slow
def test_a_lora_run_sigkilled_then_resumed_repeats_the_losses_bit_for_bit(tmp_path, reference_losses):
    """LoRA with dropout: the checkpoints hold the adapters and their AdamW moments (the base is read again from
    the run's init, here the preset and seed); killed once checkpoint 4 is complete and resumed, the run repeats
    the uninterrupted one's losses exactly."""
    lora = [RESUMED, "lora={rank: 4, alpha: 8, dropout: 0.1, targets: [q_proj, v_proj, in_proj, out_proj]}"]
    killed = train_process(tmp_path, *lora, signal_at=(4, "after", SIGKILL))
    assert killed.returncode == -SIGKILL and checkpoint_steps(tmp_path)[-1] < 8
    out = train_tiny(tmp_path, *lora).stdout
    assert "resumed from" in out and "LoRA adapters" in out, out
    straight, _ = reference_losses(*lora)
    assert len(straight) == 8 and len(set(straight)) > 1
    assert metrics(tmp_path) == straight  # exact float equality, every step
    _assert_lora_run_reads_back(tmp_path, tiny_config(f"run_dir={tmp_path}", *lora))


def _assert_lora_run_reads_back(run_dir, config):
    """A LoRA run's checkpoints hold adapters only; read back (eval.py, export, init_from=run:), the base is the
    run's init again (here the preset initialised from the run's seed), as training made it, with the trained
    adapters on it; read back merged, the kernels are the adapters folded in."""
    import numpy as np
    from flax import nnx

    from granite_jax.model.lora import has_lora, merge_lora
    from granite_jax.sources import RunDirectory
    from granite_jax.train.setup import initial_model
    from granite_jax.tree import path_names

    model, _, step = RunDirectory(str(run_dir)).load_with_run(merge=False)
    assert step == config.steps and has_lora(model)
    base = {".".join(path_names(p)): v for p, v in nnx.to_flat_state(nnx.state(initial_model(config), nnx.Param))}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(path_names(path))
        if isinstance(variable, nnx.LoRAParam):
            assert name.endswith(("lora_a", "lora_b")) and np.any(variable[...]), name  # B trained away from 0
        else:
            np.testing.assert_array_equal(np.asarray(variable[...]), np.asarray(base[name][...]), err_msg=name)
    merged = RunDirectory(str(run_dir)).load()
    assert not has_lora(merged)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(merged, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(merge_lora(model), nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=".".join(path_names(path)))


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tmp_path, reference_losses):
    stopped = train_process(tmp_path, RESUMED, signal_at=(4, "after", SIGTERM))
    assert stopped.returncode == 128 + SIGTERM and "received signal 15: saved step" in stopped.output, stopped.output
    saved = checkpoint_steps(tmp_path)[-1]
    assert 4 <= saved < 8 and f"saved step {saved}" in stopped.output  # the step it stopped after
    train_tiny(tmp_path, RESUMED)
    assert metrics(tmp_path) == reference_losses(RESUMED)[0]


@pytest.mark.slow
def test_sigterm_during_an_evaluation_saves_without_finishing_it(tmp_path):
    """A signal that lands in an in-loop evaluation of 5,000 batches stops it at the next batch: the checkpoint
    is saved within a scheduler's grace period (Kubernetes: 30 s), not after every batch."""
    started = time.monotonic()
    stopped = train_process(tmp_path, "steps=4", "checkpoint.every_steps=2", "checkpoint.async_save=false",
                            "eval_every=2", "eval_batches=5000", f"data.validation=[{KJV_VALIDATION}]",
                            signal_at=(2, "after", SIGTERM))
    assert stopped.returncode == 128 + SIGTERM, stopped.output
    assert re.search(r"eval step 2: stopped after \d+ of 5000 batches by the signal", stopped.output), stopped.output
    assert "saved step 2" in stopped.output and checkpoint_steps(tmp_path) == [2]
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_corrupted_latest_checkpoint_falls_back(tmp_path, reference_losses):
    """The newest checkpoint truncated: the resume falls back to the one before with one warning line (no Orbax
    traceback), moves the unreadable one to corrupt/, saves its step again when it gets there, and repeats the
    uninterrupted run's losses."""
    reference, reference_dir = reference_losses(RESUMED)
    copy_of_run(reference_dir, tmp_path)
    with open(tmp_path / "metrics.jsonl") as f:  # the steps after checkpoint 4 must be trained again
        kept = [line for line in f if json.loads(line)["step"] <= 4]
    (tmp_path / "metrics.jsonl").write_text("".join(kept))
    newest = checkpoint_steps(tmp_path)[-1]
    assert newest == 8
    state_dir = os.path.join(tmp_path, "checkpoints", str(newest), "state")
    for name in os.listdir(state_dir):  # truncate every file of the newest checkpoint's state
        path = os.path.join(state_dir, name)
        if os.path.isfile(path):
            open(path, "w").close()
    out = train_tiny(tmp_path, RESUMED).output
    assert "resumed from" in out and out.count("could not be restored") == 1
    assert "Traceback" not in out and len(out.splitlines()) < 30, out
    assert os.listdir(os.path.join(tmp_path, "corrupt")) == [str(newest)]
    assert newest in checkpoint_steps(tmp_path)  # saved again
    assert metrics(tmp_path) == reference


@pytest.mark.slow
def test_killed_during_an_asynchronous_save_resumes_from_the_previous_checkpoint_bit_for_bit(
        tmp_path, reference_losses):
    """SIGKILL while checkpoint 8 is being written: the resume starts from checkpoint 4, without a spurious Orbax
    warning, and repeats the uninterrupted run's losses exactly, every step."""
    killed = train_process(tmp_path, RESUMED, signal_at=(8, "before", SIGKILL))
    assert killed.returncode == -SIGKILL, killed.stdout
    assert checkpoint_steps(tmp_path) == [4]  # 8 was being written: only its temporary directory exists
    assert any("tmp" in name for name in os.listdir(os.path.join(tmp_path, "checkpoints")))
    out = train_tiny(tmp_path, RESUMED).output
    assert f"resumed from {os.path.join(tmp_path, 'checkpoints')}/4" in out
    # no spurious Orbax warning on resume (its notice that it removes the half-written step 8 is expected)
    warnings = [line for line in out.splitlines() if "absl" in line and "8.orbax-checkpoint-tmp which already exists"
                not in line]
    assert warnings == [], out
    reference, _ = reference_losses(RESUMED)
    assert len(reference) == 8
    assert metrics(tmp_path) == reference  # exact float equality, every step


def test_checkpoint_of_another_model_shape_is_refused(tmp_path, reference_losses):
    copy_of_run(reference_losses(RESUMED)[1], tmp_path)
    other = TINY_MODEL.replace("}", ", shared_intermediate_size: 128}")
    error = train_cli(f"run_dir={tmp_path}", *TINY_RUN, other, "steps=8").error_line()
    assert "does not fit this model" in error and "shared_mlp" in error, error


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_message(tmp_path):
    proc = train_cli(f"run_dir={tmp_path}", *TINY_RUN, "steps=10", "optimizer.lr=1e30", "optimizer.warmup_steps=0")
    assert "loss is nan at step 2; stopping" in proc.error_line()


def test_missing_data_path_is_reported_by_train(tmp_path):
    proc = train_cli(f"run_dir={tmp_path}", *TINY_RUN, "steps=2", f"data.train=[{tmp_path}/missing.jsonl]")
    assert "missing.jsonl' does not exist" in proc.error_line()


@pytest.mark.parametrize("impl", ["recompute", "fused"])
@pytest.mark.parametrize("chunk", [1, 6, 64, 10_000])
def test_chunked_cross_entropy_equals_the_whole_batch_loss(chunk, impl):
    """Any chunk size (one token, uneven, whole rows, more than the batch) gives the loss of logits built for
    the whole batch at once, and the same gradients for the hidden states and the head, by either
    implementation (the gradient recomputed in the backward pass, or computed in the forward: `fused`)."""
    import jax
    import jax.numpy as jnp

    from granite_jax.model.head import chunked_cross_entropy

    rng = np.random.default_rng(0)
    B, T, H, V = 2, 13, 8, 11
    hidden = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(V, H)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, size=(B, T)))
    weights = jnp.asarray(rng.integers(0, 2, size=(B, T)), jnp.float32)

    def whole(hidden, head):
        logits = hidden @ head.T / 2.5
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(weights * (lse - target)) + 0.1 * jnp.sum(weights * lse**2)

    def chunked(hidden, head):
        objective, _, _ = chunked_cross_entropy(hidden, head, targets, weights, chunk=chunk, logits_scaling=2.5,
                                                z_coef=0.1, impl=impl)
        return 3.0 * objective  # a cotangent other than 1 reaches the fused gradient

    objective, ce, z = chunked_cross_entropy(hidden, head, targets, weights, chunk=chunk, logits_scaling=2.5,
                                             z_coef=0.1, impl=impl)
    np.testing.assert_allclose(objective, ce + 0.1 * z, rtol=1e-6)
    np.testing.assert_allclose(chunked(hidden, head), 3.0 * whole(hidden, head), rtol=1e-5)
    for got, want in zip(jax.grad(chunked, (0, 1))(hidden, head), jax.grad(whole, (0, 1))(hidden, head)):
        np.testing.assert_allclose(got, 3.0 * want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl, head_matmuls", [("recompute", 4), ("fused", 3)])
def test_the_fused_head_loss_costs_three_head_matmuls_not_four(impl, head_matmuls):
    """The compiled value and gradient of the chunked head loss multiply by the head four times per token with
    the recomputing chunks (logits, logits again, ∂hidden, ∂head) and three with `fused`, whose gradient is
    computed while the logits exist."""
    import jax
    import jax.numpy as jnp

    from granite_jax.hlo import executed_matmul_flops
    from granite_jax.model.head import chunked_cross_entropy

    B, T, H, V = 2, 64, 32, 512
    hidden, head = jnp.ones((B, T, H), jnp.float32), jnp.ones((V, H), jnp.float32)
    targets, weights = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.float32)

    def loss(hidden, head):
        return chunked_cross_entropy(hidden, head, targets, weights, chunk=32, z_coef=1e-4, impl=impl)[0]

    compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(hidden, head).compile()  # as the train step
    flops, _ = executed_matmul_flops(compiled.as_text())
    one_matmul = 2 * B * T * H * V
    assert flops == head_matmuls * one_matmul, flops / one_matmul


def test_weight_decay_skips_norms_biases_and_ssm_constants():
    from flax import nnx

    from granite_jax import GraniteForCausalLM, load_preset
    from granite_jax.train.optim import decay_mask

    model = GraniteForCausalLM(load_preset("tiny-hybrid-moe").replace(mamba_proj_bias=True), rngs=nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)
    mask = {".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): v
            for path, v in __import__("jax").tree_util.tree_leaves_with_path(decay_mask(params))}
    mamba = "model.layers.0.mamba"
    assert mask[f"{mamba}.in_proj.kernel.value"] and mask["model.embed_tokens.value"]
    for name in ("A_log", "D", "dt_bias", "in_proj.bias", "norm.weight", "conv1d.bias"):
        assert not mask[f"{mamba}.{name}.value"], name
    assert not mask["model.layers.0.input_layernorm.weight.value"]


def test_schedules():
    from granite_jax.train.config import OptimizerConfig
    from granite_jax.train.optim import learning_rate_schedule

    wsd = learning_rate_schedule(OptimizerConfig(lr=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2,
                                                 min_lr_ratio=0.1), 110)
    assert float(wsd(0)) == 0.0 and float(wsd(10)) == 1.0 and float(wsd(85)) == 1.0
    assert float(wsd(110)) == pytest.approx(0.1)
    cosine = learning_rate_schedule(OptimizerConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), 110)
    assert float(cosine(10)) == 1.0
    assert float(cosine(60)) == pytest.approx(0.55) and float(cosine(110)) == pytest.approx(0.1)


@pytest.mark.slow
def test_init_from_an_imported_run_matches_init_from_hf(tmp_path):
    """Continued pretraining starts from the converted weights: with `init_from=hf:` step 1's loss does not
    depend on the run's seed, and `convert import` then `init_from=run:` starts from the same weights (the first
    step's loss is identical); training in the imported directory itself is refused (no optimizer state)."""
    import jax.numpy as jnp
    from flax import nnx

    from granite_jax import GraniteForCausalLM, load_preset, save_hf_checkpoint
    from granite_jax.train.checkpoint import RunCheckpoints
    from granite_jax.train.loop import _check_resumable

    config = load_preset("tiny-hybrid-moe").replace(num_hidden_layers=2, layer_types=("mamba", "attention"))
    save_hf_checkpoint(GraniteForCausalLM(config, rngs=nnx.Rngs(42)), tmp_path / "hf")
    assert convert_cli("import", tmp_path / "hf", tmp_path / "imported").returncode == 0
    first_losses = []
    for name, source, seed in (("hf0", f"hf:{tmp_path / 'hf'}", 0), ("hf1", f"hf:{tmp_path / 'hf'}", 1),
                               ("run", f"run:{tmp_path / 'imported'}", 0)):
        train_tiny(tmp_path / name, "steps=1", f"seed={seed}", f"init_from={source}", "model_overrides={}")
        first_losses.append(metrics(tmp_path / name)[0])
    assert first_losses[0] == first_losses[1] == first_losses[2] and jnp.isfinite(first_losses[0])

    run_config = load_run_config(os.path.join(ROOT, "configs/pretrain-tiny.yaml"),
                                 [f"run_dir={tmp_path / 'imported'}"])
    checkpoints = RunCheckpoints(str(tmp_path / "imported"), keep=1, async_save=False)
    with pytest.raises(RunConfigError, match="imported from .*parameters only.*init_from=run:"):
        _check_resumable(checkpoints, run_config)
    checkpoints.close()


def test_parquet_and_text_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["first doc", None, "second doc"]}), tmp_path / "d.parquet")
    assert load_documents([str(tmp_path / "d.parquet")], text_field="content", bad_lines="skip") == [
        "first doc", "second doc"]
    with pytest.raises(DataError, match=r"d.parquet:row 1: 'content' is null"):  # as a JSONL line without text
        load_documents([str(tmp_path / "d.parquet")], text_field="content")
    pq.write_table(pa.table({"content": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"column 'content' holds int64, not text"):
        load_documents([str(tmp_path / "ints.parquet")], text_field="content")
    (tmp_path / "d.txt").write_text("para one\nline two\n\n\npara two\n")
    assert load_documents([str(tmp_path / "d.txt")]) == ["para one\nline two", "para two"]


def test_pretokenized_arrayrecord_gives_the_same_batches(tmp_path):
    from granite_jax.data.pretokenize import pretokenize
    from granite_jax.data.tokenizer import load_tokenizer

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["In the beginning", "God said", "light"] * 4))
    tokenizer_path = os.path.join(ROOT, "data/tokenizer")
    assert pretokenize([str(jsonl)], tokenizer_path, str(tmp_path / "docs.arrayrecord")) == 12
    tokenizer = load_tokenizer(tokenizer_path)
    batches = lambda docs: [b["input_ids"].tolist() for b in pretraining_dataset(  # noqa: E731
        docs, tokenizer, vocab_size=4096, seq_len=16, batch_size=1, seed=0, num_epochs=1)]
    from_text = batches(load_documents([str(jsonl)]))
    assert batches(load_documents([str(tmp_path / "docs.arrayrecord")])) == from_text and len(from_text) > 1


def test_export_run_to_transformers(tmp_path, reference_losses):
    """A run's checkpoint → `python -m granite_jax.convert export` → transformers gives our logits."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from granite_jax.sources import RunDirectory

    run_dir = str(reference_losses(RESUMED)[1])
    proc = convert_cli("export", run_dir, tmp_path / "hf").ok()
    assert "exported step 8" in proc.stdout
    ours, _, step = RunDirectory(run_dir).load_with_run()
    ids = np.random.default_rng(0).integers(0, 4096, (1, 40))
    expected = np.asarray(forward(ours, jnp.asarray(ids)).logits)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        actual = hf(torch.tensor(ids), use_cache=False).logits.numpy()
    assert step == 8 and np.max(np.abs(actual - expected)) <= 1e-4 * np.max(np.abs(expected))
    assert "nope' does not exist" in convert_cli("export", tmp_path / "nope", "x").error_line()


def test_gradient_accumulation_averages_micro_steps():
    """grad_accum_steps=2: two micro-steps update the parameters once, with the mean of their gradients."""
    import jax.numpy as jnp
    import optax

    from granite_jax.train.config import OptimizerConfig
    from granite_jax.train.optim import make_optimizer

    params = {"w": jnp.ones((3, 2))}
    g1, g2 = {"w": jnp.full((3, 2), 0.3)}, {"w": jnp.full((3, 2), -0.1)}
    accumulate = make_optimizer(OptimizerConfig(grad_accum_steps=2, warmup_steps=0, schedule="constant"), 10)
    state = accumulate.init(params)
    updates, state = accumulate.update(g1, state, params)
    assert float(jnp.abs(updates["w"]).max()) == 0.0  # no update after the first micro-step
    updates, state = accumulate.update(g2, state, params)
    single = make_optimizer(OptimizerConfig(warmup_steps=0, schedule="constant"), 10)
    expected, _ = single.update({"w": (g1["w"] + g2["w"]) / 2}, single.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"],
                               optax.apply_updates(params, expected)["w"], rtol=1e-6)


@pytest.mark.slow
def test_full_remat_keeps_one_layer_of_activations_in_the_compiled_train_step():
    """The train step of a 1- and a 2-Mamba-layer stack compiled on XLA:CPU at 2K tokens: with `remat_policy:
    full` the second layer adds a few hidden-width buffers of temporaries (15.0 KB per token; 54.8 KB without
    remat, and 43 KB before the recomputation was tied to the backward pass and the gradient norm summed in
    backward order). Also: the clipping transform equals optax's."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from granite_jax import load_preset
    from granite_jax.model.granite import GraniteForCausalLM
    from granite_jax.train.config import OptimizerConfig
    from granite_jax.train.optim import make_optimizer
    from granite_jax.train.step import LanguageModeling, TrainState, make_train_step

    T = 2048
    ids = jnp.zeros((1, T), jnp.int32)
    batch = dict(input_ids=ids, segment_ids=jnp.ones((1, T), jnp.int32), positions=None, targets=ids,
                 loss_weights=jnp.ones((1, T), jnp.float32))
    per_token = {}
    few, many = 1, 2
    tx = make_optimizer(OptimizerConfig(), total_steps=10)
    step = make_train_step(tx, LanguageModeling(aux_coef=0.01, z_loss=0.0, chunk=T))
    for layers in (few, many):
        config = load_preset("tiny-hybrid-moe", num_hidden_layers=layers, layer_types=["mamba"] * layers,
                             remat_policy="full", compute_dtype="float32")
        graphdef, params = nnx.split(nnx.eval_shape(lambda c=config: GraniteForCausalLM(c, rngs=nnx.Rngs(0))),
                                     nnx.Param)
        state = TrainState(jnp.zeros((), jnp.int32), params, jax.eval_shape(tx.init, params))
        compiled = step.lower(graphdef, state, batch).compile()
        per_token[layers] = compiled.memory_analysis().temp_size_in_bytes / T
    per_layer = (per_token[many] - per_token[few]) / (many - few)
    assert per_layer < 20_000, per_token  # bytes per token for the second layer: 15.0 KB; 43 KB before

    from granite_jax.train.optim import clip_by_gradient_norm

    updates = {"a": jnp.arange(6.0).reshape(2, 3), "b": -jnp.ones(4)}
    for max_norm in (0.5, 100.0):
        ours, _ = clip_by_gradient_norm(max_norm).update(updates, None)
        theirs, _ = optax.clip_by_global_norm(max_norm).update(updates, optax.EmptyState())
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_allclose(a, b, rtol=1e-6)
