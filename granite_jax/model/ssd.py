"""Mamba-2 state-space duality (SSD) as pure functions.

Shapes (b = batch, T = time, H = heads, P = head dim, G = B/C groups, N = state size):
    x  (b, T, H, P)   input, *not* multiplied by dt
    dt (b, T, H)      discretisation step Δ (after softplus, bias and clamping), > 0
    A  (H,)           negative decay rate, A = -exp(A_log)
    B, C (b, T, G, N) input / output projections; head h uses group h // (H // G)
    state (b, H, P, N)

Recurrence (per head):  S_t = exp(Δ_t A) S_{t-1} + Δ_t x_t ⊗ B_t ;  y_t = S_t C_t.
The D skip connection is not part of these functions (the mixer adds D·x).

Packed documents. `segment_ids` (b, T) gives each token its document; a document starts wherever the id
changes. The state is reset to zero at every document start, so nothing flows between documents. The optional
`initial_state` is the state entering the row's *first* document (a continuation of a cached prefix); the
returned final state is that of the row's last document. These are the semantics of mamba_ssm's `seq_idx`
(docs/model.md#packed-documents), with document runs derived from changes of id rather than the ids themselves.

Numerics. Everything is float32. Log-decays are accumulated only *within* a chunk (a few hundred terms), and
chunks are chained multiplicatively, so precision does not degrade with sequence length. Masks are applied to
exponents before `exp` (`exp(-inf) = 0`), never after, so no `0 * inf` can appear forward or backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from granite_jax.model.documents import document_runs
from granite_jax.parallel.sequence import (
    continues_previous_piece,
    entering_states,
    from_pieces,
    pieces_as_rows,
    pieces_per_shard,
    rows_as_pieces,
    to_pieces,
)

_F32 = jnp.float32


def _heads_per_group(B: jax.Array, n_heads: int) -> int:
    n_groups = B.shape[-2]
    if n_heads % n_groups:
        raise ValueError(f"number of heads {n_heads} is not divisible by the number of B/C groups {n_groups}")
    return n_heads // n_groups


def _expand_groups(B: jax.Array, n_heads: int) -> jax.Array:
    """(..., G, N) -> (..., H, N): head h reads group h // (H // G)."""
    return jnp.repeat(B, _heads_per_group(B, n_heads), axis=-2)


def ssd_reference(x, dt, A, B, C, *, segment_ids=None, initial_state=None):
    """Token-by-token recurrence: the test oracle. Returns (y (b,T,H,P) float32, final_state (b,H,P,N))."""
    b, T, H, P = x.shape
    N = B.shape[-1]
    runs = document_runs(segment_ids, (b, T))
    resets = jnp.concatenate([jnp.zeros((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)
    Bh, Ch = _expand_groups(B.astype(_F32), H), _expand_groups(C.astype(_F32), H)
    dt = dt.astype(_F32)
    state = jnp.zeros((b, H, P, N), _F32) if initial_state is None else initial_state.astype(_F32)
    hi = jax.lax.Precision.HIGHEST

    def step(state, inputs):
        x_t, dt_t, B_t, C_t, reset_t = inputs
        decay = jnp.where(reset_t[:, None], 0.0, jnp.exp(dt_t * A.astype(_F32)))  # (b, H)
        state = decay[..., None, None] * state + jnp.einsum(
            "bhp,bhn->bhpn", (dt_t[..., None] * x_t), B_t, precision=hi)
        return state, jnp.einsum("bhpn,bhn->bhp", state, C_t, precision=hi)

    time_major = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
    final, ys = jax.lax.scan(
        step, state, (time_major(x.astype(_F32)), time_major(dt), time_major(Bh), time_major(Ch), time_major(resets)))
    return time_major(ys), final


def _pad_time(a: jax.Array, pad: int, mode: str = "constant") -> jax.Array:
    if pad == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[1] = (0, pad)
    return jnp.pad(a, widths, mode=mode)


def ssd_chunked(x, dt, A, B, C, *, chunk_size: int, segment_ids=None, initial_state=None,
                return_decay: bool = False):
    """Chunked SSD: intra-chunk matmuls plus an associative scan of chunk states.

    Works for any T (the tail chunk is padded with steps of decay 1 and input 0, which change nothing).
    Returns (y (b,T,H,P) float32, final_state (b,H,P,N) float32), and with `return_decay` also the row's
    decay (b,H) float32: how much of the entering state reaches the final state, exp(Σ Δ A) over the row, 0
    when a document starts inside it. (decay, final state from a zero entering state) summarise the row as
    the affine map S_out = decay · S_in + final_state, which context parallelism chains across shards.
    """
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    hpg = _heads_per_group(B, H)
    Q = chunk_size
    nc = -(-T // Q)
    pad = nc * Q - T

    runs = _pad_time(document_runs(segment_ids, (b, T)), pad, mode="edge")  # padding continues the last run
    dt = dt.astype(_F32)
    a = _pad_time(dt * A.astype(_F32), pad)                                  # log-decay per step, <= 0
    xdt = _pad_time(x.astype(_F32) * dt[..., None], pad)                     # discretised input
    B = _pad_time(B.astype(_F32), pad)
    C = _pad_time(C.astype(_F32), pad)

    chunks = lambda t: t.reshape(b, nc, Q, *t.shape[2:])  # noqa: E731
    runs, a, B, C = chunks(runs), chunks(a), chunks(B), chunks(C)
    xdt = chunks(xdt).reshape(b, nc, Q, G, hpg, P)
    a_cum = jnp.cumsum(a, axis=2)                                            # chunk-local, (b, nc, Q, H)
    group_heads = lambda t: t.reshape(*t.shape[:-1], G, hpg)  # noqa: E731  (..., H) -> (..., G, hpg)

    # 1. Within each chunk: a causal, decay-weighted "attention" between tokens of the same document.
    same_doc = (runs[:, :, :, None] == runs[:, :, None, :]) & jnp.tril(jnp.ones((Q, Q), bool))
    a_cum_h = jnp.moveaxis(a_cum, 3, 2)                                      # (b, nc, H, Q)
    log_decay = a_cum_h[..., :, None] - a_cum_h[..., None, :]               # (b, nc, H, Q_l, Q_s)
    decay = jnp.exp(jnp.where(same_doc[:, :, None], log_decay, -jnp.inf))
    scores = jnp.einsum("bclgn,bcsgn->bcgls", C, B)                          # (b, nc, G, Q, Q)
    scores = decay.reshape(b, nc, G, hpg, Q, Q) * scores[:, :, :, None]
    y_diag = jnp.einsum("bcgjls,bcsgjp->bclgjp", scores, xdt)

    # 2. The state each chunk hands on, from a zero entering state; only its last document survives the chunk.
    in_last_doc = runs == runs[:, :, -1:]
    to_end = jnp.exp(jnp.where(in_last_doc[..., None], a_cum[:, :, -1:] - a_cum, -jnp.inf))  # (b, nc, Q, H)
    chunk_states = jnp.einsum("bcsgn,bcsgjp->bcgjpn", B, xdt * group_heads(to_end)[..., None])
    chunk_states = chunk_states.reshape(b, nc, H, P, N)

    # 3. Chain the chunks: S_in[c+1] = carry[c] * S_in[c] + chunk_states[c], as an associative scan over
    #    (carry, state) pairs. carry is 0 where a document starts inside the chunk.
    entering_run = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), runs[:, :-1, -1]], axis=1)  # (b, nc)
    continues = runs[:, :, -1] == entering_run
    carry = jnp.where(continues[..., None], jnp.exp(a_cum[:, :, -1]), 0.0)  # (b, nc, H)

    def combine(left, right):
        carry_l, state_l = left
        carry_r, state_r = right
        return carry_l * carry_r, carry_r[..., None, None] * state_l + state_r

    carry_prod, states_out = jax.lax.associative_scan(combine, (carry, chunk_states), axis=1)
    if initial_state is not None:
        states_out = states_out + carry_prod[..., None, None] * initial_state.astype(_F32)[:, None]
        first_in = initial_state.astype(_F32)[:, None]
    else:
        first_in = jnp.zeros((b, 1, H, P, N), _F32)
    states_in = jnp.concatenate([first_in, states_out[:, :-1]], axis=1)     # (b, nc, H, P, N)

    # 4. Entering state -> outputs, for tokens still in the document that entered the chunk.
    sees_entering = runs == entering_run[..., None]
    from_start = jnp.exp(jnp.where(sees_entering[..., None], a_cum, -jnp.inf))  # (b, nc, Q, H)
    y_off = jnp.einsum("bclgn,bcgjpn->bclgjp", C, states_in.reshape(b, nc, G, hpg, P, N))
    y_off = y_off * group_heads(from_start)[..., None]

    y = (y_diag + y_off).reshape(b, nc * Q, H, P)[:, :T]
    if return_decay:
        return y, states_out[:, -1], carry_prod[:, -1]
    return y, states_out[:, -1]


def entering_state_outputs(C, dt, A, state, *, segment_ids=None):
    """What an entering `state` (b,H,P,N) adds to the outputs of a row computed from a zero state: for every
    token t still in the row's first document, C_t · exp(Σ_{s≤t} Δ_s A) · state; nothing for the others.
    Linear in `state`, so y(state) = y(0) + this: a shard's outputs are corrected without running the SSD
    again. Returns (b,T,H,P) float32."""
    b, T, G, N = C.shape
    H = state.shape[1]
    runs = document_runs(segment_ids, (b, T))
    log_decay = jnp.cumsum(dt.astype(_F32) * A.astype(_F32), axis=1)                   # (b, T, H)
    decay = jnp.exp(jnp.where((runs == 0)[..., None], log_decay, -jnp.inf))
    Ch = _expand_groups(C.astype(_F32), H)                                              # (b, T, H, N)
    return jnp.einsum("bthn,bhpn->bthp", Ch, state.astype(_F32)) * decay[..., None]


def ssd_context_parallel(x, dt, A, B, C, *, chunk_size: int, segment_ids, axis: str, layout: str = "contiguous",
                         ssd=ssd_chunked):
    """`ssd_chunked` of a row split over the mesh axis `axis`, called inside `shard_map` on this shard's local
    row (x, dt, B, C, segment_ids: its pieces side by side, `parallel/sequence.py`). Each piece runs the chunked
    SSD from a zero state; the pieces' (decay, final state) summaries give every piece its entering state (an
    all-gather of b·H·P·N floats per piece), which is added to the outputs of the piece's first document
    (`entering_state_outputs`): no part of the SSD runs twice. `ssd` computes the pieces (`ssd_chunked`, or
    `pallas_ssd.ssd_pallas`: same signature). Returns y (b, T_local, H, P) float32."""
    n = pieces_per_shard(layout)
    x, dt, B, C, segment_ids = (pieces_as_rows(to_pieces(a, layout)) for a in (x, dt, B, C, segment_ids))
    y, final_state, decay = ssd(x, dt, A, B, C, chunk_size=chunk_size, segment_ids=segment_ids, return_decay=True)
    continues = continues_previous_piece(rows_as_pieces(segment_ids, n), axis, layout)
    entering = entering_states(rows_as_pieces(decay, n), rows_as_pieces(final_state, n), continues, axis, layout)
    y = y + entering_state_outputs(C, dt, A, pieces_as_rows(entering), segment_ids=segment_ids)
    return from_pieces(rows_as_pieces(y, n))


def ssd_decode_step(state, x, dt, A, B, C):
    """One token of the recurrence for decoding: x (b,H,P), dt (b,H), B/C (b,G,N). Returns (y, new_state)."""
    H = x.shape[1]
    dt = dt.astype(_F32)
    decay = jnp.exp(dt * A.astype(_F32))
    Bh, Ch = _expand_groups(B.astype(_F32), H), _expand_groups(C.astype(_F32), H)
    state = decay[..., None, None] * state.astype(_F32) + jnp.einsum(
        "bhp,bhn->bhpn", dt[..., None] * x.astype(_F32), Bh)
    return jnp.einsum("bhpn,bhn->bhp", state, Ch), state
