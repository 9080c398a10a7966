"""Sequence (context) parallelism's collectives: what a shard of a long row needs from the shards before it.

Called inside `shard_map` over the mesh axis that splits the sequence (`axis`), shard r holding the r-th
contiguous piece of every row. None of these moves anything proportional to the sequence length:

- `from_previous_shard`: the last rows of the previous shard (the causal conv's halo, the last segment id);
  shard 0 receives zeros.
- `entering_states`: a recurrence's state entering each shard, from every shard's affine summary
  S_out = decay · S_in + state (an all-gather of the summaries and an exclusive scan in shard order, reset
  where a document starts exactly at a shard boundary).

Their gradients are JAX's transposes (ppermute backwards, all-gather's reduce-scatter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def from_previous_shard(x: jax.Array, axis: str) -> jax.Array:
    """Shard r receives shard r - 1's `x`; shard 0 receives zeros."""
    shards = jax.lax.axis_size(axis)
    return jax.lax.ppermute(x, axis, perm=[(r, r + 1) for r in range(shards - 1)])


def entering_states(decay: jax.Array, state: jax.Array, continues: jax.Array, axis: str) -> jax.Array:
    """The state entering this shard. decay (b, H) and state (b, H, ...) summarise this shard (S_out = decay ·
    S_in + state, decay 0 when a document starts inside it); continues (b,) says whether this shard's first
    token continues the document of the previous shard's last token (False on shard 0). Returns (b, H, ...)
    float32: shard r's entering state, Σ over the shards q < r of the same document of state_q times the
    decays of the shards between."""
    decays, states, continuing = jax.lax.all_gather((decay, state, continues), axis)   # (shards, b, ...)
    expand = (...,) + (None,) * (state.ndim - decay.ndim)

    def next_shard(entering, summary):
        decay_r, state_r, next_continues = summary
        leaving = decay_r[expand] * entering + state_r
        return jnp.where(next_continues.reshape(next_continues.shape + (1,) * (state.ndim - 1)), leaving, 0.0), entering

    next_continuing = jnp.roll(continuing, -1, axis=0)  # the last shard's entry is never used
    zero = jax.lax.pcast(jnp.zeros(state.shape, jnp.float32), (axis,), to="varying")  # varies like the carry
    _, entering = jax.lax.scan(next_shard, zero,
                               (decays.astype(jnp.float32), states.astype(jnp.float32), next_continuing))
    return jax.lax.dynamic_index_in_dim(entering, jax.lax.axis_index(axis), axis=0, keepdims=False)
