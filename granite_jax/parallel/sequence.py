"""Sequence (context) parallelism: how a long row's pieces sit on the devices of the sequence axis, and the
collectives a piece needs from the pieces before it.

Layouts (`ShardingPlan.context_layout`): with N shards, `contiguous` cuts a row into N pieces and gives shard r
piece r; `zigzag` cuts it into 2N pieces and gives shard r pieces r and 2N-1-r, so that each shard holds an
early and a late piece and causal attention's work is balanced over the shards. The data path puts every
per-token array into the layout once (`layout_order`); inside `shard_map` a shard's local row is its pieces
side by side, and the functions below work on (pieces, b, ...) stacks of them.

None of the collectives moves anything proportional to the sequence length:
- `from_previous_piece`: for each piece, the last rows of the piece before it in the row (the causal conv's
  halo, the last segment id); the row's first piece receives zeros. ppermutes between neighbouring shards.
- `entering_states`: a recurrence's state entering each piece, from every piece's affine summary
  S_out = decay · S_in + state (an all-gather of the summaries and an exclusive scan in row order, reset where
  a document starts exactly at a piece boundary).

Their gradients are JAX's transposes (ppermute backwards, all-gather's reduce-scatter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "zigzag")


def pieces_per_shard(layout: str) -> int:
    return {"contiguous": 1, "zigzag": 2}[layout]


def piece_index(layout: str, shard, local: int, shards: int):
    """The position in the row (0 .. N·pieces - 1) of shard `shard`'s `local`-th piece (shard may be traced)."""
    if layout == "contiguous":
        return shard
    return shard if local == 0 else 2 * shards - 1 - shard


def layout_order(length: int, shards: int, layout: str) -> np.ndarray:
    """Token indices of a row of `length` tokens in layout order: row[layout_order(...)] puts shard r's pieces
    at its contiguous slice r. The identity for `contiguous`."""
    pieces = shards * pieces_per_shard(layout)
    piece = length // pieces
    order = [piece_index(layout, r, local, shards) for r in range(shards) for local in range(pieces_per_shard(layout))]
    return np.concatenate([np.arange(p * piece, (p + 1) * piece) for p in order])


def to_pieces(x: jax.Array, layout: str) -> jax.Array:
    """A shard's local rows (b, T_local, ...) → (pieces, b, T_local / pieces, ...)."""
    n = pieces_per_shard(layout)
    b, T = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n, T // n, *x.shape[2:]), 1, 0)


def from_pieces(x: jax.Array) -> jax.Array:
    """The inverse of `to_pieces`: (pieces, b, L, ...) → (b, pieces · L, ...)."""
    n, b, L = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * L, *x.shape[3:])


def pieces_as_rows(x: jax.Array) -> jax.Array:
    """(pieces, b, ...) → (pieces · b, ...): each local piece one row, for functions of whole rows."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def rows_as_pieces(x: jax.Array, pieces: int) -> jax.Array:
    """The inverse of `pieces_as_rows`: (pieces · b, ...) → (pieces, b, ...)."""
    return x.reshape(pieces, x.shape[0] // pieces, *x.shape[1:])


def _shift(x, axis: str, step: int):
    """Shard r receives shard r - step's `x` (zeros where that shard does not exist)."""
    shards = jax.lax.axis_size(axis)
    pairs = [(r, r + step) for r in range(shards) if 0 <= r + step < shards]
    return jax.lax.ppermute(x, axis, perm=pairs)


def from_previous_piece(x, axis: str, layout: str):
    """x (pieces, ...) holds something of each local piece (a pytree of such arrays); returns, for each local
    piece, the same thing of the piece before it in the row (zeros for the row's first piece)."""
    if layout == "contiguous":
        return jax.tree.map(lambda a: _shift(a, axis, 1), x)
    last = jax.lax.axis_index(axis) == jax.lax.axis_size(axis) - 1

    def previous(a):
        before_first = _shift(a[0], axis, 1)          # piece r - 1 is shard r - 1's first piece
        before_second = _shift(a[1], axis, -1)        # piece 2N - 2 - r is shard r + 1's second piece ...
        before_second = jnp.where(last, a[0], before_second)  # ... or, on the last shard, its own first piece
        return jnp.stack([before_first, before_second])

    return jax.tree.map(previous, x)


def has_previous_piece(axis: str, layout: str) -> jax.Array:
    """(pieces,) whether each local piece has a piece before it in the row (all but the row's first)."""
    shard = jax.lax.axis_index(axis)
    return jnp.stack([piece_index(layout, shard, local, jax.lax.axis_size(axis)) > 0
                      for local in range(pieces_per_shard(layout))])


def continues_previous_piece(segment_ids: jax.Array, axis: str, layout: str) -> jax.Array:
    """segment_ids (pieces, b, L) of this shard's pieces: whether each piece's first token continues the
    document of the previous piece's last token (pieces, b). Segment ids are the data's, comparable across
    pieces (document runs counted per piece are not); the row's first piece continues nothing."""
    previous_last = from_previous_piece(segment_ids[:, :, -1], axis, layout)
    return has_previous_piece(axis, layout)[:, None] & (segment_ids[:, :, 0] == previous_last)


def entering_states(decay: jax.Array, state: jax.Array, continues: jax.Array, axis: str, layout: str) -> jax.Array:
    """The state entering each local piece. decay (pieces, b, H) and state (pieces, b, H, ...) summarise each
    piece (S_out = decay · S_in + state, decay 0 when a document starts inside it); continues (pieces, b) says
    whether the piece's first token continues the document of the previous piece's last token (False for the
    row's first piece). Returns (pieces, b, H, ...) float32: Σ over the earlier pieces q of the same document
    of state_q times the decays of the pieces between."""
    shards = jax.lax.axis_size(axis)
    n = pieces_per_shard(layout)
    gathered = jax.lax.all_gather((decay, state, continues), axis)   # (shards, pieces, b, ...)
    # Row order: position p of the row is shard s's local piece l; flat index s·n + l.
    flat_index = np.zeros(shards * n, np.int32)
    for s in range(shards):
        for local in range(n):
            flat_index[piece_index(layout, s, local, shards)] = s * n + local
    decays, states, continuing = (jnp.take(a.reshape(shards * n, *a.shape[2:]), flat_index, axis=0)
                                  for a in gathered)
    expand = (...,) + (None,) * (state.ndim - decay.ndim)

    def next_piece(entering, summary):
        decay_p, state_p, next_continues = summary
        leaving = decay_p[expand] * entering + state_p
        return jnp.where(next_continues.reshape(next_continues.shape + (1,) * (state.ndim - 2)), leaving, 0.0), entering

    next_continuing = jnp.roll(continuing, -1, axis=0)  # the last piece's entry is never used
    zero = jax.lax.pcast(jnp.zeros(state.shape[1:], jnp.float32), (axis,), to="varying")  # varies like the carry
    _, entering = jax.lax.scan(next_piece, zero,
                               (decays.astype(jnp.float32), states.astype(jnp.float32), next_continuing))
    shard = jax.lax.axis_index(axis)
    return jnp.stack([jax.lax.dynamic_index_in_dim(entering, piece_index(layout, shard, local, shards), axis=0,
                                                   keepdims=False) for local in range(n)])


def causal_attention_work(length: int, shards: int, layout: str, block: int) -> np.ndarray:
    """(shards,) the (query block, key block) pairs each shard's causal attention visits for a row holding one
    document of `length` tokens (what `model/flash.py` computes: a query block sees the key blocks from the
    document's start to its diagonal). For contiguous pieces the last shard does most of the work; zigzag pieces
    pair an early piece with a late one."""
    blocks_per_shard = length // shards // block
    query_blocks = layout_order(length // block, shards, layout).reshape(shards, blocks_per_shard)
    return (query_blocks + 1).sum(axis=1)
