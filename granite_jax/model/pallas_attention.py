"""Causal attention over packed documents with JAX's Pallas kernels (`attention_impl`).

The same function as `flash.flash_attention` — a query sees the keys at or before it in its own document,
grouped-query heads — computed by a kernel shipped with JAX, given a causal mask and the rows' document runs
as segment ids, forward and backward as Pallas kernels:
- `splash` (TPU): `jax.experimental.pallas.ops.tpu.splash_attention`; blocks the mask leaves empty are skipped,
  key/value heads are grouped natively.
- `pallas_gpu` (GPU, Triton): `jax.experimental.pallas.ops.gpu.attention.mha`; every key block up to the
  diagonal is visited (no skipping of other documents' blocks), and key/value heads are repeated to the query
  heads (the kernel has no grouped heads).
On CPU both run in Pallas' interpret mode (tests only: slow).

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

from granite_jax.parallel.plan import current_mesh, target_platform

_BLOCK = 512  # the splash kernel's query / key block (smaller rows: the row, rounded up to a multiple of 128)
_GPU_BLOCK = 128  # the Triton kernel's query / key block (its backward's blocks: 32, as JAX's defaults)
_GPU_WARPS = 8  # JAX picks 4 for heads of 64: its forward then spills 72 bytes per thread on sm_90 (8: none)


def _splash_kernel(n_heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = min(_BLOCK, length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(n_heads)])
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    return lambda q, k, v, runs: kernel(q, k, v, segment_ids=splash.SegmentIds(q=runs, kv=runs))


def _splash_rows(q, k, v, runs, *, scale: float, interpret: bool):
    """The splash kernel on one device's rows (the kernel's layout: heads before time, one row at a time)."""
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    kernel = _splash_kernel(q.shape[2], q.shape[1], interpret)
    out = jax.vmap(kernel)(heads_first(q * scale), heads_first(k), heads_first(v), runs)
    return heads_first(out)


def _gpu_rows(q, k, v, runs, *, scale: float, interpret: bool):
    """The Triton kernel on one device's rows (its layout: (b, T, heads, d), as ours; heads not grouped)."""
    from jax.experimental.pallas.ops.gpu import attention

    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    block = min(_GPU_BLOCK, q.shape[1])
    sizes = attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=32, block_kv_dkv=32, block_q_dq=32,
                                 block_kv_dq=32)
    return attention.mha(q, k, v, runs, sm_scale=scale, causal=True, block_sizes=sizes, num_warps=_GPU_WARPS,
                         interpret=interpret)


_KERNELS = {"splash": (_splash_rows, 128), "pallas_gpu": (_gpu_rows, _GPU_BLOCK)}  # (rows -> out, length multiple)


def _padded(rows_fn, multiple: int, q, k, v, runs, **kwargs):
    """Pad the rows to a multiple of the kernel's block (the padding is its own document run: it neither sees
    nor is seen by real tokens), run the kernel, cut the padding off."""
    T = q.shape[1]
    pad = -T % multiple
    if pad:
        pad_time = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v = pad_time(q), pad_time(k), pad_time(v)
        runs = jnp.pad(runs, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max)
    return rows_fn(q, k, v, runs.astype(jnp.int32), **kwargs)[:, :T].astype(q.dtype)


def pallas_attention(q, k, v, runs, *, impl: str, scale: float, plan) -> jax.Array:
    """q (b, T, n_h, d), k/v (b, T, n_kv, d), runs (b, T) document-run index → (b, T, n_h, d), by the kernel
    `impl` ("splash" or "pallas_gpu"); on the current mesh (if any) rows and heads stay where `plan`'s rules
    put them."""
    mesh = current_mesh()
    rows_fn, multiple = _KERNELS[impl]
    local = functools.partial(_padded, rows_fn, multiple, scale=scale, interpret=target_platform() == "cpu")
    if mesh is None:
        return local(q, k, v, runs)
    rows, heads = plan.kernel_axes(mesh, "heads", q.shape[2], k.shape[2])
    qkv = PartitionSpec(rows, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(rows, None)),
                         out_specs=qkv, check_vma=False)(q, k, v, runs)
