"""Packed-document bookkeeping shared by every layer: which run of equal segment ids a token is in, where that
run starts and ends, and the token's position inside it. A document is a contiguous run of one segment id."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_runs(segment_ids: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """Index of the contiguous document run of each token, 0 for the first run of each row: (b, T) int32."""
    if segment_ids is None:
        return jnp.zeros(shape, jnp.int32)
    starts = jnp.concatenate(
        [jnp.zeros_like(segment_ids[:, :1], dtype=jnp.int32),
         (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)], axis=1)
    return jnp.cumsum(starts, axis=1, dtype=jnp.int32)


def document_bounds(runs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For each token, the index where its document run starts and where it ends (exclusive): (b, T) each."""
    T = runs.shape[1]
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), runs.shape)
    changes = runs[:, 1:] != runs[:, :-1]
    is_start = jnp.concatenate([jnp.ones_like(runs[:, :1], bool), changes], axis=1)
    is_end = jnp.concatenate([changes, jnp.ones_like(runs[:, :1], bool)], axis=1)
    start = jax.lax.cummax(jnp.where(is_start, index, 0), axis=1)
    end = jax.lax.cummin(jnp.where(is_end, index + 1, T), axis=1, reverse=True)
    return start, end


def positions_within_documents(runs: jax.Array) -> jax.Array:
    """Position of each token inside its document run, restarting at 0 at each run: (b, T) int32."""
    start, _ = document_bounds(runs)
    return jnp.arange(runs.shape[1], dtype=jnp.int32) - start
