"""The Mamba-2 mixer of Granite 4.0 (`mamba`): in_proj → segment-aware causal conv → SSD → gated norm → out_proj."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from granite_jax.model.documents import document_runs
from granite_jax.model.linear import make_linear
from granite_jax.model.norms import GatedRMSNorm
from granite_jax.model.pallas_ssd import ssd_pallas, ssd_pallas_on_mesh
from granite_jax.model.ssd import ssd_chunked, ssd_context_parallel, ssd_decode_step
from granite_jax.parallel.plan import logical_param, sequence_split, target_platform
from granite_jax.parallel.sequence import (
    continues_previous_piece,
    entering_states,
    from_pieces,
    from_previous_piece,
    pieces_as_rows,
    pieces_per_shard,
    rows_as_pieces,
    to_pieces,
)


@jax.custom_vjp
def _masked_taps(padded, kernel, masks):
    """y[t] = sum_k padded[t + k] * masks[t, k] * kernel[k]; padded (b, K-1+T, C), kernel (K, C), masks (b, T, K).

    A hand-written VJP: XLA:CPU turns the autodiff kernel gradient of these shifted products into a pass
    ~8x slower than the forward; here it is K plain reductions.
    """
    T, K = masks.shape[1], kernel.shape[0]
    return sum(padded[:, k:k + T] * masks[:, :, k, None] * kernel[k] for k in range(K))


def _masked_taps_fwd(padded, kernel, masks):
    return _masked_taps(padded, kernel, masks), (padded, kernel, masks)


def _masked_taps_bwd(residuals, grad):
    padded, kernel, masks = residuals
    T, K = masks.shape[1], kernel.shape[0]
    d_padded = jnp.zeros_like(padded)
    d_kernel = []
    for k in range(K):
        masked_grad = grad * masks[:, :, k, None]
        d_padded = d_padded.at[:, k:k + T].add(masked_grad * kernel[k])
        d_kernel.append(jnp.einsum("btc,btc->c", padded[:, k:k + T], masked_grad))
    return d_padded, jnp.stack(d_kernel), None


_masked_taps.defvjp(_masked_taps_fwd, _masked_taps_bwd)


def causal_depthwise_conv(x, kernel, bias, runs, initial_state=None, initial_runs=None):
    """Depthwise causal conv over time that does not look across document starts.

    x (b, T, C); kernel (K, C) with tap K-1 on the current token; bias (C,) or None; runs (b, T) document-run
    index (see `documents.document_runs`). `initial_state` (b, C, K) holds the K inputs before the row
    (transformers' conv-state layout); `initial_runs` (b, K) their document runs: 0 continues the row's first
    document (the default: a decoding cache's prefix), -1 belongs to none (a context shard's halo from another
    document). Returns (y (b, T, C), final_state (b, C, K)), where final_state keeps only the last document's
    inputs (zeros before it).
    """
    b, T, C = x.shape
    K = kernel.shape[0]
    if initial_state is None:
        history = jnp.zeros((b, K, C), x.dtype)
    else:
        history = jnp.swapaxes(initial_state, 1, 2).astype(x.dtype)
    history_runs = jnp.zeros((b, K), runs.dtype) if initial_runs is None else initial_runs.astype(runs.dtype)
    padded = jnp.concatenate([history, x], axis=1)                       # (b, K + T, C)
    padded_runs = jnp.concatenate([history_runs, runs], axis=1)
    # Tap k reads padded index t + k + 1 for output t; it counts only if that input is in t's document.
    masks = jnp.stack([padded_runs[:, k + 1:k + 1 + T] == runs for k in range(K)], axis=-1).astype(x.dtype)
    y = _masked_taps(padded[:, 1:], kernel.astype(x.dtype), masks)
    if bias is not None:
        y = y + bias
    tail, tail_runs = padded[:, -K:], padded_runs[:, -K:]
    final_state = jnp.where((tail_runs == runs[:, -1:])[..., None], tail, 0)
    return y, jnp.swapaxes(final_state, 1, 2)


def conv_inputs_from_previous_piece(tail, tail_in_last_run, segment_ids, *, axis: str, layout: str):
    """What a context piece's causal conv sees before its first token. tail (pieces, b, K, C): each local
    piece's last K pre-conv inputs; tail_in_last_run (pieces, b, K): which of them belong to the piece's last
    document; segment_ids (pieces, b, L). Returns the previous piece's tail (pieces, b, K, C), which of its
    inputs count (pieces, b, K: in the document that continues into this piece) and whether the piece's first
    document continues the previous piece's (pieces, b); the row's first piece gets zeros, counted nowhere."""
    history, history_in_last_run = from_previous_piece((tail, tail_in_last_run), axis, layout)
    continues = continues_previous_piece(segment_ids, axis, layout)
    return history, continues[..., None] & history_in_last_run, continues


def causal_conv_context_parallel(x, kernel, bias, segment_ids, *, axis: str, layout: str = "contiguous"):
    """`causal_depthwise_conv` of a row split over the mesh axis `axis`, inside `shard_map` on this shard's
    local row x (b, T_local, C) and segment_ids (b, T_local) (its pieces side by side, `parallel/sequence.py`).
    Each piece's `initial_state` is the previous piece's last K pre-conv inputs, counted (run 0) where they
    continue into the piece's first document (`conv_inputs_from_previous_piece`, else run -1). Returns y
    (b, T_local, C)."""
    width, n = kernel.shape[0], pieces_per_shard(layout)
    xs, ids = to_pieces(x, layout), to_pieces(segment_ids, layout)            # (pieces, b, L, ...)
    runs = rows_as_pieces(document_runs(pieces_as_rows(ids), pieces_as_rows(ids).shape), n)
    history, counted, _ = conv_inputs_from_previous_piece(xs[:, :, -width:], runs[:, :, -width:] == runs[:, :, -1:],
                                                          ids, axis=axis, layout=layout)
    history_runs = jnp.where(counted, 0, -1).astype(runs.dtype)
    y = causal_depthwise_conv(pieces_as_rows(xs), kernel, bias, pieces_as_rows(runs),
                              initial_state=jnp.swapaxes(pieces_as_rows(history), 1, 2),
                              initial_runs=pieces_as_rows(history_runs))[0]
    return from_pieces(rows_as_pieces(y, n))


class MambaState(NamedTuple):
    """A Mamba layer's decoding state, constant in size whatever the context length (transformers' layout):
    conv (b, conv_dim, d_conv), the last d_conv pre-conv inputs; ssm (b, heads, head_dim, d_state). Both float32."""

    conv: jax.Array
    ssm: jax.Array


class DepthwiseConv1d(nnx.Module):
    """`conv1d` parameters: kernel (K, C) (transformers stores (C, 1, K)) and optional bias (C,)."""

    def __init__(self, channels: int, width: int, *, use_bias: bool, init_std: float, param_dtype, rngs: nnx.Rngs):
        kernel = nnx.initializers.normal(init_std)(rngs.params(), (width, channels), param_dtype)
        self.kernel = logical_param(kernel, ("conv_width", "ssm_conv_dim"))
        self.bias = logical_param(jnp.zeros((channels,), param_dtype), ("ssm_conv_dim",)) if use_bias else None


class Mamba2Mixer(nnx.Module):
    """Granite's Mamba-2 layer. in_proj rows are [z | x | B | C | dt]; the conv acts on [x | B | C]."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        H = config.hidden_size
        self.n_heads, self.head_dim = config.mamba_n_heads, config.mamba_d_head
        self.n_groups, self.d_state = config.mamba_n_groups, config.mamba_d_state
        self.d_inner, self.conv_dim = config.mamba_d_inner, config.mamba_conv_dim
        self.chunk_size = config.mamba_chunk_size
        self.ssd_impl = config.ssd_impl
        self.time_step_limit = config.time_step_limit
        self.dtype = config.compute_dtype
        self.plan = config.sharding
        self.subpiece = config.subpiece_tokens
        linear = functools.partial(make_linear, config, use_bias=config.mamba_proj_bias, rngs=rngs)

        self.in_proj = linear(H, config.mamba_in_proj_dim, ("embed", "ssm_in_proj"))
        self.conv1d = DepthwiseConv1d(self.conv_dim, config.mamba_d_conv, use_bias=config.mamba_conv_bias,
                                      init_std=config.initializer_range, param_dtype=config.param_dtype, rngs=rngs)
        per_head = lambda values: logical_param(jnp.asarray(values, config.param_dtype), ("ssm_heads",))  # noqa: E731
        n = self.n_heads
        self.dt_bias = per_head(np.ones(n))               # transformers' init: dt_bias 1, A = -(1..n), D 1
        self.A_log = per_head(np.log(np.arange(1, n + 1)))
        self.D = per_head(np.ones(n))
        self.norm = GatedRMSNorm(self.d_inner, n_groups=self.n_groups, eps=config.rms_norm_eps,
                                 dtype=config.compute_dtype, param_dtype=config.param_dtype)
        self.out_proj = linear(self.d_inner, H, ("ssm_inner", "embed"))

    @staticmethod
    def init_state(config, batch: int) -> MambaState:
        """The decoding state before any token: zeros, float32, constant in size whatever the context."""
        return MambaState(
            jnp.zeros((batch, config.mamba_conv_dim, config.mamba_d_conv), jnp.float32),
            jnp.zeros((batch, config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state), jnp.float32))

    def __call__(self, u: jax.Array, *, runs: jax.Array, state: MambaState | None = None):
        """u (b, T, hidden); runs (b, T) document-run index of every token, counted over the whole row (segment
        ids under the zigzag layout). Given a `state` to fill (a prefill for decoding), also returns the
        `MambaState` after the row's last document in its place.

        One mixing function serves every case (`_mix_local`): a row is a sequence of sub-pieces of
        `subpiece_tokens` tokens (one sub-piece when it is 0, or for a prefill), each starting from the conv
        inputs and SSM state the previous one left. On a mesh whose rules split the sequence (context
        parallelism) it runs under `shard_map` on each device's pieces, which start from the previous piece's
        conv inputs and the state entering them. One exception, for tensor parallelism: a context split without
        sub-pieces keeps in_proj and out_proj outside `shard_map` (sharded by the plan's rules, as everywhere
        else) and passes only the conv and the SSD through it (`_over_context_pieces`)."""
        split = sequence_split(self.plan)
        if split is not None and state is not None:
            raise NotImplementedError("a decoding prefill with the sequence split over devices (context > 1) is "
                                      "not supported; prefill on a mesh with context=1")
        if split is None:
            return self._mix_local(u, runs, None, "contiguous", state=state)
        if not self.subpiece:
            return self._over_context_pieces(u, runs, split)
        graphdef, weights = nnx.split(self)

        def local(weights, u, ids):
            return nnx.merge(graphdef, weights)._mix_local(u, ids, split.axis, split.layout)

        weight_specs = jax.tree.map(lambda _: P(), weights)
        return jax.shard_map(local, mesh=split.mesh, in_specs=(weight_specs, split.spec(None), split.spec()),
                             out_specs=split.spec(None), check_vma=False)(weights, u, runs)

    def _over_context_pieces(self, u, runs, split):
        """The layer with each device holding pieces of every row and no sub-pieces: in_proj and out_proj under
        the plan's shardings (tensor parallel where it says so), the conv and the SSD under `shard_map`."""
        b, T, _ = u.shape
        z, xBC, dt = self._project(u)
        with jax.named_scope("conv"):
            xBC = self._conv_over_pieces(xBC, runs, split)
        x, B, C, dt = self._ssm_inputs(jax.nn.silu(xBC), dt)
        with jax.named_scope("ssd"):
            y = self._ssd_over_pieces(x.reshape(b, T, self.n_heads, self.head_dim), dt, self._A(),
                                      B.reshape(b, T, self.n_groups, self.d_state),
                                      C.reshape(b, T, self.n_groups, self.d_state), runs, split)
        return self._output(y.reshape(b, T, self.d_inner), x, z)

    def _conv_over_pieces(self, xBC, runs, split):
        """The causal conv with each device holding pieces of every row (context parallelism)."""
        def local(xBC, runs, kernel, bias):
            return causal_conv_context_parallel(xBC, kernel, bias, runs, axis=split.axis, layout=split.layout)

        bias = self._conv_bias()
        bias_spec = None if bias is None else P()
        return jax.shard_map(local, mesh=split.mesh, in_specs=(split.spec(None), split.spec(), P(), bias_spec),
                             out_specs=split.spec(None), check_vma=False)(xBC, runs, self._conv_kernel(), bias)

    def _ssd_over_pieces(self, x, dt, A, B, C, runs, split):
        """The chunked SSD with each device holding pieces of every row (context parallelism)."""
        def local(x, dt, A, B, C, runs):
            return ssd_context_parallel(x, dt, A, B, C, chunk_size=self.chunk_size, segment_ids=runs,
                                        axis=split.axis, layout=split.layout, ssd=self._ssd(in_shard_map=True))

        per_head = split.spec(None, None)
        return jax.shard_map(local, mesh=split.mesh,
                             in_specs=(per_head, split.spec(None), P(), per_head, per_head, split.spec()),
                             out_specs=per_head, check_vma=False)(x, dt, A, B, C, runs)

    def _mix_local(self, u, ids, axis, layout, state: MambaState | None = None):
        """The layer on this device's rows u (b, L, hidden), ids (b, L) (their context pieces side by side when
        `axis` names the sequence axis, else whole rows), sub-piece after sub-piece, so that no buffer of the
        layer spans more than a sub-piece, forward or backward: a scan runs in_proj, the conv, the SSD, the gated
        norm and out_proj on each, carrying the last conv inputs and the SSM state. A whole row with
        `subpiece_tokens: 0` (or a prefill, which returns the `MambaState` after the row) is one sub-piece,
        computed without the scan. Under context parallelism a piece starts from the conv inputs of the previous
        piece (`from_previous_piece`) and from the state entering it: a first scan computes only each piece's
        summary (its final state from a zero state and its decay), and the pieces' summaries give each piece
        its entering state (`parallel/sequence.py`). That first scan repeats in_proj, the conv and the SSD's
        state part rather than keep any per-token output for a second pass (which would hold several hidden
        widths per token of the whole piece, forward and backward)."""
        K = self.conv1d.kernel.shape[0]
        pieces = pieces_per_shard(layout)
        if axis is not None:  # (rows, L, ...), a piece per row
            u, ids = (pieces_as_rows(to_pieces(a, layout)) for a in (u, ids))
        rows, L = ids.shape
        sub = self.subpiece if self.subpiece and state is None else L
        if L % sub:
            raise ValueError(f"subpiece_tokens={sub} does not divide the {L} tokens of a row (or context "
                             f"piece) on a device; use a divisor of {L}")
        kernel, bias, A = self._conv_kernel(), self._conv_bias(), self._A()
        ssd = self._ssd(in_shard_map=axis is not None)

        def step(carry, inputs):
            """One sub-piece from the carry (last conv inputs, which of them count, SSM state, decay since the
            last document start; None: nothing enters, a row's start, which carries only the SSM state on): the
            next carry, the SSD's y, x and the gate z, and the conv's final state (the decoding state's conv
            part)."""
            u, ids, continues = inputs
            z, xBC, dt = self._project(u)
            # A whole row's ids are the model's document runs already; counting them again costs a TPU step a
            # (T, T) temporary (XLA lowers the cumulative sum to a reduce-window there): +0.06 GiB at 4K tokens.
            runs = ids if carry is None else document_runs(ids, ids.shape)
            with jax.named_scope("conv"):
                if carry is None:
                    conv, conv_state = causal_depthwise_conv(xBC, kernel, bias, runs)
                else:
                    history, history_counted, state, decay = carry
                    history_runs = jnp.where(continues[:, None] & history_counted, 0, -1).astype(runs.dtype)
                    conv, conv_state = causal_depthwise_conv(xBC, kernel, bias, runs,
                                                             initial_state=jnp.swapaxes(history, 1, 2),
                                                             initial_runs=history_runs)
            x, B, C, dt = self._ssm_inputs(jax.nn.silu(conv), dt)
            heads = x.reshape(*ids.shape, self.n_heads, self.head_dim)  # x itself stays flat for the skip term
            B, C = (a.reshape(*ids.shape, self.n_groups, self.d_state) for a in (B, C))
            if carry is None:  # the row's start: no decay to carry on
                with jax.named_scope("ssd"):
                    y, state = ssd(heads, dt, A, B, C, chunk_size=self.chunk_size, segment_ids=ids)
                return (None, None, state, None), (y, x, z), conv_state
            entering = jnp.where(continues[:, None, None, None], state, 0.0)
            with jax.named_scope("ssd"):
                y, state, sub_decay = ssd(heads, dt, A, B, C, chunk_size=self.chunk_size, segment_ids=ids,
                                          initial_state=entering, return_decay=True)
            decay = jnp.where(continues[:, None], decay * sub_decay, sub_decay)
            return (xBC[:, -K:], runs[:, -K:] == runs[:, -1:], state, decay), (y, x, z), conv_state

        def output(y, x, z):
            return self._output(y.reshape(*z.shape[:2], self.d_inner), x, z)

        if axis is None and sub == L:  # a whole row: one sub-piece, nothing entering it
            (_, _, ssm_state, _), (y, x, z), conv_state = step(None, (u, ids, None))
            out = output(y, x, z)
            if state is None:
                return out
            return out, MambaState(conv_state.astype(state.conv.dtype), ssm_state.astype(state.ssm.dtype))

        # What enters each row (piece): the previous context piece's last conv inputs, or nothing.
        history = jnp.zeros((rows, K, self.conv_dim), self.dtype)
        history_counted, continues = jnp.zeros((rows, K), bool), jnp.zeros((rows,), bool)
        if axis is not None:
            tail = self._project(u[:, -K:])[1]
            tail_runs = document_runs(ids[:, -K:], (rows, K))
            history, history_counted, continues = (pieces_as_rows(a) for a in conv_inputs_from_previous_piece(
                rows_as_pieces(tail, pieces), rows_as_pieces(tail_runs == tail_runs[:, -1:], pieces),
                rows_as_pieces(ids, pieces), axis=axis, layout=layout))
        # (n, rows): whether each sub-piece's first token continues the document of the token before it
        within = ids[:, sub::sub] == ids[:, sub - 1:-1:sub]
        subpiece_continues = jnp.concatenate([continues[:, None], within], axis=1).T

        def by_subpiece(a):  # (rows, L, ...) -> (n, rows, sub, ...)
            return jnp.moveaxis(a.reshape(rows, L // sub, sub, *a.shape[2:]), 1, 0)

        @jax.checkpoint
        def summarize(carry, inputs):
            return step(carry, inputs)[0], None

        @jax.checkpoint
        def mix(carry, inputs):
            carry, (y, x, z), _ = step(carry, inputs)
            return carry, output(y, x, z)

        subpieces = (by_subpiece(u), by_subpiece(ids), subpiece_continues)
        state = jnp.zeros((rows, self.n_heads, self.head_dim, self.d_state), jnp.float32)
        no_decay = jnp.ones((rows, self.n_heads), jnp.float32)
        if axis is not None:
            (_, _, final_state, decay), _ = jax.lax.scan(summarize, (history, history_counted, state, no_decay),
                                                         subpieces)
            summaries = (rows_as_pieces(a, pieces) for a in (decay, final_state, continues))
            state = pieces_as_rows(entering_states(*summaries, axis, layout))
        _, out = jax.lax.scan(mix, (history, history_counted, state, no_decay), subpieces)
        out = jnp.moveaxis(out, 0, 1).reshape(rows, L, -1)
        return out if axis is None else from_pieces(rows_as_pieces(out, pieces))

    def decode(self, u: jax.Array, state: MambaState) -> tuple[jax.Array, MambaState]:
        """One token per row: u (b, 1, hidden) → (out (b, 1, hidden), the next state)."""
        b = u.shape[0]
        z, xBC, dt = self._project(u[:, 0])
        conv = jnp.concatenate([state.conv[:, :, 1:], xBC.astype(jnp.float32)[:, :, None]], axis=-1)
        xBC = jnp.einsum("bck,kc->bc", conv.astype(self.dtype), self._conv_kernel())
        if self.conv1d.bias is not None:
            xBC = xBC + self._conv_bias()
        x, B, C, dt = self._ssm_inputs(jax.nn.silu(xBC), dt)
        y, ssm = ssd_decode_step(state.ssm, x.reshape(b, self.n_heads, self.head_dim), dt, self._A(),
                                 B.reshape(b, self.n_groups, self.d_state), C.reshape(b, self.n_groups, self.d_state))
        out = self._output(y.reshape(b, self.d_inner), x, z)
        return out[:, None], MambaState(conv, ssm)

    def _ssd(self, *, in_shard_map: bool):
        """The SSD function `ssd_impl` names, for a caller on the global arrays (on a mesh: GSPMD) or inside
        `shard_map` on one device's."""
        if self.ssd_impl == "xla":
            return ssd_chunked
        if target_platform() == "tpu":
            raise NotImplementedError("ssd_impl='pallas' is a GPU (Triton) kernel; it has no TPU (Mosaic) "
                                      "version yet: use ssd_impl='xla' on TPU")
        return ssd_pallas if in_shard_map else functools.partial(ssd_pallas_on_mesh, plan=self.plan)

    def _project(self, u):
        """in_proj, split into the gate z (..., d_inner), the conv's input [x | B | C] (..., conv_dim) and the
        step dt (..., heads)."""
        with jax.named_scope("in_proj"):
            return jnp.split(self.in_proj(u), [self.d_inner, self.d_inner + self.conv_dim], axis=-1)

    def _conv_kernel(self):
        return self.conv1d.kernel[...].astype(self.dtype)

    def _conv_bias(self):
        return None if self.conv1d.bias is None else self.conv1d.bias[...].astype(self.dtype)

    def _A(self):
        return -jnp.exp(self.A_log[...].astype(jnp.float32))

    def _ssm_inputs(self, xBC, dt):
        """Split the conv output into x, B, C and discretise the step: Δ = softplus(dt + dt_bias) in the
        compute dtype (as transformers does), then float32, clipped to time_step_limit."""
        x, B, C = jnp.split(xBC, [self.d_inner, self.d_inner + self.n_groups * self.d_state], axis=-1)
        dt = jax.nn.softplus(dt + self.dt_bias[...].astype(self.dtype)).astype(jnp.float32)
        lo, hi = self.time_step_limit
        if (lo, hi) != (0.0, float("inf")):
            dt = jnp.clip(dt, lo, hi)
        return x, B, C, dt

    def _output(self, y, x, z):
        """Skip connection D·x, gated norm, out_proj; y and x have the heads flattened (..., d_inner)."""
        D = jnp.repeat(self.D[...].astype(jnp.float32), self.head_dim)
        y = y + D * x.astype(jnp.float32)
        y = self.norm(y, z)
        with jax.named_scope("out_proj"):
            return self.out_proj(y)
