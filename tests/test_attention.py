"""Block-wise attention against a dense softmax reference: values and gradients, packed documents, GQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from granite_jax.model.attention import apply_rope, rope_cos_sin
from granite_jax.model.documents import document_runs
from granite_jax.model.flash import flash_attention
from granite_jax.model.pallas_attention import pallas_attention


def dense_attention(q, k, v, runs, scale):
    """The whole (T x T) score matrix, same-document causal mask, float64-free but straightforward."""
    T, group = q.shape[1], q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bshd->bhqs", q, k) * scale
    visible = (runs[:, :, None] == runs[:, None, :]) & jnp.tril(jnp.ones((T, T), bool))
    probs = jax.nn.softmax(jnp.where(visible[:, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhqs,bshd->bqhd", probs, v)


def _inputs(T=37, n_h=4, n_kv=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return f32(2, T, n_h, d), f32(2, T, n_kv, d), f32(2, T, n_kv, d)


@pytest.mark.parametrize("block", [8, 16, 512])
@pytest.mark.parametrize("packed", [False, True])
def test_flash_matches_dense(block, packed):
    q, k, v = _inputs()
    seg = jnp.asarray(np.repeat([[1, 2, 3, 4], [5, 5, 6, 0]], [10, 1, 17, 9], axis=1)) if packed else None
    runs = document_runs(seg, (2, 37))
    flash = lambda q, k, v: flash_attention(q, k, v, runs, scale=0.3, block_size=block)  # noqa: E731
    dense = lambda q, k, v: dense_attention(q, k, v, runs, 0.3)  # noqa: E731
    np.testing.assert_allclose(jax.jit(flash)(q, k, v), jax.jit(dense)(q, k, v), rtol=1e-5, atol=1e-5)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)  # noqa: E731
    grads = jax.jit(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
@pytest.mark.parametrize("packed", [True, False])
def test_pallas_kernels_match_dense_on_packed_rows(impl, packed):
    """`attention_impl: splash` and `pallas_gpu` (JAX's Pallas TPU and Triton kernels, interpret mode here)
    equal the dense reference, values and gradients of q, k, v: grouped-query heads, a row of 137 tokens
    (padded to the kernel's block) packed with
    documents of 1 to 60 tokens, one-token documents, a reused segment id (1 1 2 2 1 1: three documents) and
    trailing padding; or rows that are one document each."""
    T = 137
    q, k, v = _inputs(T=T, n_h=4, n_kv=2, d=16)
    lengths = [[1, 60, 1, 2, 40, 33], [20, 20, 30, 30, 17, 20]]
    ids = [[1, 2, 3, 4, 5, 0], [1, 1, 2, 2, 1, 1]]
    seg = jnp.asarray([np.repeat(i, n) for i, n in zip(ids, lengths)]) if packed else None
    runs = document_runs(seg, (2, T))
    kernel = lambda q, k, v: pallas_attention(q, k, v, runs, impl=impl, scale=0.3, plan=None)  # noqa: E731
    dense = lambda q, k, v: dense_attention(q, k, v, runs, 0.3)  # noqa: E731
    np.testing.assert_allclose(jax.jit(kernel)(q, k, v), jax.jit(dense)(q, k, v), rtol=1e-5, atol=1e-5)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)  # noqa: E731
    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_flash_bfloat16_close_to_float32():
    q, k, v = _inputs(T=64)
    runs = document_runs(None, (2, 64))
    out = flash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), runs, scale=0.3, block_size=16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), dense_attention(q, k, v, runs, 0.3), atol=5e-2)


def test_rope_depends_only_on_relative_position():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(pos_q, pos_k):
        cq, sq = rope_cos_sin(jnp.asarray([[pos_q]]), 16, 10000.0, jnp.float32)
        ck, sk = rope_cos_sin(jnp.asarray([[pos_k]]), 16, 10000.0, jnp.float32)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-2)
