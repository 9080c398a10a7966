"""The experts' grouped matmul as Pallas Triton kernels (`moe_impl: pallas_gpu`), forward and backward.

The rows arrive as `moe.py` lays them out for `tiled`: sorted by expert, each expert's rows padded to whole
tiles of m rows, so that tile i belongs to one expert g_i. Where `tiled` runs one matmul per tile in a loop,
each product here is one launch over a grid of independent programs:

    forward       out[i]     = tiles[i] @ W[g_i]                    grid (tiles, N blocks), a loop over K blocks
    input grad    d_tiles[i] = grad[i] @ W[g_i]ᵀ                    grid (tiles, K blocks), a loop over N blocks
    weight grad   dW[e]      = Σ_{i : g_i = e} tiles[i]ᵀ grad[i]     grid (experts, K blocks, N blocks), a loop
                                                                    over expert e's tiles (consecutive)

Tiles past the used ones (`used`, traced: the padded groups' total) are skipped: their output is zero and
they cost no matmul. Operands stay in their dtype (bf16 in training), products accumulate in float32. The
executed matmul FLOPs are those of the used tiles: the routed rows plus under one tile of padding per expert.

Block sizes, from the GPU compiler for sm_90 (tests/test_gpu_kernels.py reads them with ptxas): 128-wide
output blocks, 64-deep inner blocks, 8 warps. On CPU the kernels run in Pallas' interpret mode (tests);
they have not run on a GPU.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_F32 = jnp.float32
_OUT_BLOCK = 128
_INNER_BLOCK = 64
_NUM_WARPS = 8


class TileGroups(NamedTuple):
    """Which expert each tile belongs to: group (n,) int32; first (E + 1,) int32, the first tile of each expert
    (first[E] = the used tiles' count); used () int32, how many tiles hold rows (the rest are skipped)."""

    group: jax.Array
    first: jax.Array
    used: jax.Array


def _block(size: int, preferred: int) -> int:
    """The largest block ≤ `preferred` that divides `size` (a power of two for the dimensions of Granite's
    experts)."""
    return math.gcd(size, preferred)


def _compiler_params():
    from jax.experimental.pallas import triton as pallas_triton

    return pallas_triton.CompilerParams(num_warps=_NUM_WARPS, num_stages=2)


def _tile_product_kernel(group_ref, used_ref, a_ref, w_ref, out_ref, *, transpose: bool, inner: int):
    """out block (m, o) of tile i = a[i] @ W[g_i] (or @ W[g_i]ᵀ), the contraction in blocks of `inner`."""
    i, j = pl.program_id(0), pl.program_id(1)
    m, o = out_ref.shape
    contracted = a_ref.shape[-1]

    @pl.when(i >= used_ref[0])
    def _():
        out_ref[...] = jnp.zeros((m, o), out_ref.dtype)

    @pl.when(i < used_ref[0])
    def _():
        g = group_ref[i]
        outputs = pl.ds(j * o, o)

        def step(c, acc):
            window = pl.ds(c * inner, inner)
            a = a_ref[:, window]
            if transpose:
                w = w_ref[g, outputs, window]                                   # (o, inner) of W[g] (K, N)
                return acc + jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
            return acc + jnp.dot(a, w_ref[g, window, outputs], preferred_element_type=_F32)

        acc = jax.lax.fori_loop(0, contracted // inner, step, jnp.zeros((m, o), _F32))
        out_ref[...] = acc.astype(out_ref.dtype)


def _tile_products(a, weights, groups: TileGroups, *, transpose: bool, interpret: bool):
    """a (n, m, C) tiles times their experts' weights (E, K, N): (n, m, N) (C = K), or with the weights
    transposed (n, m, K) (C = N)."""
    n, m, C = a.shape
    out_size = weights.shape[1] if transpose else weights.shape[2]
    o, inner = _block(out_size, _OUT_BLOCK), _block(C, _INNER_BLOCK)
    kernel = functools.partial(_tile_product_kernel, transpose=transpose, inner=inner)
    return pl.pallas_call(
        kernel, grid=(n, out_size // o),
        in_specs=[pl.no_block_spec, pl.no_block_spec, pl.BlockSpec((None, m, C), lambda i, j: (i, 0, 0)),
                  pl.no_block_spec],
        out_specs=pl.BlockSpec((None, m, o), lambda i, j: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((n, m, out_size), a.dtype),
        compiler_params=None if interpret else _compiler_params(), interpret=interpret,
        name="grouped_matmul_input_grad" if transpose else "grouped_matmul",
    )(groups.group, groups.used.reshape(1), a, weights)


def _weight_grad_kernel(first_ref, tiles_ref, grad_ref, out_ref):
    """dW block (k, o) of expert e = Σ over e's tiles of tiles[i]ᵀ grad[i], those blocks of them."""
    e, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, o = out_ref.shape
    rows, outputs = pl.ds(a * k, k), pl.ds(b * o, o)

    def step(i, acc):
        x = tiles_ref[i, :, rows]                                                  # (m, k)
        g = grad_ref[i, :, outputs]                                                # (m, o)
        return acc + jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=_F32)

    acc = jax.lax.fori_loop(first_ref[e], first_ref[e + 1], step, jnp.zeros((k, o), _F32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _weight_grads(tiles, grad, groups: TileGroups, num_experts: int, *, interpret: bool):
    """(E, K, N): each expert's tiles' rows contracted with their gradient rows."""
    _, _, K = tiles.shape
    N = grad.shape[-1]
    k, o = _block(K, _OUT_BLOCK), _block(N, _OUT_BLOCK)
    return pl.pallas_call(
        _weight_grad_kernel, grid=(num_experts, K // k, N // o),
        in_specs=[pl.no_block_spec, pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.BlockSpec((None, k, o), lambda e, a, b: (e, a, b)),
        out_shape=jax.ShapeDtypeStruct((num_experts, K, N), tiles.dtype),  # summed in float32 in the kernel
        compiler_params=None if interpret else _compiler_params(), interpret=interpret,
        name="grouped_matmul_weight_grad",
    )(groups.first, tiles, grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tile_matmul(tiles, weights, groups: TileGroups, interpret: bool):
    """tiles (n, m, K) @ weights[groups.group] (n, K, N) -> (n, m, N) by the Pallas kernels; tiles past
    `groups.used` give zeros."""
    return _tile_products(tiles, weights, groups, transpose=False, interpret=interpret)


def _tile_matmul_fwd(tiles, weights, groups, interpret):
    return tile_matmul(tiles, weights, groups, interpret), (tiles, weights, groups)


def _tile_matmul_bwd(interpret, residuals, grad):
    tiles, weights, groups = residuals
    d_tiles = _tile_products(grad, weights, groups, transpose=True, interpret=interpret)
    d_weights = _weight_grads(tiles, grad, groups, weights.shape[0], interpret=interpret)
    no_gradient = jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), groups)
    return d_tiles, d_weights.astype(weights.dtype), no_gradient


tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)
