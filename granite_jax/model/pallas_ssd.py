"""The chunked SSD as Pallas kernels, forward and backward (`ssd_impl: pallas`).

Same function and signature as `ssd.ssd_chunked` (packed-document resets, an entering state, the final state,
the row's decay), computed by two kernels written for GPUs (Pallas' Triton backend). One program per (row,
head, block of the head's channels) walks the row chunk after chunk, keeping its (P_block, N) slice of the head's
state in registers:

    forward, chunk c:   y      = (L ∘ C Bᵀ) u  +  d ∘ (C Sᵀ)                 (the chunk's own tokens + entering S)
                        S_next = carry · S  +  (w ∘ u)ᵀ B                      (what the chunk hands on)
    backward, chunk c (reverse order, from dS = ∂loss/∂S_next):
                        du = (L ∘ C Bᵀ)ᵀ dy + w ∘ (B dSᵀ)      dC = (dM ∘ L) B + d ∘ (dy S)
                        dB = (dM ∘ L)ᵀ C + w ∘ (u dS)          dM = dy uᵀ
                        ∂a_cum = rowsum(Z) − colsum(Z) + d ∘ ⟨dy, C Sᵀ⟩ − w ∘ ⟨u, B dSᵀ⟩,  Z = dM ∘ L ∘ C Bᵀ
                        dS_in = carry · dS + (d ∘ dy)ᵀ C

with u = Δ·x, a = Δ·A (log-decay per token), a_cum its cumulative sum within the chunk, L the causal same-document
decay matrix exp(a_cum_l − a_cum_s), d = exp(a_cum) for the tokens still in the document that entered the chunk
(else 0), w = exp(a_cum_last − a_cum) for the tokens of the chunk's last document (else 0), and carry =
exp(a_cum_last) when no document starts inside the chunk (else 0). All of it float32; the matmuls take their
operands in the inputs' dtype (bf16 in training) and accumulate in float32. Masks are applied to exponents
before `exp`, as in `ssd.py`, so nothing is 0·inf forward or backward.

The head's channels (P, the columns of x and y, the rows of S) never mix: each block of `HEAD_BLOCK` of them is
its own recurrence, sharing only the (Q, Q) matrices L and C Bᵀ, which each block recomputes. The gradients that
sum over channels (dt's, a's, B's and C's) come out per block and are added up outside the kernel.

The forward saves the state entering every chunk ((b, H, T/Q, P, N) float32, N/Q of y's size) for the backward,
which therefore runs the chunks once, in reverse. The kernels' chunk (`KERNEL_CHUNK` tokens) is their own:
chunking is exact, so it need not be the model's `mamba_chunk_size`.

Block sizes, from the GPU compiler for sm_90 (ptxas -v, P = 64, N = 128, bf16, 4 warps): chunks of 64 over the
whole head spilled 3,084 bytes per thread in the backward (255 registers) and 144 in the forward; of the
sizes tried (chunks 16–64, channel blocks 8–64, 4–16 warps) only chunks of 16 × blocks of 16 and chunks of 32 ×
blocks of 8 spill nothing, and Triton's matmuls want every dimension ≥ 16: chunks of 16, blocks of 16 (forward
162 registers, backward 255, 12 and 16 KiB of shared memory; tests/test_gpu_kernels.py keeps it so).

On CPU the kernels run in Pallas' interpret mode (tests). For GPUs they are compiled by XLA's GPU compiler in
the suite (deviceless H100s); they have not run or been timed on a GPU. On TPU, `ssd_impl: pallas` is refused
(Mosaic needs a different kernel: the grid is sequential there and the state would live in VMEM scratch).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from granite_jax.model.documents import document_runs
from granite_jax.parallel.plan import current_mesh, target_platform

_F32 = jnp.float32
KERNEL_CHUNK = 16
HEAD_BLOCK = 16  # channels of a head per program (fewer when the head dimension is not a multiple)
_NUM_WARPS = 4


def _compiler_params():
    from jax.experimental.pallas import triton as pallas_triton

    return pallas_triton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1)


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False, dtype=None):
    """a @ b (optionally transposed) with float32 accumulation, operands cast to `dtype` (the inputs' dtype)."""
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    return jnp.dot(a, b, preferred_element_type=_F32)


class _Chunk:
    """Everything a chunk's forward and backward share, recomputed from its inputs (nothing of it is stored)."""

    def __init__(self, refs, c: int, Q: int, dot_dtype):
        x_ref, dt_ref, a_ref, B_ref, C_ref, runs_ref = refs
        window = pl.ds(c * Q, Q)
        self.x = x_ref[window, :].astype(_F32)                       # (Q, P)
        self.dt = dt_ref[window].astype(_F32)                        # (Q,)
        self.B = B_ref[window, :]                                    # (Q, N), inputs' dtype
        self.C = C_ref[window, :]
        self.u = self.x * self.dt[:, None]
        a = a_ref[window].astype(_F32)
        runs = runs_ref[window]
        step = jnp.arange(Q)
        self.causal = step[None, :] <= step[:, None]                 # [l, s]: s at or before l
        a_cum = jnp.sum(jnp.where(self.causal, a[None, :], 0.0), axis=1)
        a_last = jnp.sum(a)
        entering_run = jnp.where(c > 0, runs_ref[jnp.maximum(c * Q - 1, 0)], 0)
        last_run = runs_ref[c * Q + Q - 1]
        same_document = self.causal & (runs[:, None] == runs[None, :])
        self.L = jnp.exp(jnp.where(same_document, a_cum[:, None] - a_cum[None, :], -jnp.inf))
        self.M = self.L * _dot(self.C, self.B, trans_b=True, dtype=dot_dtype)        # (Q, Q)
        self.d = jnp.exp(jnp.where(runs == entering_run, a_cum, -jnp.inf))         # entering state -> token
        self.w = jnp.exp(jnp.where(runs == last_run, a_last - a_cum, -jnp.inf))    # token -> leaving state
        self.carry = jnp.where(last_run == entering_run, jnp.exp(a_last), 0.0)     # entering -> leaving state
        self.dot_dtype = dot_dtype


def _forward_kernel(x_ref, dt_ref, a_ref, B_ref, C_ref, runs_ref, s0_ref, y_ref, final_ref, states_ref, *,
                    Q: int, n_chunks: int, dot_dtype):
    refs = (x_ref, dt_ref, a_ref, B_ref, C_ref, runs_ref)

    def chunk(c, S):
        k = _Chunk(refs, c, Q, dot_dtype)
        states_ref[c] = S
        y = _dot(k.M, k.u, dtype=dot_dtype) + k.d[:, None] * _dot(k.C, S, trans_b=True, dtype=dot_dtype)
        y_ref[pl.ds(c * Q, Q), :] = y.astype(y_ref.dtype)
        return k.carry * S + _dot(k.u * k.w[:, None], k.B, trans_a=True, dtype=dot_dtype)

    final_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk, s0_ref[...].astype(_F32))


def _backward_kernel(x_ref, dt_ref, a_ref, B_ref, C_ref, runs_ref, states_ref, dy_ref, dfinal_ref,
                     dx_ref, ddt_ref, da_ref, dB_ref, dC_ref, ds0_ref, *, Q: int, n_chunks: int, dot_dtype):
    refs = (x_ref, dt_ref, a_ref, B_ref, C_ref, runs_ref)

    def chunk(i, dS):
        c = n_chunks - 1 - i
        k = _Chunk(refs, c, Q, dot_dtype)
        S = states_ref[c]
        window = pl.ds(c * Q, Q)
        dy = dy_ref[window, :].astype(_F32)                                            # (Q, P)
        B_dS = _dot(k.B, dS, trans_b=True, dtype=dot_dtype)                             # (Q, P)
        C_S = _dot(k.C, S, trans_b=True, dtype=dot_dtype)                               # (Q, P)
        du = _dot(k.M, dy, trans_a=True, dtype=dot_dtype) + k.w[:, None] * B_dS
        dM = _dot(dy, k.u, trans_b=True, dtype=dot_dtype)                               # (Q, Q)
        dK = dM * k.L
        dC = _dot(dK, k.B, dtype=dot_dtype) + k.d[:, None] * _dot(dy, S, dtype=dot_dtype)
        dB = _dot(dK, k.C, trans_a=True, dtype=dot_dtype) + k.w[:, None] * _dot(k.u, dS, dtype=dot_dtype)
        Z = dM * k.M
        leave = k.w * jnp.sum(k.u * B_dS, axis=1)
        d_a_cum = jnp.sum(Z, axis=1) - jnp.sum(Z, axis=0) + k.d * jnp.sum(dy * C_S, axis=1) - leave
        d_a_last = jnp.sum(leave) + k.carry * jnp.sum(dS * S)
        # a_cum_l = Σ_{s≤l} a_s and a_last = Σ_s a_s, so ∂a_s = Σ_{l≥s} ∂a_cum_l + ∂a_last.
        da = jnp.sum(jnp.where(k.causal, d_a_cum[:, None], 0.0), axis=0) + d_a_last
        dx_ref[window, :] = (du * k.dt[:, None]).astype(dx_ref.dtype)
        ddt_ref[window] = jnp.sum(du * k.x, axis=1)
        da_ref[window] = da
        dB_ref[window, :] = dB
        dC_ref[window, :] = dC
        return k.carry * dS + _dot(dy * k.d[:, None], k.C, trans_a=True, dtype=dot_dtype)

    ds0_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk, dfinal_ref[...].astype(_F32))


def _head_block(P: int) -> int:
    return math.gcd(P, HEAD_BLOCK)


def _specs(T: int, H: int, P: int, G: int, N: int, n_chunks: int):
    """BlockSpecs over the grid (row, head, channel block): each program sees its row, its head's block of
    channels and the head's B/C group whole in time; the per-block gradient sums go to their own slot."""
    group = lambda h: h // (H // G)  # noqa: E731
    Pb = _head_block(P)
    return dict(
        channels=pl.BlockSpec((None, T, None, Pb), lambda i, h, p: (i, 0, h, p)),            # x, y, dx
        scalar=pl.BlockSpec((None, T, None), lambda i, h, p: (i, 0, h)),                     # dt, a
        group=pl.BlockSpec((None, T, None, N), lambda i, h, p: (i, 0, group(h), 0)),         # B, C
        scalar_sum=pl.BlockSpec((None, T, None, None), lambda i, h, p: (i, 0, h, p)),        # ∂dt, ∂a per block
        group_sum=pl.BlockSpec((None, T, None, None, N), lambda i, h, p: (i, 0, h, p, 0)),   # ∂B, ∂C per block
        runs=pl.BlockSpec((None, T), lambda i, h, p: (i, 0)),
        state=pl.BlockSpec((None, None, Pb, N), lambda i, h, p: (i, h, p, 0)),
        states=pl.BlockSpec((None, None, n_chunks, Pb, N), lambda i, h, p: (i, h, 0, p, 0)),
    )


def _grid(b: int, H: int, P: int) -> tuple[int, int, int]:
    return b, H, P // _head_block(P)


def _forward(x, dt, a, B, C, runs, s0, *, interpret: bool):
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    n_chunks = T // KERNEL_CHUNK
    s = _specs(T, H, P, G, N, n_chunks)
    kernel = functools.partial(_forward_kernel, Q=KERNEL_CHUNK, n_chunks=n_chunks, dot_dtype=x.dtype)
    return pl.pallas_call(
        kernel, grid=_grid(b, H, P),
        in_specs=[s["channels"], s["scalar"], s["scalar"], s["group"], s["group"], s["runs"], s["state"]],
        out_specs=[s["channels"], s["state"], s["states"]],
        out_shape=[jax.ShapeDtypeStruct((b, T, H, P), _F32), jax.ShapeDtypeStruct((b, H, P, N), _F32),
                   jax.ShapeDtypeStruct((b, H, n_chunks, P, N), _F32)],
        compiler_params=None if interpret else _compiler_params(), interpret=interpret, name="ssd_forward",
    )(x, dt, a, B, C, runs, s0)


def _backward(x, dt, a, B, C, runs, states, dy, dfinal, *, interpret: bool):
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    n_chunks = T // KERNEL_CHUNK
    s = _specs(T, H, P, G, N, n_chunks)
    blocks = P // _head_block(P)
    kernel = functools.partial(_backward_kernel, Q=KERNEL_CHUNK, n_chunks=n_chunks, dot_dtype=x.dtype)
    dx, ddt, da, dB, dC, ds0 = pl.pallas_call(
        kernel, grid=_grid(b, H, P),
        in_specs=[s["channels"], s["scalar"], s["scalar"], s["group"], s["group"], s["runs"], s["states"],
                  s["channels"], s["state"]],
        out_specs=[s["channels"], s["scalar_sum"], s["scalar_sum"], s["group_sum"], s["group_sum"], s["state"]],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, T, H, blocks), _F32),
                   jax.ShapeDtypeStruct((b, T, H, blocks), _F32), jax.ShapeDtypeStruct((b, T, H, blocks, N), _F32),
                   jax.ShapeDtypeStruct((b, T, H, blocks, N), _F32), jax.ShapeDtypeStruct((b, H, P, N), _F32)],
        compiler_params=None if interpret else _compiler_params(), interpret=interpret, name="ssd_backward",
    )(x, dt, a, B, C, runs, states, dy, dfinal)
    # The channel blocks' shares add up; so do the heads' of a group, which share its B and C.
    by_group = lambda g: g.reshape(b, T, G, H // G * blocks, N).sum(axis=3)  # noqa: E731
    return (dx, ddt.sum(axis=-1), da.sum(axis=-1), by_group(dB).astype(B.dtype), by_group(dC).astype(C.dtype),
            ds0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ssd(x, dt, a, B, C, runs, s0, interpret):
    y, final, _ = _forward(x, dt, a, B, C, runs, s0, interpret=interpret)
    return y, final


def _ssd_fwd(x, dt, a, B, C, runs, s0, interpret):
    y, final, states = _forward(x, dt, a, B, C, runs, s0, interpret=interpret)
    return (y, final), (x, dt, a, B, C, runs, states)


def _ssd_bwd(interpret, residuals, cotangents):
    x, dt, a, B, C, runs, states = residuals
    dy, dfinal = cotangents
    dx, ddt, da, dB, dC, ds0 = _backward(x, dt, a, B, C, runs, states, dy.astype(_F32), dfinal.astype(_F32),
                                         interpret=interpret)
    return dx, ddt.astype(dt.dtype), da, dB, dC, None, ds0


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_pallas(x, dt, A, B, C, *, chunk_size: int | None = None, segment_ids=None, initial_state=None,
               return_decay: bool = False, interpret: bool | None = None):
    """`ssd.ssd_chunked` by the Pallas kernels: same arguments, results and gradients (x, dt, A, B, C,
    initial_state). `chunk_size` is accepted for the same signature; the kernels chunk at `KERNEL_CHUNK`.
    Rows are padded to a multiple of it (steps of decay 1 and input 0, which change nothing). `interpret`
    defaults to True when compiling for CPU. Runs on one device's arrays: on a mesh, see `ssd_pallas_on_mesh`."""
    del chunk_size
    if interpret is None:
        interpret = target_platform() == "cpu"
    b, T, H, P = x.shape
    N = B.shape[-1]
    pad = -T % KERNEL_CHUNK
    pad_time = lambda t, **kw: jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2), **kw)  # noqa: E731
    runs = pad_time(document_runs(segment_ids, (b, T)).astype(jnp.int32), mode="edge")
    a = dt.astype(_F32) * A.astype(_F32)                                   # log-decay per token, <= 0
    s0 = jnp.zeros((b, H, P, N), _F32) if initial_state is None else initial_state.astype(_F32)
    y, final = _ssd(pad_time(x), pad_time(dt), pad_time(a), pad_time(B), pad_time(C), runs, s0, interpret)
    y = y[:, :T]
    if not return_decay:
        return y, final
    # The row's decay: how much of the entering state reaches the end, 0 if a document starts inside the row.
    decay = jnp.where((runs[:, -1] == 0)[:, None], jnp.exp(jnp.sum(a, axis=1)), 0.0)
    return y, final, decay


def ssd_pallas_on_mesh(x, dt, A, B, C, *, plan, chunk_size: int | None = None, segment_ids=None,
                       initial_state=None, return_decay: bool = False):
    """`ssd_pallas` on the current mesh, if any. A Pallas call is opaque to XLA's sharding propagation, so it runs
    under `shard_map`: rows split as `plan` splits the batch, heads as it splits the Mamba inner width (when the
    heads and the B/C groups divide: with one group, B and C are whole on every device)."""
    mesh = current_mesh()
    if mesh is None:
        return ssd_pallas(x, dt, A, B, C, segment_ids=segment_ids, initial_state=initial_state,
                          return_decay=return_decay)
    from jax.sharding import PartitionSpec as P

    G = B.shape[2]
    rows, heads = plan.kernel_axes(mesh, "ssm_inner", x.shape[2], *([G] if G > 1 else []))
    groups = heads if G > 1 else None
    if segment_ids is None:
        segment_ids = jnp.zeros(x.shape[:2], jnp.int32)
    has_state = initial_state is not None

    def local(x, dt, A, B, C, segment_ids, *state):
        return ssd_pallas(x, dt, A, B, C, segment_ids=segment_ids, initial_state=state[0] if state else None,
                          return_decay=return_decay)

    per_head, state_spec = P(rows, None, heads, None), P(rows, heads, None, None)
    in_specs = (per_head, P(rows, None, heads), P(heads), P(rows, None, groups, None), P(rows, None, groups, None),
                P(rows, None)) + ((state_spec,) if has_state else ())
    out_specs = (per_head, state_spec) + ((P(rows, heads),) if return_decay else ())
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        x, dt, A, B, C, segment_ids, *((initial_state,) if has_state else ()))
