"""Feed-forward blocks: the shared (or dense) SwiGLU MLP and the top-k routed mixture of experts.

Routed experts are computed as a *grouped matmul* over token copies sorted by expert: every expert multiplies
only the tokens routed to it, with no per-expert Python loop and no dense all-experts compute. Two
implementations of the grouped matmul compute the same thing:

- `ragged_dot`: `jax.lax.ragged_dot`, lowered to grouped GEMM kernels on GPU and TPU;
- `tiled`: groups padded to tiles of `tile` rows, one `lax.scan` step per tile multiplying by that tile's
  expert. XLA:CPU lowers `ragged_dot` densely over all experts (about 6x slower here at 8 experts), so this is
  the CPU default.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.config import MOE_IMPLS
from granite_jax.model.linear import make_linear
from granite_jax.model.permute import inverse_permutation, move_rows
from granite_jax.parallel import logical_param
from granite_jax.parallel.context import active as parallelism_setting
from granite_jax.parallel.expert import expert_parallel_moe



class RouterStats(NamedTuple):
    """Per-expert sums over the (unmasked) tokens of one MoE layer, for the load-balancing loss."""

    assignments: jax.Array  # (E,) number of (token, slot) pairs routed to each expert
    probabilities: jax.Array  # (E,) sum over tokens of softmax(router logits)
    tokens: jax.Array  # () number of tokens counted
    dropped: jax.Array  # () (token, slot) copies dropped by expert parallelism's capacity (0 when dropless)


def load_balancing_loss(stats: RouterStats, num_experts: int) -> jax.Array:
    """Switch-style aux loss, accumulated over layers exactly as transformers' `load_balancing_loss_func`:
    E * sum_e (assignments_e / tokens) * (probabilities_e / tokens), with every sum taken over all layers."""
    tokens = jnp.maximum(stats.tokens, 1.0)
    return num_experts * jnp.sum((stats.assignments / tokens) * (stats.probabilities / tokens))


def _resolve_impl(impl: str, platform: str | None = None) -> str:
    """`auto`: `tiled` on CPU, `ragged_dot` on accelerators; `platform` is the target's (a dry run compiles
    for TPU devices from a CPU host), by default JAX's default backend."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"grouped matmul impl={impl!r}; expected one of {MOE_IMPLS}")
    if impl == "auto":
        return "tiled" if (platform or jax.default_backend()) == "cpu" else "ragged_dot"
    return impl


@jax.custom_vjp
def _per_tile_matmul(tiles, weights, tile_group):
    """tiles (n, m, K) @ weights[tile_group] (n, K, N) -> (n, m, N), one `lax.scan` step per tile.

    A hand-written VJP: autodiff of the scan would keep every tile's (K, N) weight slice as a residual, an
    (n, K, N) stack per matmul and layer; here the backward pass slices the weights again and accumulates the
    weight gradient in place in an (E, K, N) carry.
    """
    def one_tile(_, inputs):
        rows, group = inputs
        return None, rows @ weights[group]

    return jax.lax.scan(one_tile, None, (tiles, tile_group))[1]


def _per_tile_matmul_fwd(tiles, weights, tile_group):
    return _per_tile_matmul(tiles, weights, tile_group), (tiles, weights, tile_group)


def _per_tile_matmul_bwd(residuals, grad):
    tiles, weights, tile_group = residuals

    def one_tile(d_weights, inputs):
        rows, g, group = inputs
        d_weights = d_weights.at[group].add(rows.T @ g)
        return d_weights, g @ weights[group].T

    d_weights, d_tiles = jax.lax.scan(one_tile, jnp.zeros_like(weights), (tiles, grad, tile_group))
    return d_tiles, d_weights, None


_per_tile_matmul.defvjp(_per_tile_matmul_fwd, _per_tile_matmul_bwd)


def _tiled_grouped_matmul(x, weights, group_sizes, tile: int):
    """x (M, K) rows sorted by group; weights (E, K, N); group_sizes (E,) summing to at most M (rows past the
    groups are zero in the result). Returns (M, N)."""
    M, K = x.shape
    E = weights.shape[0]
    n_tiles = -(-M // tile) + E                                   # static bound: each group wastes < 1 tile
    padded_sizes = -(-group_sizes // tile) * tile
    padded_starts = jnp.cumsum(padded_sizes) - padded_sizes
    starts = jnp.cumsum(group_sizes) - group_sizes
    group_of_row = jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=M)
    rows = jnp.arange(M)
    dest = jnp.where(rows < jnp.sum(group_sizes), padded_starts[group_of_row] + rows - starts[group_of_row],
                     n_tiles * tile + rows)                       # (M,) buffer row of x's row; past the end: none
    source = jnp.full((n_tiles * tile,), M, jnp.int32).at[dest].set(rows.astype(jnp.int32), mode="drop",
                                                                     unique_indices=True)  # M: padding
    buffer = move_rows(x, source[:, None], dest[:, None])
    tile_group = jnp.searchsorted(padded_starts + padded_sizes, jnp.arange(n_tiles) * tile, side="right")
    tile_group = jnp.minimum(tile_group, E - 1)                   # trailing empty tiles: any expert, discarded
    out = _per_tile_matmul(buffer.reshape(n_tiles, tile, K), weights, tile_group).reshape(n_tiles * tile, -1)
    return move_rows(out, dest[:, None], source[:, None])


def grouped_matmul(x, weights, group_sizes, *, impl: str = "auto", tile: int = 128, platform: str | None = None):
    """Multiply each contiguous group of rows of `x` by its group's weight matrix. Rows past the last group
    (`group_sizes` may sum to less than len(x): an exchange buffer's empty rows) cost no matmul and are zero."""
    x, weights = jnp.asarray(x), jnp.asarray(weights)
    if _resolve_impl(impl, platform) == "ragged_dot":
        out = jax.lax.ragged_dot(x, weights, group_sizes)
        # ragged_dot does not document the rows past the groups: make them zero
        return jnp.where((jnp.arange(x.shape[0]) < jnp.sum(group_sizes))[:, None], out, 0)
    return _tiled_grouped_matmul(x, weights, group_sizes, tile)


class SharedMLP(nnx.Module):
    """SwiGLU MLP `(silu(gate) * up) W_out` with fused [gate | up] input weights. The always-on shared expert,
    and the whole FFN of a dense model."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        H, width = config.hidden_size, config.shared_intermediate_size
        self.input_linear = make_linear(config, H, 2 * width, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.output_linear = make_linear(config, width, H, ("mlp", "embed"), use_bias=False, rngs=rngs)

    def __call__(self, u: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.input_linear(u), 2, axis=-1)
        return self.output_linear(jax.nn.silu(gate) * up)


class MoE(nnx.Module):
    """Top-k routed experts (`block_sparse_moe`): softmax over the k selected router logits, dropless."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.dtype = config.compute_dtype
        self.grouped_matmul_impl = config.moe_impl
        self.router = make_linear(config, H, E, ("embed", None), use_bias=False, rngs=rngs)
        init = nnx.initializers.normal(config.initializer_range)
        # Expert weights in matmul layout (in, out): input_linear (E, H, 2I) = [gate | up], output_linear (E, I, H).
        self.input_linear = logical_param(init(rngs.params(), (E, H, 2 * I), config.param_dtype),
                                          ("expert", "embed", "mlp"))
        self.output_linear = logical_param(init(rngs.params(), (E, I, H), config.param_dtype),
                                           ("expert", "mlp", "embed"))

    def __call__(self, u: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, RouterStats]:
        """u (b, T, H); token_mask (b, T), False for padding (excluded from the router statistics)."""
        b, T, H = u.shape
        E, k = self.num_experts, self.top_k
        tokens = u.reshape(b * T, H)
        weight = jnp.ones((b * T,), jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
        setting = parallelism_setting()
        if setting is not None:  # tokens travel to the experts' devices (granite_jax/parallel/expert.py)
            out, stats = expert_parallel_moe(
                setting, tokens, self.router.kernel[...], self.input_linear[...], self.output_linear[...], top_k=k,
                dtype=self.dtype, token_weight=weight,
                grouped_matmul=functools.partial(grouped_matmul, impl=self.grouped_matmul_impl,
                                                 platform=setting.mesh.devices.flat[0].platform))
            return out.reshape(b, T, H), RouterStats(*stats)
        logits = self.router(tokens).astype(jnp.float32)                       # (n, E)
        top_logits, top_experts = jax.lax.top_k(logits, k)                     # (n, k)
        gates = jax.nn.softmax(top_logits, axis=-1).astype(self.dtype)

        # Sort the n*k (token, slot) copies by expert, run each expert on its group, and undo the sort.
        flat_experts = top_experts.reshape(-1)
        order = jnp.argsort(flat_experts, stable=True)                          # sorted position -> copy
        position = inverse_permutation(order)                                  # copy -> sorted position
        group_sizes = jnp.bincount(flat_experts, length=E).astype(jnp.int32)
        rows = move_rows(tokens, (order // k)[:, None], position.reshape(b * T, k))
        w_in = self.input_linear[...].astype(self.dtype)
        w_out = self.output_linear[...].astype(self.dtype)
        gate, up = jnp.split(grouped_matmul(rows, w_in, group_sizes, impl=self.grouped_matmul_impl), 2, axis=-1)
        expert_out = grouped_matmul(jax.nn.silu(gate) * up, w_out, group_sizes, impl=self.grouped_matmul_impl)
        expert_out = move_rows(expert_out, position[:, None], order[:, None])     # back to (token, slot) order
        out = jnp.einsum("nkh,nk->nh", expert_out.reshape(b * T, k, H), gates)

        probs = jax.nn.softmax(logits, axis=-1)
        # transformers takes the top-k of the softmax for the statistics; same choice as top-k of the logits.
        stats = RouterStats(
            assignments=jnp.zeros((E,), jnp.float32).at[flat_experts].add(jnp.repeat(weight, k)),
            probabilities=jnp.sum(probs * weight[:, None], axis=0),
            tokens=jnp.sum(weight),
            dropped=jnp.zeros((), jnp.float32),
        )
        return out.reshape(b, T, H), stats
