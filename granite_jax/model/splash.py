"""Causal attention over packed documents with JAX's Pallas TPU "splash" kernel (`attention_impl: splash`).

The same function as `flash.flash_attention` — a query sees the keys at or before it in its own document,
grouped-query heads — computed by `jax.experimental.pallas.ops.tpu.splash_attention`: a causal mask plus
segment ids (the rows' document runs), blocks that the mask leaves empty skipped, forward and backward as
Pallas kernels. On CPU it runs in Pallas' interpret mode (tests only: slow).

A Pallas call is opaque to XLA's sharding propagation, so on a mesh it runs under `shard_map`: rows split as
the batch is, heads as the rules split them (when both query and key/value heads divide), each device
attending over its rows' whole sequence. Rows split over `context` use the blockwise context-parallel
attention instead (`flash.flash_attention_context_parallel`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from granite_jax.parallel.plan import axes_size, current_mesh

_BLOCK = 512  # the kernel's query / key block (smaller rows: the row, rounded up to a multiple of 128)


def _kernel(n_heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = min(_BLOCK, length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(n_heads)])
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    return lambda q, k, v, runs: kernel(q, k, v, segment_ids=splash.SegmentIds(q=runs, kv=runs))


def _rows(q, k, v, runs, *, scale: float, interpret: bool):
    """q (b, T, n_h, d), k/v (b, T, n_kv, d), runs (b, T) on one device → (b, T, n_h, d)."""
    b, T, n_h, _ = q.shape
    length = -(-T // 128) * 128
    pad = length - T
    if pad:  # padded positions form their own run: they neither see nor are seen by real tokens
        pad_time = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v = pad_time(q), pad_time(k), pad_time(v)
        runs = jnp.pad(runs, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max)
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # (b, heads, T, d), the kernel's layout
    kernel = _kernel(n_h, length, interpret)
    out = jax.vmap(kernel)(heads_first(q * scale), heads_first(k), heads_first(v), runs.astype(jnp.int32))
    return heads_first(out)[:, :T].astype(q.dtype)


def splash_attention(q, k, v, runs, *, scale: float, plan) -> jax.Array:
    """q (b, T, n_h, d), k/v (b, T, n_kv, d), runs (b, T) document-run index → (b, T, n_h, d); on the current
    mesh (if any) rows and heads stay where `plan`'s rules put them."""
    mesh = current_mesh()
    platform = mesh.abstract_device.platform if mesh is not None else jax.default_backend()
    local = functools.partial(_rows, scale=scale, interpret=platform == "cpu")
    if mesh is None:
        return local(q, k, v, runs)
    rows = plan.batch_axes(mesh)
    heads = plan.axes("heads", mesh)
    shards = axes_size(mesh, heads)
    if q.shape[2] % shards or k.shape[2] % shards:  # query heads must stay with their key/value head
        heads = ()
    row_spec = rows or None
    qkv = PartitionSpec(row_spec, None, heads or None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(row_spec, None)),
                         out_specs=qkv, check_vma=False)(q, k, v, runs)
