"""Feed-forward blocks: the shared (or dense) SwiGLU MLP and the top-k routed mixture of experts.

Routed experts are computed as a *grouped matmul* over token copies sorted by expert: every expert multiplies
only the tokens routed to it, with no per-expert Python loop and no dense all-experts compute. Two
implementations of the grouped matmul compute the same thing:

- `ragged_dot`: `jax.lax.ragged_dot`, lowered by XLA. Its weight gradient (a matmul whose contracted rows are
  grouped) the TPU compiler lowers densely over the experts: every expert's gradient contracts every row, the
  rows of the other experts masked (E x the useful work; benchmarks/RESULTS.md).
- `megablox`: the Pallas TPU grouped-matmul kernels shipped with JAX (`gmm`, and `tgmm` for the weight
  gradient: each expert contracts only its own rows), the TPU default. On CPU they run in Pallas' interpret
  mode (tests only: slow).
- `tiled`: groups padded to tiles of `tile` rows, one `lax.scan` step per tile multiplying by that tile's
  expert. The CPU default: XLA:CPU lowers `ragged_dot` densely over all experts (about 6x slower here at 8
  experts).
- `pallas_gpu`: the same tiles, multiplied by Pallas Triton kernels (`pallas_grouped_matmul.py`): one launch
  over every (tile, output block), tiles without rows skipped. The GPU default: XLA's GPU compiler also lowers
  `ragged_dot` into one dense matmul over every expert (for a granite-4.0-h-tiny expert projection at 8K tokens:
  64x the routed FLOPs, 27 GiB of temporaries for its gradient), and `tiled` runs its tiles one after another
  (1.17x the routed FLOPs, every tile of the static bound executed); the kernels execute the used tiles only
  (at most 1.17x, ~1.08x with even routing) in one launch each (benchmarks/RESULTS.md, "GPU kernels").
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.config import MOE_IMPLS
from granite_jax.model.linear import make_linear
from granite_jax.model.pallas_grouped_matmul import TileGroups, tile_matmul
from granite_jax.parallel.expert import expert_parallel_moe
from granite_jax.parallel.permute import move_rows, sort_by
from granite_jax.parallel.plan import current_mesh, logical_param, target_platform


class RouterStats(NamedTuple):
    """Per-expert sums over the (unmasked) tokens of one MoE layer, for the load-balancing loss."""

    assignments: jax.Array  # (E,) number of (token, slot) pairs routed to each expert
    probabilities: jax.Array  # (E,) sum over tokens of softmax(router logits)
    tokens: jax.Array  # () number of tokens counted
    dropped: jax.Array  # () (token, slot) copies dropped by expert parallelism's capacity (0 when dropless)

    @classmethod
    def zeros(cls, num_experts: int) -> RouterStats:
        """Nothing counted: the start of a sum over layers or over token chunks."""
        return cls(*(jnp.zeros(shape, jnp.float32) for shape in [(num_experts,), (num_experts,), (), ()]))


class Routing(NamedTuple):
    """Where each token goes: its top-k experts and their gates, and the router statistics."""

    experts: jax.Array  # (n, k) int, each token's experts, best first
    gates: jax.Array  # (n, k) softmax over the k selected logits, in the compute dtype
    stats: RouterStats


def route(tokens: jax.Array, router_kernel: jax.Array, *, top_k: int, token_weight: jax.Array) -> Routing:
    """Router logits (float32) -> top-k experts and softmax gates, and the statistics of the tokens whose
    `token_weight` (n,) is 1 (padding: 0). tokens (n, H) in the compute dtype; router_kernel (H, E)."""
    logits = (tokens @ router_kernel.astype(tokens.dtype)).astype(jnp.float32)      # (n, E)
    top_logits, experts = jax.lax.top_k(logits, top_k)                              # (n, k)
    gates = jax.nn.softmax(top_logits, axis=-1).astype(tokens.dtype)
    # transformers takes the top-k of the softmax for the statistics; same choice as top-k of the logits.
    stats = RouterStats(
        assignments=jnp.zeros((logits.shape[1],), jnp.float32).at[experts.reshape(-1)].add(
            jnp.repeat(token_weight, top_k)),
        probabilities=jnp.sum(jax.nn.softmax(logits, axis=-1) * token_weight[:, None], axis=0),
        tokens=jnp.sum(token_weight),
        dropped=jnp.zeros((), jnp.float32))
    return Routing(experts, gates, stats)


def combine(expert_out: jax.Array, gates: jax.Array) -> jax.Array:
    """Every token's expert outputs (n k, H) in (token, slot) order, weighted by its gates (n, k): (n, H)."""
    n, k = gates.shape
    return jnp.einsum("nkh,nk->nh", expert_out.reshape(n, k, -1), gates)


def routed_experts(tokens, token_weight, router_kernel, *, top_k: int, dispatch) -> tuple[jax.Array, RouterStats]:
    """The routed half of the MoE: route the tokens (n, H), send every (token, slot) copy through its expert,
    combine with the gates. `dispatch(tokens, experts (n k,))` returns the copies' expert outputs (n k, H)
    in (token, slot) order and which copies were kept (n k,) (expert parallelism's capacity may drop some).
    Returns (out (n, H), RouterStats with the dropped copies counted)."""
    with jax.named_scope("router"):
        routing = route(tokens, router_kernel, top_k=top_k, token_weight=token_weight)
    with jax.named_scope("experts"):
        expert_out, kept = dispatch(tokens, routing.experts.reshape(-1))
    dropped = jnp.sum(jnp.where(kept, 0.0, jnp.repeat(token_weight, top_k)))
    with jax.named_scope("combine"):
        return combine(expert_out, routing.gates), routing.stats._replace(dropped=dropped)


def grouped_swiglu(rows, group_sizes, w_in, w_out, *, grouped_matmul):
    """The experts' SwiGLU on rows sorted by expert: rows (M, H), group_sizes (E,) (rows past the groups are
    zero in the result), w_in (E, H, 2I) = [gate | up], w_out (E, I, H) in the rows' dtype. Returns (M, H)."""
    gate, up = jnp.split(grouped_matmul(rows, w_in, group_sizes), 2, axis=-1)
    return grouped_matmul(jax.nn.silu(gate) * up, w_out, group_sizes)


def load_balancing_loss(stats: RouterStats, num_experts: int) -> jax.Array:
    """Switch-style aux loss, accumulated over layers exactly as transformers' `load_balancing_loss_func`:
    E * sum_e (assignments_e / tokens) * (probabilities_e / tokens), with every sum taken over all layers."""
    tokens = jnp.maximum(stats.tokens, 1.0)
    return num_experts * jnp.sum((stats.assignments / tokens) * (stats.probabilities / tokens))


def _resolve_impl(impl: str, platform: str | None = None) -> str:
    """`auto`: `megablox` on TPU, `pallas_gpu` on GPU, `tiled` elsewhere (CPU); `platform` is the target's (a
    dry run compiles for TPU or GPU devices from a CPU host), by default the current mesh's (else JAX's backend)."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"grouped matmul impl={impl!r}; expected one of {MOE_IMPLS}")
    if impl == "auto":
        return {"tpu": "megablox", "gpu": "pallas_gpu"}.get(platform or target_platform(), "tiled")
    return impl


def _grouped_rows(x, group_sizes) -> jax.Array:
    """(M, 1): True for the rows of `x` inside the groups (an exchange buffer's empty rows come after them)."""
    return (jnp.arange(x.shape[0]) < jnp.sum(group_sizes))[:, None]


def _megablox_grouped_matmul(x, weights, group_sizes, *, interpret: bool):
    """`jax.experimental.pallas.ops.tpu.megablox.gmm` (differentiable: gmm for the input gradient, tgmm for the
    weights'), in row tiles of up to 128 (x is padded to a whole number of them). The kernels leave the rows
    past the groups unwritten: they are selected to zero, in the output and (through the select on x) in the
    input gradient."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    M, K = x.shape
    N = weights.shape[2]
    grouped = _grouped_rows(x, group_sizes)
    x = jnp.where(grouped, x, 0)
    tile_m = min(128, -(-M // 8) * 8)
    padded = -(-M // tile_m) * tile_m
    if padded != M:
        x = jnp.pad(x, ((0, padded - M), (0, 0)))
    tiling = (tile_m, min(K, 512), min(N, 512))
    out = gmm(x, weights, group_sizes.astype(jnp.int32), x.dtype, tiling, None, None, False, interpret)
    return jnp.where(grouped, out[:M], 0)


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


def _tiled_grouped_matmul(x, weights, group_sizes, tile: int, *, kernels: bool = False, interpret: bool = False):
    """x (M, K) rows sorted by group; weights (E, K, N); group_sizes (E,) summing to at most M (rows past the
    groups are zero in the result). Returns (M, N). Each group's rows padded to whole tiles of `tile` rows, the
    tiles multiplied by their group's weights: one `lax.scan` step per tile, or (`kernels`) the Pallas Triton
    kernels of `pallas_grouped_matmul.py`, one launch over all tiles."""
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
    tiles = move_rows(x, source[:, None], dest[:, None]).reshape(n_tiles, tile, K)
    tile_group = jnp.searchsorted(padded_starts + padded_sizes, jnp.arange(n_tiles) * tile, side="right")
    tile_group = jnp.minimum(tile_group, E - 1)                   # trailing empty tiles: any expert, discarded
    if kernels:
        first = jnp.concatenate([padded_starts, jnp.sum(padded_sizes, keepdims=True)]) // tile
        groups = TileGroups(tile_group.astype(jnp.int32), first.astype(jnp.int32), first[-1].astype(jnp.int32))
        out = tile_matmul(tiles, weights, groups, interpret)
    else:
        out = _per_tile_matmul(tiles, weights, tile_group)
    return move_rows(out.reshape(n_tiles * tile, -1), dest[:, None], source[:, None])


def grouped_matmul(x, weights, group_sizes, *, impl: str = "auto", tile: int = 128, platform: str | None = None):
    """Multiply each contiguous group of rows of `x` by its group's weight matrix. Rows past the last group
    (`group_sizes` may sum to less than len(x): an exchange buffer's empty rows) cost no matmul and are zero."""
    x, weights = jnp.asarray(x), jnp.asarray(weights)
    platform = platform or target_platform()
    impl = _resolve_impl(impl, platform)
    # Pallas kernels in interpret mode only when compiling for CPU: a dry run traces on a CPU host for TPU or
    # GPU devices, and must compile the real kernels (interpreted, they lower to XLA loops)
    interpret = platform == "cpu"
    if impl == "megablox":
        return _megablox_grouped_matmul(x, weights, group_sizes, interpret=interpret)
    if impl == "ragged_dot":
        out = jax.lax.ragged_dot(x, weights, group_sizes)
        return jnp.where(_grouped_rows(x, group_sizes), out, 0)  # ragged_dot leaves them undocumented
    return _tiled_grouped_matmul(x, weights, group_sizes, tile, kernels=impl == "pallas_gpu", interpret=interpret)


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
        self.plan = config.sharding
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
        tokens = u.reshape(b * T, H).astype(self.dtype)
        weight = jnp.ones((b * T,), jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
        moe = functools.partial(routed_experts, top_k=self.top_k)
        w_in, w_out = self.input_linear[...], self.output_linear[...]
        mesh = current_mesh()
        if mesh is None:
            impl = self.grouped_matmul_impl
            dispatch = functools.partial(self._dispatch_locally, w_in=w_in, w_out=w_out, impl=impl)
            out, stats = moe(tokens, weight, self.router.kernel[...], dispatch=dispatch)
        else:  # each device routes its own tokens; they travel to the experts' devices (parallel/expert.py)
            impl = _resolve_impl(self.grouped_matmul_impl, mesh.abstract_device.platform)
            out, stats = expert_parallel_moe(self.plan, mesh, tokens, weight, self.router.kernel[...], w_in, w_out,
                                             moe=moe, run_experts=functools.partial(self._run_experts, impl=impl))
        return out.reshape(b, T, H), stats

    def _dispatch_locally(self, tokens, experts, *, w_in, w_out, impl: str):
        """All experts are here: the n k copies sorted by expert (gathered straight from the tokens), through
        the experts, back to (token, slot) order. Nothing is dropped."""
        order, position = sort_by(experts)
        rows = move_rows(tokens, (order // self.top_k)[:, None], position.reshape(-1, self.top_k))
        sizes = jnp.bincount(experts, length=self.num_experts).astype(jnp.int32)
        out = self._swiglu(rows, sizes, w_in, w_out, impl)
        return move_rows(out, position[:, None], order[:, None]), jnp.ones(experts.shape, bool)

    def _run_experts(self, rows, group, w_in, w_out, *, impl: str):
        """Rows that reached this device's experts, `group` (R,) their local expert (the number of local
        experts for an empty row): sorted by expert, through the experts, unsorted. Empty rows sort last, past
        every group, and cost no matmul."""
        order, position = sort_by(group)
        sizes = jnp.bincount(group, length=w_in.shape[0]).astype(jnp.int32)  # empty rows not counted
        out = self._swiglu(move_rows(rows, order[:, None], position[:, None]), sizes, w_in, w_out, impl)
        return move_rows(out, position[:, None], order[:, None])

    def _swiglu(self, rows, sizes, w_in, w_out, impl):
        return grouped_swiglu(rows, sizes, w_in.astype(self.dtype), w_out.astype(self.dtype),
                              grouped_matmul=functools.partial(grouped_matmul, impl=impl))
