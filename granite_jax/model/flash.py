"""Block-wise ("flash") attention over packed documents, in plain JAX with a hand-written backward pass.

softmax(scale · q kᵀ + mask) v where a query sees the keys at or before it in its own document. Queries and
keys are cut into blocks; a query block visits only the key blocks from the start of its first query's
document up to the diagonal, keeping a running max and normaliser (online softmax). Nothing of size T×T is
ever stored: the forward pass keeps the output and the log-sum-exp, and the backward pass recomputes each
block's probabilities (the FlashAttention-2 recurrences). Work and memory are O(T · span) where span is the
document length, so packed short documents cost far less than T².
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from granite_jax.model.documents import document_bounds, document_runs
from granite_jax.parallel.sequence import layout_order, piece_index, pieces_per_shard

_NEG = -1e30  # finite: keeps fully masked rows of a block free of inf - inf


def _scores(q_blk, k_blk, runs_q, runs_k, q0, k0, scale):
    """Masked float32 scores of a (query block, key block) pair and the mask. q (b,kv,g,Bq,d), k (b,kv,Bk,d)."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    q_index = q0 + jnp.arange(q_blk.shape[3])
    k_index = k0 + jnp.arange(k_blk.shape[2])
    mask = (runs_q[:, :, None] == runs_k[:, None, :]) & (q_index[:, None] >= k_index[None, :])
    mask = mask[:, None, None]
    return jnp.where(mask, s, _NEG), mask


def _block(x, i, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _forward(q, k, v, runs_q, runs_k, q0, scale, block):
    """q (b,kv,g,Tq,d) at key positions q0 .. q0 + Tq - 1; k/v (b,kv,Tk,d); runs_q (b,Tq), runs_k (b,Tk) document
    runs comparable between the two; Tq and Tk multiples of block. Returns out (like q), lse (b,kv,g,Tq)."""
    b, n_kv, g, Tq, d = q.shape
    doc_start, _ = document_bounds(runs_k)
    q_doc_start = jax.lax.dynamic_slice_in_dim(doc_start, q0, Tq, axis=1)

    def query_block(i):
        q_i = _block(q, i, block, 3)
        runs_i = _block(runs_q, i, block, 1)
        first = jnp.min(_block(q_doc_start, i, block, 1)) // block  # earliest key block any query here can see
        last = (q0 + i * block + block - 1) // block                 # the key block on the diagonal

        def key_block(j, carry):
            m, l, acc = carry
            s, mask = _scores(q_i, _block(k, j, block, 2), runs_i, _block(runs_k, j, block, 1), q0 + i * block,
                              j * block, scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqs,bksd->bkgqd", p.astype(v.dtype), _block(v, j, block, 2), preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((b, n_kv, g, block), _NEG, jnp.float32), jnp.zeros((b, n_kv, g, block), jnp.float32),
                jnp.zeros((b, n_kv, g, block, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(first, last + 1, key_block, init)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    out, lse = jax.lax.map(query_block, jnp.arange(Tq // block))  # (n_blocks, b, kv, g, block, ...)
    out = jnp.moveaxis(out, 0, 3).reshape(b, n_kv, g, Tq, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, n_kv, g, Tq)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, runs_q, runs_k, q0, scale, block):
    return _forward(q, k, v, runs_q, runs_k, q0, scale, block)[0]


def _flash_fwd(q, k, v, runs_q, runs_k, q0, scale, block):
    out, lse = _forward(q, k, v, runs_q, runs_k, q0, scale, block)
    return out, (q, k, v, runs_q, runs_k, q0, out, lse)


def _flash_bwd(scale, block, residuals, d_out):
    q, k, v, runs_q, runs_k, q0, out, lse = residuals
    b, n_kv, g, Tq, d = q.shape
    Tk = k.shape[2]
    _, doc_end = document_bounds(runs_k)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (b,kv,g,Tq)

    def key_block(d_q, j):
        k_j, v_j, runs_j = _block(k, j, block, 2), _block(v, j, block, 2), _block(runs_k, j, block, 1)
        # The query blocks here that can see block j: from the diagonal to the end of its last document.
        first = jnp.maximum(j * block - q0, 0) // block
        last = jnp.minimum((jnp.max(_block(doc_end, j, block, 1)) - 1 - q0) // block, Tq // block - 1)

        def query_block(i, carry):
            d_k, d_v, d_q = carry
            q_i, do_i = _block(q, i, block, 3), _block(d_out, i, block, 3)
            s, mask = _scores(q_i, k_j, _block(runs_q, i, block, 1), runs_j, q0 + i * block, j * block, scale)
            p = jnp.where(mask, jnp.exp(s - _block(lse, i, block, 3)[..., None]), 0.0)
            d_v = d_v + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
            d_p = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
            d_s = (p * (d_p - _block(delta, i, block, 3)[..., None]) * scale).astype(q.dtype)
            d_k = d_k + jnp.einsum("bkgqs,bkgqd->bksd", d_s, q_i, preferred_element_type=jnp.float32)
            d_q_i = jnp.einsum("bkgqs,bksd->bkgqd", d_s, k_j, preferred_element_type=jnp.float32)
            d_q = jax.lax.dynamic_update_slice_in_dim(d_q, _block(d_q, i, block, 3) + d_q_i, i * block, axis=3)
            return d_k, d_v, d_q

        zeros = jnp.zeros((b, n_kv, block, d), jnp.float32)
        d_k, d_v, d_q = jax.lax.fori_loop(first, last + 1, query_block, (zeros, zeros, d_q))
        return d_q, (d_k, d_v)

    d_q, (d_k, d_v) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(Tk // block))
    restack = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, n_kv, Tk, d)  # noqa: E731
    return d_q.astype(q.dtype), restack(d_k).astype(k.dtype), restack(d_v).astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, runs, *, scale: float, block_size: int = 512) -> jax.Array:
    """q (b, T, n_h, d), k/v (b, T, n_kv, d), runs (b, T) document-run index. Returns (b, T, n_h, d).

    Query head h uses KV head h // (n_h / n_kv) (grouped-query attention).
    """
    b, T, n_h, d = q.shape
    n_kv = k.shape[2]
    block = min(block_size, -(-T // 8) * 8)
    pad = -T % block
    # Padded positions form their own document run (never seen by, and never seeing, real tokens).
    pad_time = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    runs = jnp.pad(runs, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max)
    q = jnp.moveaxis(pad_time(q).reshape(b, T + pad, n_kv, n_h // n_kv, d), 1, 3)   # (b, kv, g, T, d)
    k = jnp.moveaxis(pad_time(k), 1, 2)                                            # (b, kv, T, d)
    v = jnp.moveaxis(pad_time(v), 1, 2)
    out = _flash(q, k, v, runs, runs, 0, scale, block)
    return jnp.moveaxis(out, 3, 1).reshape(b, T + pad, n_h, d)[:, :T]


def flash_attention_to_keys(q, k, v, runs_q, runs_k, q_offset, *, scale: float, block: int) -> jax.Array:
    """Queries of one piece of a row against the keys of the whole row (context parallelism): q (b, Tq, n_h, d)
    at row positions q_offset .. q_offset + Tq - 1 (q_offset may be traced); k/v (b, Tk, n_kv, d) the whole
    row; runs_q, runs_k the document runs of both, counted over the whole row. Tq and Tk multiples of `block`.
    The same causal, same-document mask and block skipping as `flash_attention`. Returns (b, Tq, n_h, d)."""
    b, Tq, n_h, d = q.shape
    n_kv = k.shape[2]
    q = jnp.moveaxis(q.reshape(b, Tq, n_kv, n_h // n_kv, d), 1, 3)
    out = _flash(q, jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2), runs_q, runs_k, q_offset, scale, block)
    return jnp.moveaxis(out, 3, 1).reshape(b, Tq, n_h, d)


def flash_attention_context_parallel(q, k, v, segment_ids, *, scale: float, block_size: int, axis: str,
                                     layout: str = "contiguous"):
    """Attention of a row split over the mesh axis `axis`, inside `shard_map` on this shard's local row (its
    pieces side by side, `parallel/sequence.py`): q (b, Tq, n_h, d), k/v (b, Tq, n_kv, d), segment_ids (b, Tq)
    the data's. The keys, values and segment ids of the whole row are all-gathered (few KV heads: the cheap
    side; the gather's transpose reduce-scatters dK and dV) and put back in row order, documents are counted
    over the whole row, and each of this shard's pieces of queries attends with the global causal,
    same-document mask. A piece must be a multiple of the block (min(block_size, piece))."""
    shards = jax.lax.axis_size(axis)
    n = pieces_per_shard(layout)
    b, T_local = segment_ids.shape
    piece = T_local // n
    block = min(block_size, piece)
    if piece % block:
        raise ValueError(f"a context piece of {piece} tokens is not a multiple of attention_block_size="
                         f"{block_size}: make seq_len / (context x {n}) a multiple of it")
    in_row_order = np.argsort(layout_order(T_local * shards, shards, layout))  # gathered (layout order) -> row

    def gather(x):
        return jnp.take(jax.lax.all_gather(x, axis, axis=1, tiled=True), in_row_order, axis=1)

    runs = document_runs(gather(segment_ids), (b, T_local * shards))
    keys, values = gather(k), gather(v)
    shard = jax.lax.axis_index(axis)
    outputs = []
    for local, q_piece in enumerate(jnp.split(q, n, axis=1)):
        q_offset = piece_index(layout, shard, local, shards) * piece
        runs_q = jax.lax.dynamic_slice_in_dim(runs, q_offset, piece, axis=1)
        outputs.append(flash_attention_to_keys(q_piece, keys, values, runs_q, runs, q_offset, scale=scale,
                                               block=block))
    return jnp.concatenate(outputs, axis=1)
