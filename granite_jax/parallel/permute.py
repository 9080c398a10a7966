"""Moving rows between token order and expert order without scatters.

Routing moves (token, slot) copies into expert-sorted order and back. Written as `x.at[i].set(y)` or as a
plain gather, these become scatters in the forward or backward pass: on TPU a scatter of a (rows, hidden)
bf16 array works through u32 buffers of the same size, several per MoE layer. Every move here is a gather
in both passes: the caller supplies the index of the move and of its transpose (both cheap integer maps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """out[i] = Σ_j x[index[i, j]], an index of len(x) standing for a zero row."""
    rows = jnp.take(x, index.reshape(-1), axis=0, mode="fill", fill_value=0)
    rows = rows.reshape(index.shape + x.shape[1:])
    return rows[:, 0] if index.shape[1] == 1 else jnp.sum(rows, axis=1)


@jax.custom_vjp
def move_rows(x: jax.Array, index: jax.Array, transpose_index: jax.Array) -> jax.Array:
    """out[i] = Σ_j x[index[i, j]] (index (m, J); the value len(x) = a zero row), differentiated by the same
    move with `transpose_index` (len(x), J'): for every row r of x, the rows of out that read it (len(out) =
    none). The two maps must describe the same relation; then the backward pass is the exact transpose."""
    return _take_rows(x, index)


def _move_rows_fwd(x, index, transpose_index):
    return _take_rows(x, index), (index, transpose_index)


def _move_rows_bwd(residuals, grad):
    index, transpose_index = residuals
    return _take_rows(grad, transpose_index), None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def inverse_permutation(order: jax.Array) -> jax.Array:
    """inverse[order[i]] = i."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype),
                                               unique_indices=True)


def sort_by(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The stable sort of `keys` (n,) as the pair of maps `move_rows` takes: order (sorted position -> item)
    and position (item -> sorted position)."""
    order = jnp.argsort(keys, stable=True)
    return order, inverse_permutation(order)
