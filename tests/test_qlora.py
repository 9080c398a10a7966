"""QLoRA (`lora.quantize_base`): the frozen base stored as int8 / nf4 (qwix), dequantised on the fly: logits close to
the float model's (int8 closer than nf4), per-element round-trip bounds, real int8 / 4-bit storage sharded like
the float kernels, training that moves only the adapters (of a float LoRA run and of a QLoRA run), bit-for-bit
resume, and bad settings naming the field."""


import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from conftest import checkpoint_steps, tiny_config
from flax import nnx
from jax.sharding import AbstractMesh
from qwix._src.core.numerics import get_nf4_buckets

from granite_jax import GraniteForCausalLM, load_preset, save_hf_checkpoint
from granite_jax.model.lora import LoRALinear, apply_lora, quantize_frozen_base
from granite_jax.model.quantize import (
    NF4_BLOCK,
    QuantizedScale,
    QuantizedTensor,
    QuantizedValue,
    quantize_array,
    quantize_base,
    quantized_tensors,
    stored_bytes,
)
from granite_jax.parallel.plan import ShardingPlan, fitted_spec
from granite_jax.train.config import RunConfig, RunConfigError, apply_overrides, load_run_config
from granite_jax.tree import path_names

TINY = dict(num_hidden_layers=2, layer_types=("mamba", "attention"), mamba_chunk_size=8)
# Relative error ||logits_q - logits|| / ||logits|| of the tiny model (random N(0, 0.02) weights, 2 × 16 tokens),
# measured 2.2e-3 (int8) and 2.9e-2 (nf4) on 2026-12-03; the bounds leave about 2× room.
LOGIT_TOLERANCE = {"int8": 5e-3, "nf4": 6e-2}


def _tiny_model(seed=0, **overrides):
    return GraniteForCausalLM(load_preset("tiny-hybrid-moe").replace(**{**TINY, **overrides}), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def tiny_model():
    """`_tiny_model()`, initialised (eagerly: about a second) once for the tests that adapt or quantise a copy."""
    return _tiny_model()


def _ids(B=2, T=16, vocab=4096, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), jnp.int32)


def _relative_error(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.slow
def test_quantised_forward_is_within_the_documented_tolerance_of_the_float_one_int8_closer_than_nf4():
    """With the layer stack scanned (the quantised weights stacked per layer pattern, as on a pod). Each model is
    quantised and run in one compiled program: qwix's quantisation run eagerly, op by op, takes longer than
    compiling it with the forward."""
    overrides = dict(num_hidden_layers=4, layer_types=("mamba", "attention") * 2, scan_layers=True)
    ids = _ids()
    forward = nnx.jit(lambda model, ids: model(ids)[0])
    quantised_forward = nnx.jit(lambda model, ids, qtype: quantize_base(model, qtype)(ids)[0], static_argnums=2)
    base = _tiny_model(**overrides)  # initialised once (eagerly: slow), each quantised model a copy of it
    reference = np.asarray(forward(base, ids))
    errors = {}
    for qtype in ("int8", "nf4"):
        model = apply_lora(nnx.clone(base), rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "in_proj"],
                           rngs=nnx.Rngs(1))
        logits = np.asarray(quantised_forward(model, ids, qtype))
        errors[qtype] = _relative_error(logits, reference)
        assert 0 < errors[qtype] < LOGIT_TOLERANCE[qtype], (qtype, errors[qtype])
    assert errors["int8"] < errors["nf4"] / 4, errors


def test_dequantised_weights_are_within_the_per_element_bounds():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_t(4, (3, 4 * NF4_BLOCK, 48)) * 0.02, jnp.float32)  # heavy tails, like real weights

    # int8: one scale per (expert, output channel) = absmax / 127.5; rounding error at most half a step.
    q = quantize_array(w, "int8")
    assert q.qvalue.dtype == jnp.int8 and q.scale.shape == (3, 1, 48)
    absmax = jnp.max(jnp.abs(w), axis=1, keepdims=True)
    error = jnp.abs(w - qwix.dequantize(q))
    assert bool(jnp.all(error <= absmax / 127.5 / 2 * (1 + 1e-4)))
    assert float(jnp.max(error / absmax)) > 1e-3  # it is quantised, not a float copy

    # nf4: one scale per 64 inputs and output channel; each value rounds to the nearest of the 16 code points of
    # the block's [-absmax, absmax]: off by at most half the widest gap of the code book (0.152 · absmax).
    q = quantize_array(w, "nf4")
    assert q.qvalue.dtype == jnp.uint4 and q.scale.shape == (3, 4, 48)
    blocks = w.reshape(3, 4, NF4_BLOCK, 48)
    absmax = jnp.repeat(jnp.max(jnp.abs(blocks), axis=2), NF4_BLOCK, axis=1)
    half_gap = float(np.max(np.diff(np.asarray(get_nf4_buckets())))) / 2
    error = jnp.abs(w - qwix.dequantize(q))
    assert bool(jnp.all(error <= absmax * half_gap * (1 + 1e-4)))
    # the block's extreme values are exact (±1 are code points): the absmax scale loses nothing at the ends
    extremes = jnp.abs(w) == absmax
    assert bool(jnp.all(jnp.where(extremes, error, 0) <= 1e-7))


@pytest.mark.parametrize("qtype, bits", [("int8", 8), ("nf4", 4)])
def test_the_base_is_stored_quantised_sharded_like_the_float_kernels(tiny_model, qtype, bits):
    model = nnx.clone(tiny_model)
    float_weights = {".".join(path_names(p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj", "in_proj"], rngs=nnx.Rngs(1))
    quantize_base(model, qtype)

    quantised = {".".join(path_names(p)): m for p, m in quantized_tensors(model)}
    # Every layer projection (adapted or not) and both stacked expert weights; not the router, embeddings, conv.
    layer = {"model.layers.0.mamba.in_proj", "model.layers.0.mamba.out_proj", "model.layers.1.self_attn.q_proj",
             "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj"}
    mlp = {f"model.layers.{i}.{m}.{w}" for i in (0, 1) for m in ("shared_mlp", "block_sparse_moe")
           for w in ("input_linear", "output_linear")}
    assert set(quantised) == {n + ".kernel" for n in layer} | {n + ".kernel" for n in mlp if "shared" in n} | {
        n for n in mlp if "block_sparse" in n}
    remaining = {".".join(path_names(p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert "model.layers.0.block_sparse_moe.router.kernel" in remaining and "model.embed_tokens" in remaining
    adapted = [m for _, m in model.iter_modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 3 and all(isinstance(m.kernel, QuantizedTensor) for m in adapted)

    mesh = AbstractMesh((2, 2, 2), ("fsdp", "tensor", "expert"))
    rules = ShardingPlan().table
    stored = original = 0
    for name, tensor in quantised.items():
        weight = float_weights[name]
        assert tensor.qvalue[...].dtype == (jnp.int8 if qtype == "int8" else jnp.uint4)
        assert tensor.qvalue.shape == weight.shape
        axes = weight.get_metadata()["out_sharding"]
        assert tensor.qvalue.get_metadata()["out_sharding"] == axes == tensor.scale.get_metadata()["out_sharding"]
        weight_spec = fitted_spec(axes, weight.shape, mesh, rules)
        assert fitted_spec(axes, tensor.qvalue.shape, mesh, rules) == weight_spec  # values shard like the kernel
        scale_spec = fitted_spec(axes, tensor.scale.shape, mesh, rules)
        assert scale_spec[-1] == weight_spec[-1] and scale_spec[:-2] == weight_spec[:-2]  # by output (and expert)
        stored += stored_bytes(tensor.qvalue.shape, tensor.qvalue[...].dtype)
        original += stored_bytes(weight.shape, weight[...].dtype)
    assert stored * 32 == original * bits  # 4 (int8) / 8 (nf4) times smaller than float32
    # The quantised Variables are not Params: a run never differentiates or updates them.
    _, trained, frozen = nnx.split(model, nnx.LoRAParam, ...)
    frozen_types = {type(v) for _, v in nnx.to_flat_state(frozen)}
    assert {QuantizedValue, QuantizedScale} <= frozen_types
    assert all(n.endswith(("lora_a", "lora_b")) for n in (".".join(path_names(p)) for p, _ in
                                                            nnx.to_flat_state(trained)))


def _qlora_run(run_dir, hf_dir, quantize, **lora):
    from granite_jax.train.setup import build_run

    config = apply_overrides(RunConfig(), {
        "init_from": f"hf:{hf_dir}", "run_dir": str(run_dir), "steps": 10,
        "data": {"seq_len": 16, "batch_size": 2, "validation": []},
        "optimizer": {"warmup_steps": 0, "lr": 1e-2, "schedule": "constant"},
        "lora": {"rank": 4, "alpha": 8.0, "quantize_base": quantize, **lora}})
    return build_run(config, jax.devices()[:1])


def _batch(run, seed):
    B, T = run.batch_shape
    ids = np.random.default_rng(seed).integers(0, run.model_config.vocab_size, (B, T + 1))
    return dict(input_ids=jnp.asarray(ids[:, :-1], jnp.int32), segment_ids=jnp.ones((B, T), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
                targets=jnp.asarray(ids[:, 1:], jnp.int32), loss_weights=jnp.ones((B, T), jnp.float32))


@pytest.mark.slow
def test_lora_and_qlora_train_steps_change_only_the_adapters_and_the_nf4_loss_follows_the_float_one(tmp_path):
    """A float LoRA run and an nf4 QLoRA run from init_from=hf:DIR: only the adapters are trained (the optimizer
    holds their moments only), the frozen base is the HF checkpoint as loaded (or its nf4 storage) and stays
    bit-identical, and the nf4 run's losses stay near the float run's."""
    from granite_jax.formats import load_hf_checkpoint

    hf_dir = tmp_path / "hf"  # the base of both runs
    save_hf_checkpoint(_tiny_model(seed=42), hf_dir)
    losses = {}
    for quantize in (None, "nf4"):
        run = _qlora_run(tmp_path / str(quantize), hf_dir, quantize, dropout=0.1,
                         targets=["q_proj", "in_proj", "out_proj"])
        state = run.state
        trained = {".".join(path_names(p)): x.shape for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
        assert trained and all(n.endswith(("lora.lora_a.value", "lora.lora_b.value")) for n in trained), trained
        assert len(trained) == 2 * (1 + 2)  # A and B of q (1 attention layer) and in_proj, out_proj (1 Mamba layer)
        # The optimizer state: Adam's two moments of each adapter, nothing the size of a base weight.
        moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
        assert sorted(moments) == sorted(list(trained.values()) * 2)
        frozen_before = {".".join(path_names(p)): np.asarray(x)
                         for p, x in jax.tree_util.tree_leaves_with_path(run.frozen)}
        if quantize:
            assert any(x.dtype == jnp.uint4 for x in frozen_before.values())
        else:  # the frozen part is the HF checkpoint's weights as loaded (init_from=hf:DIR)
            loaded = nnx.state(load_hf_checkpoint(str(hf_dir), dtype="float32"), nnx.Param)
            for path, x in jax.tree_util.tree_leaves_with_path(loaded):
                np.testing.assert_array_equal(frozen_before[".".join(path_names(path))], np.asarray(x))
        params_before = {n: np.asarray(x) for n, x in zip(trained, jax.tree.leaves(state.params))}
        with run.activate():
            losses[quantize] = []
            for step in range(3):
                state, metrics = run.train_step(state, _batch(run, step))
                losses[quantize].append(float(metrics["loss"]))
        assert all(np.isfinite(losses[quantize])) and int(state.step) == 3
        after = {n: np.asarray(x) for n, x in zip(trained, jax.tree.leaves(state.params))}
        assert all(np.any(after[n] != params_before[n]) for n in trained)  # every adapter matrix moved
        frozen_after = {".".join(path_names(p)): np.asarray(x)
                        for p, x in jax.tree_util.tree_leaves_with_path(run.frozen)}
        assert frozen_after.keys() == frozen_before.keys()
        for name in frozen_before:  # bit-identical (the quantised base too)
            np.testing.assert_array_equal(frozen_after[name], frozen_before[name], err_msg=name)
        if not quantize:  # the evaluation sees the trained adapters (deterministic: no dropout)
            with run.activate():
                sums, tokens = run.eval_step(state.params, _batch(run, 0))
            assert np.isfinite(float(sums["loss"])) and float(tokens) == 2 * 16
    # Same adapters' init, dropout and data: the nf4 run's losses stay near the float LoRA run's.
    np.testing.assert_allclose(losses["nf4"], losses[None], rtol=2e-2)
    assert losses["nf4"] != losses[None]


@pytest.mark.slow
def test_a_qlora_run_resumes_with_identical_losses(tmp_path):
    """Six steps straight, then its checkpoint 6 removed and the run resumed from checkpoint 3: the base is
    re-read from the preset and quantised again, deterministically, so steps 4-6 repeat the losses bit for bit."""
    from granite_jax.train.loop import train

    config = tiny_config(f"run_dir={tmp_path}", "steps=6", "optimizer.schedule=constant",
                         "optimizer.warmup_steps=1", "checkpoint.every_steps=3", "checkpoint.async_save=false",
                         "log_every=3", "lora={rank: 4, alpha: 8, dropout: 0.2, targets: [q_proj, in_proj], "
                         "quantize_base: nf4}")
    straight = train(config)
    assert checkpoint_steps(tmp_path) == [3, 6]
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    resumed = train(config)
    assert resumed == straight[3:] and len(straight) == 6 and len(set(straight)) > 1


@pytest.mark.parametrize("overrides, message", [
    (["lora.quantize_base=int4"], "lora.quantize_base='int4' must be null, 'int8' or 'nf4'"),
    (["lora={rank: 4, quantize_base: fp8}"], "lora.quantize_base='fp8' must be null, 'int8' or 'nf4'"),
])
def test_a_bad_quantize_base_names_the_field(overrides, message):
    with pytest.raises(RunConfigError) as error:
        load_run_config(None, overrides)
    assert message in str(error.value)


def test_quantize_base_without_adapters_is_refused_and_the_setting_parses(tiny_model):
    with pytest.raises(ValueError, match=r"lora.quantize_base='int8' needs LoRA adapters"):
        quantize_frozen_base(nnx.clone(tiny_model), "int8")
    assert load_run_config(None, ["lora.quantize_base=nf4"]).lora.quantize_base == "nf4"
    assert load_run_config(None, ["lora.rank=4"]).lora.quantize_base is None
