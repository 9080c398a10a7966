"""Chunked SSD against the token-by-token recurrence: outputs, final states and gradients, with packed
documents, initial states and lengths that are not multiples of the chunk size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from granite_jax.model import ssd
from granite_jax.model.documents import document_runs
from granite_jax.model.mamba import causal_depthwise_conv
from granite_jax.model.ssd import ssd_decode_step

# Compiled once per shape: eager dispatch of the many small ops is what would make these tests slow.
ssd_reference = jax.jit(ssd.ssd_reference)
ssd_chunked = jax.jit(ssd.ssd_chunked, static_argnames="chunk_size")


def _inputs(seed, b=2, T=37, H=4, P=8, G=2, N=6):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return dict(
        x=f32(b, T, H, P),
        dt=jax.nn.softplus(f32(b, T, H)),
        A=-jnp.exp(f32(H)),
        B=f32(b, T, G, N),
        C=f32(b, T, G, N),
    ), f32(b, H, P, N)


def _segments_from_lengths(lengths_per_row, T):
    rows = []
    for lengths in lengths_per_row:
        ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[:T]
        rows.append(np.pad(ids, (0, T - len(ids))))  # trailing padding = segment 0
    return jnp.asarray(np.stack(rows), jnp.int32)


def _assert_close(actual, expected, tol):
    scale = float(jnp.max(jnp.abs(expected))) + 1e-6
    assert float(jnp.max(jnp.abs(actual - expected))) <= tol * scale


# Documents ending exactly at chunk boundaries (8, 16), length-1 documents, and a tail with padding.
SEGMENT_CASES = {
    "none": None,
    "boundaries_and_singletons": [[8, 8, 1, 1, 5, 14], [3, 1, 20, 13]],
    "one_token_each": [[1] * 37, [37]],
}


@pytest.mark.parametrize("chunk", [4, 8, 16, 64])
@pytest.mark.parametrize("segments", sorted(SEGMENT_CASES))
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_matches_reference(chunk, segments, with_initial_state):
    inputs, state0 = _inputs(0)
    lengths = SEGMENT_CASES[segments]
    seg = None if lengths is None else _segments_from_lengths(lengths, 37)
    init = state0 if with_initial_state else None
    y_ref, final_ref = ssd_reference(**inputs, segment_ids=seg, initial_state=init)
    y, final = ssd_chunked(**inputs, chunk_size=chunk, segment_ids=seg, initial_state=init)
    _assert_close(y, y_ref, 1e-5)
    _assert_close(final, final_ref, 1e-5)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(
    T=st.sampled_from([1, 13, 40]),
    chunk=st.sampled_from([1, 3, 8, 16]),
    doc_lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    groups=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_reference_property(T, chunk, doc_lengths, groups, seed):
    inputs, state0 = _inputs(seed, b=1, T=T, H=4, G=groups)
    seg = _segments_from_lengths([doc_lengths], T)
    y_ref, final_ref = ssd_reference(**inputs, segment_ids=seg, initial_state=state0)
    y, final = ssd_chunked(**inputs, chunk_size=chunk, segment_ids=seg, initial_state=state0)
    _assert_close(y, y_ref, 1e-5)
    _assert_close(final, final_ref, 1e-5)


def test_documents_are_independent():
    """Each document of a packed row equals that document run alone (from a zero state), and the initial
    state reaches only the first document."""
    inputs, state0 = _inputs(1, b=1, T=30)
    lengths = [7, 9, 1, 13]
    seg = _segments_from_lengths([lengths], 30)
    y, final = ssd_chunked(**inputs, chunk_size=8, segment_ids=seg, initial_state=state0)
    start = 0
    for i, n in enumerate(lengths):
        piece = {k: (v[:, start:start + n] if v.ndim > 1 else v) for k, v in inputs.items()}
        y_alone, final_alone = ssd_chunked(**piece, chunk_size=8, initial_state=state0 if i == 0 else None)
        _assert_close(y[:, start:start + n], y_alone, 1e-5)
        start += n
    _assert_close(final, final_alone, 1e-5)


@pytest.mark.parametrize("segments", ["none", "boundaries_and_singletons"])
def test_gradients_match_reference(segments):
    inputs, state0 = _inputs(2)
    lengths = SEGMENT_CASES[segments]
    seg = None if lengths is None else _segments_from_lengths(lengths, 37)
    rng = np.random.default_rng(3)
    w_y = jnp.asarray(rng.normal(size=(2, 37, 4, 8)), jnp.float32)
    w_s = jnp.asarray(rng.normal(size=state0.shape), jnp.float32)

    def functional(fn, **kw):
        def f(x, dt, A, B, C, init):
            y, final = fn(x, dt, A, B, C, segment_ids=seg, initial_state=init, **kw)
            return jnp.sum(y * w_y) + jnp.sum(final * w_s)
        return jax.grad(f, argnums=tuple(range(6)))

    args = (*inputs.values(), state0)
    expected = functional(ssd_reference)(*args)
    actual = functional(ssd_chunked, chunk_size=8)(*args)
    for name, g, g_ref in zip(["x", "dt", "A", "B", "C", "initial_state"], actual, expected):
        assert bool(jnp.all(jnp.isfinite(g))), name
        _assert_close(g, g_ref, 1e-4)


def test_decode_steps_continue_the_scan():
    inputs, state0 = _inputs(4, b=2, T=12)
    y_ref, final_ref = ssd_reference(**inputs, initial_state=state0)
    _, state = ssd_chunked(**{k: (v[:, :7] if v.ndim > 1 else v) for k, v in inputs.items()},
                           chunk_size=4, initial_state=state0)
    for t in range(7, 12):
        y_t, state = ssd_decode_step(state, *(v[:, t] if v.ndim > 1 else v for v in inputs.values()))
        _assert_close(y_t, y_ref[:, t], 1e-5)
    _assert_close(state, final_ref, 1e-5)


def test_long_sequence_stays_accurate():
    """64K tokens with decays slow enough that the whole sequence matters: chunk-local cumulative sums keep
    the chunked result at float32 accuracy against a float64 recurrence."""
    T, H, P, N = 65536, 2, 2, 2
    rng = np.random.default_rng(5)
    x = rng.normal(size=(T, H, P))
    dt = np.full((T, H), 0.01)
    A = np.asarray([-0.01, -0.001])
    B = rng.normal(size=(T, N))
    C = rng.normal(size=(T, N))
    state, y_ref = np.zeros((H, P, N)), np.empty((T, H, P))
    decay = np.exp(dt[0] * A)[:, None, None]
    for t in range(T):  # float64 oracle
        state = decay * state + (dt[t, :, None] * x[t])[:, :, None] * B[t]
        y_ref[t] = state @ C[t]
    f32 = lambda a: jnp.asarray(a[None], jnp.float32)  # noqa: E731
    y, final = ssd_chunked(f32(x), f32(dt), jnp.asarray(A, jnp.float32), f32(B[:, None]), f32(C[:, None]),
                           chunk_size=256)
    _assert_close(y[0], y_ref, 1e-5)
    _assert_close(final[0], state, 1e-5)


def test_document_runs():
    seg = jnp.asarray([[3, 3, 5, 5, 5, 0, 0], [1, 2, 2, 1, 1, 1, 1]])
    np.testing.assert_array_equal(document_runs(seg, seg.shape), [[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 2, 2, 2, 2]])
    np.testing.assert_array_equal(document_runs(None, (1, 3)), [[0, 0, 0]])


def _conv_reference(x, kernel, bias, runs, history=None):
    """Direct per-token sum over the window, skipping inputs of other documents."""
    b, T, C = x.shape
    K = kernel.shape[0]
    x, runs = np.asarray(x), np.asarray(runs)
    out = np.zeros((b, T, C), np.float32)
    for i in range(b):
        for t in range(T):
            acc = np.array(bias, np.float32)
            for tap in range(K):
                s = t - (K - 1) + tap
                if s >= 0 and runs[i, s] == runs[i, t]:
                    acc = acc + kernel[tap] * x[i, s]
                elif s < 0 and history is not None and runs[i, t] == 0:
                    acc = acc + kernel[tap] * history[i, :, K + s]
            out[i, t] = acc
    return out


@pytest.mark.parametrize("with_history", [False, True])
def test_conv_resets_at_document_starts(with_history):
    rng = np.random.default_rng(6)
    b, T, C, K = 2, 11, 5, 4
    x = rng.normal(size=(b, T, C)).astype(np.float32)
    kernel = rng.normal(size=(K, C)).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)
    seg = jnp.asarray([[1, 1, 2, 3, 3, 3, 3, 3, 4, 4, 4], [1] * 6 + [2] * 5])
    runs = document_runs(seg, seg.shape)
    history = rng.normal(size=(b, C, K)).astype(np.float32) if with_history else None
    y, final = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), runs,
                                     None if history is None else jnp.asarray(history))
    np.testing.assert_allclose(y, _conv_reference(x, kernel, bias, runs, history), rtol=1e-5, atol=1e-5)
    # The final state holds the last K inputs of the last document, zeros before it.
    np.testing.assert_allclose(final[0], np.concatenate([np.zeros((C, 1)), x[0, -3:].T], axis=1), atol=0)
    np.testing.assert_allclose(final[1], x[1, -4:].T, atol=0)


def test_conv_gradients_match_autodiff_of_the_reference():
    """The conv's hand-written VJP against autodiff of a direct formulation, with packing and history."""
    rng = np.random.default_rng(7)
    b, T, C, K = 2, 13, 6, 4
    x = jnp.asarray(rng.normal(size=(b, T, C)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(K, C)), jnp.float32)
    history = jnp.asarray(rng.normal(size=(b, C, K)), jnp.float32)
    runs = document_runs(jnp.asarray([[1] * 5 + [2] * 1 + [3] * 7, [4] * 13]), (b, T))
    w = jnp.asarray(rng.normal(size=(b, T, C)), jnp.float32)

    def direct(x, kernel, history):
        padded = jnp.concatenate([jnp.swapaxes(history, 1, 2), x], axis=1)
        padded_runs = jnp.concatenate([jnp.zeros((b, K), jnp.int32), runs], axis=1)
        y = 0.0
        for k in range(K):
            same = (padded_runs[:, k + 1:k + 1 + T] == runs)[..., None]
            y = y + jnp.where(same, padded[:, k + 1:k + 1 + T], 0.0) * kernel[k]
        return y

    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)) * w)  # noqa: E731
    ours = jax.grad(loss(lambda x, k, h: causal_depthwise_conv(x, k, None, runs, h)[0]), argnums=(0, 1, 2))
    expected = jax.grad(loss(direct), argnums=(0, 1, 2))
    for g, e in zip(ours(x, kernel, history), expected(x, kernel, history)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
