"""Block-wise ("flash") attention over packed documents, in plain JAX with a hand-written backward pass.

softmax(scale · q kᵀ + mask) v where a query sees the keys at or before it in its own document. Queries and
keys are cut into blocks; a query block visits only the key blocks from the start of its first query's
document up to the diagonal, keeping a running max and normaliser (online softmax). Nothing of size T×T is
ever stored: the forward pass keeps the output and the log-sum-exp, and the backward pass recomputes each
block's probabilities (the FlashAttention-2 recurrences). Work and memory are O(T · span) where span is the
document length, so packed short documents cost far less than T².

The recurrences take the keys one *piece* at a time, at any position relative to the queries
(`_attend_piece`, `_piece_gradients`): a whole row is one piece; under context parallelism
(`flash_attention_context_parallel`) each device's queries meet every device's keys in turn, passed around a
ring of devices, so that no device ever holds more than its own share of the row's keys.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from granite_jax.model.documents import document_bounds, document_runs
from granite_jax.parallel.sequence import layout_order, piece_index, pieces_per_shard

_NEG = -1e30  # finite: keeps fully masked rows of a block free of inf - inf


class Queries(NamedTuple):
    """A piece of queries: q (b,Tq,kv,g,d) at row positions q0 .. q0+Tq-1 (q0 may be traced); runs (b,Tq) their
    document runs and doc_start (b,Tq) the row position where each query's document starts, both counted
    over the same row as the keys'."""

    q: jax.Array
    q0: jax.Array | int
    runs: jax.Array
    doc_start: jax.Array


class Keys(NamedTuple):
    """A piece of keys and values: k/v (b,Tk,kv,d) at row positions k0 .. k0+Tk-1; runs (b,Tk) and doc_end
    (b,Tk), the row position (exclusive) where each key's document ends."""

    k: jax.Array
    v: jax.Array
    k0: jax.Array | int
    runs: jax.Array
    doc_end: jax.Array


# Every array keeps the time axis second, as the model's activations have it ((b, T, kv heads, group, d) for
# queries: query head h = kv · g + group uses KV head kv), so that nothing is transposed on the way in or out.

def _scores(q_blk, k_blk, runs_q, runs_k, q0, k0, scale):
    """Masked float32 scores (b,Bq,kv,g,Bk) of a (query block, key block) pair at row positions q0, k0, and the
    mask. q (b,Bq,kv,g,d), k (b,Bk,kv,d)."""
    s = jnp.einsum("bqkgd,bskd->bqkgs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    q_index = q0 + jnp.arange(q_blk.shape[1])
    k_index = k0 + jnp.arange(k_blk.shape[1])
    mask = (runs_q[:, :, None] == runs_k[:, None, :]) & (q_index[:, None] >= k_index[None, :])
    mask = mask[:, :, None, None]
    return jnp.where(mask, s, _NEG), mask


def _block(x, i, size):
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


def _put_block(x, update, i, size):
    return jax.lax.dynamic_update_slice_in_dim(x, update, i * size, axis=1)


def _empty_softmax(q):
    """The online softmax before any key: running max and normaliser (b,Tq,kv,g), unnormalised output
    (b,Tq,kv,g,d), float32."""
    return (jnp.full(q.shape[:-1], _NEG, jnp.float32), jnp.zeros(q.shape[:-1], jnp.float32),
            jnp.zeros(q.shape, jnp.float32))


def _attend_piece(softmax, queries: Queries, keys: Keys, scale, block):
    """The online softmax `softmax` after also seeing one piece of keys. A query block visits the piece's key
    blocks from its earliest query's document start to its diagonal: none when the piece lies wholly after the
    block or wholly before that document."""
    Tk = keys.k.shape[1]

    def query_block(i, softmax):
        q_i, runs_i = _block(queries.q, i, block), _block(queries.runs, i, block)
        q_start = queries.q0 + i * block
        first = jnp.maximum(jnp.min(_block(queries.doc_start, i, block)) - keys.k0, 0) // block
        last = jnp.minimum(q_start + block - 1 - keys.k0, Tk - 1) // block   # < 0 when the piece is later

        def key_block(j, carry):
            m, l, acc = carry
            s, mask = _scores(q_i, _block(keys.k, j, block), runs_i, _block(keys.runs, j, block), q_start,
                              keys.k0 + j * block, scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bqkgs,bskd->bqkgd", p.astype(keys.v.dtype), _block(keys.v, j, block),
                preferred_element_type=jnp.float32)
            return m_new, l, acc

        updated = jax.lax.fori_loop(first, last + 1, key_block, tuple(_block(a, i, block) for a in softmax))
        return tuple(_put_block(a, u, i, block) for a, u in zip(softmax, updated))

    return jax.lax.fori_loop(0, queries.q.shape[1] // block, query_block, softmax)


def _finish_softmax(softmax, dtype):
    """The output (b,Tq,kv,g,d) and log-sum-exp (b,Tq,kv,g) of an online softmax that has seen every key."""
    m, l, acc = softmax
    return (acc / l[..., None]).astype(dtype), m + jnp.log(l)


def _piece_gradients(grads, queries: Queries, keys: Keys, d_out, lse, delta, scale, block):
    """The backward pass of one (query piece, key piece) pair: grads = (dQ (b,Tq,kv,g,d), dK, dV (b,Tk,kv,d)),
    float32, plus the pair's parts. d_out, lse and delta = rowsum(d_out · out) are the query piece's, from the
    softmax over every key. A key block visits the query blocks from its diagonal to the end of its last
    document."""
    Tq = queries.q.shape[1]

    def key_block(j, grads):
        d_q, d_k, d_v = grads
        k_j, v_j, runs_j = _block(keys.k, j, block), _block(keys.v, j, block), _block(keys.runs, j, block)
        k_start = keys.k0 + j * block
        first = jnp.maximum(k_start - queries.q0, 0) // block               # > last when the piece is earlier
        last = jnp.minimum((jnp.max(_block(keys.doc_end, j, block)) - 1 - queries.q0) // block, Tq // block - 1)

        def query_block(i, carry):
            d_k, d_v, d_q = carry
            q_i, do_i = _block(queries.q, i, block), _block(d_out, i, block)
            s, mask = _scores(q_i, k_j, _block(queries.runs, i, block), runs_j, queries.q0 + i * block, k_start,
                              scale)
            p = jnp.where(mask, jnp.exp(s - _block(lse, i, block)[..., None]), 0.0)
            d_v = d_v + jnp.einsum("bqkgs,bqkgd->bskd", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
            d_p = jnp.einsum("bqkgd,bskd->bqkgs", do_i, v_j, preferred_element_type=jnp.float32)
            d_s = (p * (d_p - _block(delta, i, block)[..., None]) * scale).astype(queries.q.dtype)
            d_k = d_k + jnp.einsum("bqkgs,bqkgd->bskd", d_s, q_i, preferred_element_type=jnp.float32)
            d_q_i = jnp.einsum("bqkgs,bskd->bqkgd", d_s, k_j, preferred_element_type=jnp.float32)
            return d_k, d_v, _put_block(d_q, _block(d_q, i, block) + d_q_i, i, block)

        d_k_j, d_v_j, d_q = jax.lax.fori_loop(first, last + 1, query_block,
                                              (_block(d_k, j, block), _block(d_v, j, block), d_q))
        return d_q, _put_block(d_k, d_k_j, j, block), _put_block(d_v, d_v_j, j, block)

    return jax.lax.fori_loop(0, keys.k.shape[1] // block, key_block, grads)


def _output_gradient_terms(d_out, out):
    """delta = rowsum(dO · O) (b,Tq,kv,g), float32: the softmax's part of every score's gradient."""
    return jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)


def _zero_gradients(q, k):
    return jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32)


# --- one device: the row is one piece ---------------------------------------------------------------------

def _row_pieces(q, k, v, runs):
    start, end = document_bounds(runs)
    return Queries(q, 0, runs, start), Keys(k, v, 0, runs, end)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, runs, scale, block):
    return _flash_fwd(q, k, v, runs, scale, block)[0]


def _flash_fwd(q, k, v, runs, scale, block):
    queries, keys = _row_pieces(q, k, v, runs)
    out, lse = _finish_softmax(_attend_piece(_empty_softmax(q), queries, keys, scale, block), q.dtype)
    return out, (q, k, v, runs, out, lse)


def _flash_bwd(scale, block, residuals, d_out):
    q, k, v, runs, out, lse = residuals
    queries, keys = _row_pieces(q, k, v, runs)
    d_q, d_k, d_v = _piece_gradients(_zero_gradients(q, k), queries, keys, d_out, lse,
                                     _output_gradient_terms(d_out, out), scale, block)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _grouped(q, n_kv):
    """(b,T,n_h,d) → (b,T,kv,g,d): query head h uses KV head h // g (a reshape, no copy)."""
    b, T, n_h, d = q.shape
    return q.reshape(b, T, n_kv, n_h // n_kv, d)


def flash_attention(q, k, v, runs, *, scale: float, block_size: int = 512) -> jax.Array:
    """q (b, T, n_h, d), k/v (b, T, n_kv, d), runs (b, T) document-run index. Returns (b, T, n_h, d).

    Query head h uses KV head h // (n_h / n_kv) (grouped-query attention).
    """
    T = q.shape[1]
    block = min(block_size, -(-T // 8) * 8)
    pad = -T % block
    # Padded positions form their own document run (never seen by, and never seeing, real tokens).
    pad_time = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    runs = jnp.pad(runs, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max)
    out = _flash(_grouped(pad_time(q), k.shape[2]), pad_time(k), pad_time(v), runs, scale, block)
    return out.reshape(out.shape[0], T + pad, *q.shape[2:])[:, :T]


# --- context parallelism: each device's pieces of queries against every device's keys, around a ring ------

class _Ring(NamedTuple):
    """Where this device's pieces sit in the row: `shards` devices on mesh axis `axis`, each holding
    `pieces_per_shard(layout)` pieces of `piece` tokens side by side (`parallel/sequence.py`)."""

    axis: str
    layout: str
    piece: int

    @property
    def shards(self):
        return jax.lax.axis_size(self.axis)

    def offsets(self, shard) -> list:
        """Row positions of device `shard`'s local pieces (shard may be traced)."""
        return [piece_index(self.layout, shard, local, self.shards) * self.piece
                for local in range(pieces_per_shard(self.layout))]

    def pieces(self, x) -> list:
        """x (b, T_local, ...) with this device's pieces side by side → one array per piece."""
        return jnp.split(x, pieces_per_shard(self.layout), axis=1)

    def pass_on(self, x):
        """Every device sends x to the next around the ring (the last to the first)."""
        n = self.shards
        return jax.tree.map(lambda a: jax.lax.ppermute(a, self.axis, [(r, (r + 1) % n) for r in range(n)]), x)


def _local_queries(ring, q, runs, doc_start):
    """This device's pieces of queries, with the runs and document starts of their positions in the row."""
    shard = jax.lax.axis_index(ring.axis)
    return [Queries(q_piece, q0, jax.lax.dynamic_slice_in_dim(runs, q0, ring.piece, axis=1),
                    jax.lax.dynamic_slice_in_dim(doc_start, q0, ring.piece, axis=1))
            for q_piece, q0 in zip(ring.pieces(q), ring.offsets(shard))]


def _keys_of(ring, k, v, source, runs, doc_end):
    """Device `source`'s pieces of keys and values (k, v its local (b,T_local,kv,d)), placed in the row."""
    return [Keys(k_piece, v_piece, k0, jax.lax.dynamic_slice_in_dim(runs, k0, ring.piece, axis=1),
                 jax.lax.dynamic_slice_in_dim(doc_end, k0, ring.piece, axis=1))
            for k_piece, v_piece, k0 in zip(ring.pieces(k), ring.pieces(v), ring.offsets(source))]


def _source(ring, step):
    """The device whose keys this device holds at ring step `step` (they move one device per step)."""
    return (jax.lax.axis_index(ring.axis) - step) % ring.shards


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring_flash(q, k, v, runs, ring, scale, block):
    return _ring_flash_fwd(q, k, v, runs, ring, scale, block)[0]


def _ring_flash_fwd(q, k, v, runs, ring, scale, block):
    doc_start, doc_end = document_bounds(runs)
    queries = _local_queries(ring, q, runs, doc_start)

    def attend(softmaxes, kv, step):
        for piece_keys in _keys_of(ring, *kv, _source(ring, step), runs, doc_end):
            softmaxes = [_attend_piece(s, qs, piece_keys, scale, block) for s, qs in zip(softmaxes, queries)]
        return softmaxes

    def ring_step(carry, step):
        softmaxes, kv = carry
        kv = ring.pass_on(kv)
        return (attend(softmaxes, kv, step), kv), None

    softmaxes = attend([_empty_softmax(qs.q) for qs in queries], (k, v), 0)
    (softmaxes, _), _ = jax.lax.scan(ring_step, (softmaxes, (k, v)), jnp.arange(1, ring.shards))
    outs, lses = zip(*(_finish_softmax(s, q.dtype) for s in softmaxes))
    out, lse = jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)
    return out, (q, k, v, runs, out, lse)


def _ring_flash_bwd(ring, scale, block, residuals, d_out):
    q, k, v, runs, out, lse = residuals
    doc_start, doc_end = document_bounds(runs)
    queries = _local_queries(ring, q, runs, doc_start)
    per_piece = list(zip(ring.pieces(d_out), ring.pieces(lse), ring.pieces(_output_gradient_terms(d_out, out))))

    def gradients(d_qs, kv, d_kv, step):
        """d_qs and the held keys' d_kv plus the gradients of the pairs (local query piece, held key piece)."""
        d_ks, d_vs = ring.pieces(d_kv[0]), ring.pieces(d_kv[1])
        for p, piece_keys in enumerate(_keys_of(ring, *kv, _source(ring, step), runs, doc_end)):
            for local, (qs, (do, piece_lse, delta)) in enumerate(zip(queries, per_piece)):
                d_qs[local], d_ks[p], d_vs[p] = _piece_gradients((d_qs[local], d_ks[p], d_vs[p]), qs, piece_keys,
                                                                 do, piece_lse, delta, scale, block)
        return d_qs, (jnp.concatenate(d_ks, axis=1), jnp.concatenate(d_vs, axis=1))

    def ring_step(carry, step):
        d_qs, kv, d_kv = carry
        kv, d_kv = ring.pass_on((kv, d_kv))
        d_qs, d_kv = gradients(d_qs, kv, d_kv, step)
        return (d_qs, kv, d_kv), None

    d_q, d_k, d_v = _zero_gradients(q, k)
    d_qs, d_kv = gradients(ring.pieces(d_q), (k, v), (d_k, d_v), 0)
    (d_qs, _, d_kv), _ = jax.lax.scan(ring_step, (d_qs, (k, v), d_kv), jnp.arange(1, ring.shards))
    d_k, d_v = ring.pass_on(d_kv)   # the keys' gradients, one step further: back on the device they came from
    return jnp.concatenate(d_qs, axis=1).astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_ring_flash.defvjp(_ring_flash_fwd, _ring_flash_bwd)


def flash_attention_context_parallel(q, k, v, segment_ids, *, scale: float, block_size: int, axis: str,
                                     layout: str = "contiguous"):
    """Attention of a row split over the mesh axis `axis`, inside `shard_map` on this shard's local row (its
    pieces side by side, `parallel/sequence.py`): q (b, Tq, n_h, d), k/v (b, Tq, n_kv, d), segment_ids (b, Tq)
    the data's. Only the segment ids are all-gathered (documents are counted over the whole row); the keys and
    values go around a ring of the devices, one device's share at a time, and their gradients follow them
    back, so a device holds at most two shares of keys (its own and the visiting one) forward or backward.
    Each of this shard's pieces of queries attends with the global causal, same-document mask, visiting only
    the key blocks its documents reach. A piece must be a multiple of the block (min(block_size, piece))."""
    shards = jax.lax.axis_size(axis)
    b, T_local = segment_ids.shape
    piece = T_local // pieces_per_shard(layout)
    block = min(block_size, piece)
    if piece % block:
        raise ValueError(f"a context piece of {piece} tokens is not a multiple of attention_block_size="
                         f"{block_size}: make seq_len / (context x {pieces_per_shard(layout)}) a multiple of it")
    in_row_order = np.argsort(layout_order(T_local * shards, shards, layout))  # gathered (layout order) -> row
    row_ids = jnp.take(jax.lax.all_gather(segment_ids, axis, axis=1, tiled=True), in_row_order, axis=1)
    runs = document_runs(row_ids, row_ids.shape)
    out = _ring_flash(_grouped(q, k.shape[2]), k, v, runs, _Ring(axis, layout, piece), scale, block)
    return out.reshape(q.shape)
