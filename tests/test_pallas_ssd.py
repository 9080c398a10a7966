"""The Pallas SSD kernels (`ssd_impl: pallas`, interpret mode on CPU) against the chunked SSD and the
token-by-token recurrence: outputs, final states, the row's decay and every gradient, on the document layouts
that break SSD implementations; their lowering to Triton for CUDA; the model with them equal to the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from granite_jax import GraniteForCausalLM, load_preset
from granite_jax.config import ConfigError
from granite_jax.model import mamba, pallas_ssd, ssd
from tests.test_ssd import _inputs

T = 150  # ten kernel chunks of 16, the last one padded


def _segments(*rows):
    """Rows of segment ids from runs of (id, length); the rest of the row is padding (id 0)."""
    out = []
    for runs in rows:
        ids = np.concatenate([np.full(n, i) for i, n in runs])
        out.append(np.pad(ids, (0, T - len(ids))))
    return jnp.asarray(np.stack(out), jnp.int32)


# Boundaries at the kernel's chunk edge (64) and one token either side, documents shorter than a chunk or of
# one token, reused ids (a document starts wherever the id changes, not where a new id appears), padding.
LAYOUTS = {
    "one_document": None,
    "at_chunk_edges": _segments([(1, 64), (2, 64), (3, 22)], [(1, 63), (2, 2), (3, 85)]),
    "tiny_documents": _segments([(1, 1), (2, 2), (3, 3), (4, 1), (5, 100)], [(i % 7 + 1, 1) for i in range(T)]),
    "reused_ids_and_padding": _segments([(1, 20), (2, 30), (1, 40), (2, 10)], [(1, 65), (2, 50)]),
}


def _chunked(inputs, segment_ids, state):
    return ssd.ssd_chunked(**inputs, segment_ids=segment_ids, initial_state=state, return_decay=True, chunk_size=16)


def _kernel(inputs, segment_ids, state):
    return pallas_ssd.ssd_pallas(**inputs, segment_ids=segment_ids, initial_state=state, return_decay=True,
                                 chunk_size=16)


def _reference(inputs, segment_ids, state):
    y, final = ssd.ssd_reference(**inputs, segment_ids=segment_ids, initial_state=state)
    return y, final, _chunked(inputs, segment_ids, state)[2]  # the oracle has no decay output


def _loss_and_gradients(fn):
    """(inputs, segment_ids, state, cotangents) -> (loss, (d_inputs, d_state)) of the outputs against cotangents."""
    def loss(inputs, segment_ids, state, cotangents):
        return sum(jnp.sum(out * ct) for out, ct in zip(fn(inputs, segment_ids, state), cotangents))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))


# The three implementations as (inputs, segment_ids, state) -> (y, final state, decay), compiled once per module
# for every layout and state (one trace for a row without segment ids, one for the rest).
FORWARD = {name: jax.jit(fn) for name, fn in (("chunked", _chunked), ("pallas", _kernel), ("reference", _reference))}
GRADIENTS = {name: _loss_and_gradients(fn)
             for name, fn in (("chunked", _chunked), ("pallas", _kernel), ("reference", _reference))}


def _relative_error(got, want) -> float:
    return float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_pallas_ssd_equals_chunked_and_reference(layout, with_initial_state):
    inputs, state0 = _inputs(0, T=T, H=4, P=24, G=2, N=6)  # three blocks of 8 channels per head
    state = state0 if with_initial_state else jnp.zeros_like(state0)
    segment_ids = LAYOUTS[layout]
    outputs = {name: fn(inputs, segment_ids, state) for name, fn in FORWARD.items()}
    for want in ("chunked", "reference"):
        for got, expected in zip(outputs["pallas"], outputs[want]):
            assert _relative_error(got, expected) < 1e-5, (want, layout)

    rng = np.random.default_rng(1)
    cotangents = [jnp.asarray(rng.normal(size=o.shape), jnp.float32) for o in outputs["chunked"]]
    _, (d_inputs, d_state) = GRADIENTS["pallas"](inputs, segment_ids, state, cotangents)
    for want in ("chunked", "reference"):
        _, (want_inputs, want_state) = GRADIENTS[want](inputs, segment_ids, state, cotangents)
        for name in inputs:
            assert _relative_error(d_inputs[name], want_inputs[name]) < 2e-5, (want, name)
        assert _relative_error(d_state, want_state) < 2e-5, want


_pallas_jit = jax.jit(lambda inputs, seg, state: pallas_ssd.ssd_pallas(**inputs, segment_ids=seg, initial_state=state))
_reference_jit = jax.jit(lambda inputs, seg, state: ssd.ssd_reference(**inputs, segment_ids=seg, initial_state=state))


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_pallas_ssd_on_random_partitions(lengths, seed):
    """Random document lengths (one row; the shape is fixed, so one compile): outputs and final state equal
    the token-by-token recurrence. (1e-4: these inputs decay up to e^-7 per token, so a chunk's cumulative
    log-decay reaches -450 and float32 differences of it lose ~3e-5; the XLA path at chunk 64 does the same.)"""
    inputs, state = _inputs(seed, b=1, T=T, H=4, P=8, G=1, N=6)
    ids = np.repeat(np.arange(1, len(lengths) + 1), lengths)[:T]
    seg = jnp.asarray(np.pad(ids, (0, T - len(ids)))[None], jnp.int32)  # cut at T, or padded to it
    for got, want in zip(_pallas_jit(inputs, seg, state), _reference_jit(inputs, seg, state)):
        assert _relative_error(got, want) < 1e-4


def test_pallas_ssd_lowers_to_triton_for_cuda():
    """Forward and backward kernels, in bf16 with Granite's head sizes (P 64, N 128, one B/C group), lower to
    Triton kernels for CUDA (exported without a GPU; Triton compiling them to PTX is not tested here)."""
    b, L, H, P, G, N = 2, 200, 4, 64, 1, 128

    def loss(x, dt, A, B, C, seg, state):
        y, final = pallas_ssd.ssd_pallas(x, dt, A, B, C, segment_ids=seg, initial_state=state, interpret=False)
        return jnp.sum(y) + jnp.sum(final)

    bf16, f32 = jnp.bfloat16, jnp.float32
    shapes = [((b, L, H, P), bf16), ((b, L, H), f32), ((H,), f32), ((b, L, G, N), bf16), ((b, L, G, N), bf16),
              ((b, L), jnp.int32), ((b, H, P, N), f32)]
    exported = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 6))), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    module = exported.mlir_module()
    assert module.count("xla.gpu.triton") == 2  # the forward (rerun for the residuals) and the backward
    assert 'name = "ssd_forward"' in module and 'name = "ssd_backward"' in module


def _tiny_mamba(**overrides):
    """One Mamba layer of the tiny hybrid MoE (what an SSD implementation changes)."""
    return load_preset("tiny-hybrid-moe").replace(num_hidden_layers=1, layer_types=("mamba",), moe_impl="tiled",
                                                  **overrides)


@pytest.mark.slow
def test_the_model_with_the_pallas_ssd_in_subpieces_equals_the_xla_ssd(subpiece_tokens=32):
    """`ssd_impl: pallas` in a Mamba layer of the tiny hybrid model, in sub-pieces: logits and every parameter
    gradient of a packed batch equal the XLA SSD's. (Whole rows: tests/multidevice/pallas_ssd_mesh.py, on
    meshes.)"""
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 1000, (2, 96)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 30 + [2] * 1 + [3] * 65, [1] * 96], jnp.int32)

    def loss(model):
        out = model(ids, segment_ids)
        return jnp.mean(jax.nn.logsumexp(out.logits, axis=-1) - out.logits[..., 0]), out.logits

    results = {}
    for impl in ("xla", "pallas"):
        model = GraniteForCausalLM(_tiny_mamba(ssd_impl=impl, subpiece_tokens=subpiece_tokens), rngs=nnx.Rngs(3))
        (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        results[impl] = logits, jax.tree.leaves(grads)
    np.testing.assert_allclose(results["pallas"][0], results["xla"][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results["pallas"][1], results["xla"][1]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_pallas_ssd_is_refused_on_tpu_and_unknown_impls_are_errors(monkeypatch):
    with pytest.raises(ConfigError, match="ssd_impl='triton' is not one of"):
        _tiny_mamba(ssd_impl="triton")
    monkeypatch.setattr(mamba, "target_platform", lambda: "tpu")
    model = GraniteForCausalLM(_tiny_mamba(ssd_impl="pallas"), rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="use ssd_impl='xla' on TPU"):
        model(jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), jnp.int32))
