"""The output head over long rows: cross-entropy and per-token log-probs with logits for about `chunk` tokens
per device at a time.

The cross-entropy is computed `chunk` tokens per device at a time (`chunked_cross_entropy`), so logits over the
(up to 100K) vocabulary exist for one chunk at a time, forward and backward, never for the whole batch. On a mesh,
every batch shard multiplies its rows by its own copy of the output head (gathered once per step), so that
each device sums its head gradient over its chunks and the devices' sums are reduced once per step: with one
head shared by all shards, XLA reduces the head gradient across devices (and re-gathers the FSDP-sharded
head) once per chunk — for granite-4.0-h-small on 64 devices, 256 chunks of a 100352 × 4096 gradient.
Used by the training loss (`train/step.py`), DPO (`train/dpo.py`) and scoring (`eval/scoring.py`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from granite_jax.model.granite import head_logits
from granite_jax.parallel.plan import ShardingPlan, constrain, current_mesh


class _DeviceChunks(NamedTuple):
    """Cuts (B, T, ...) arrays into chunks of about `chunk` tokens per device, every device chunking its own
    tokens: (n chunks, shards, rows, length, ...), the shards being row shards × sequence pieces. The chunks are
    slices of the sequence, every row at once, so that the batch dimension keeps its sharding (chunking the
    flattened batch would put each chunk on one device)."""

    row_shards: int
    piece_shards: int
    rows: int
    piece: int
    length: int
    plan: ShardingPlan

    @classmethod
    def of(cls, B: int, T: int, chunk: int, plan: ShardingPlan) -> "_DeviceChunks":
        mesh = current_mesh()
        row_shards = 1 if mesh is None else plan.batch_shards(mesh)
        piece_shards = 1 if mesh is None else plan.sequence_shards(mesh)  # context parallelism: pieces of a row
        rows, piece = B // row_shards, T // piece_shards
        return cls(row_shards, piece_shards, rows, piece, max(1, min(piece, chunk // rows)), plan)

    @property
    def shards(self) -> int:
        return self.row_shards * self.piece_shards

    @property
    def pad(self) -> int:
        return -self.piece % self.length

    def split(self, x):
        rest = x.shape[2:]
        x = x.reshape(self.row_shards, self.rows, self.piece_shards, self.piece, *rest).swapaxes(1, 2)
        x = jnp.pad(x.reshape(self.shards, self.rows, self.piece, *rest),
                    [(0, 0), (0, 0), (0, self.pad)] + [(0, 0)] * len(rest))
        x = jnp.moveaxis(x.reshape(self.shards, self.rows, -1, self.length, *rest), 2, 0)
        return constrain(x, (None, PER_SHARD) + (None,) * (x.ndim - 2), self.plan)

    def merge(self, x):
        """The inverse of `split` for (n, shards, rows, length) per-token results: (B, T)."""
        x = jnp.moveaxis(x, 0, 2).reshape(self.shards, self.rows, -1)[:, :, :self.piece]
        x = x.reshape(self.row_shards, self.piece_shards, self.rows, self.piece).swapaxes(1, 2)
        return x.reshape(self.row_shards * self.rows, self.piece_shards * self.piece)

    def per_shard_head(self, head_weight):
        """(shards, V, H): one copy of the head per shard, its gradient summed over the shards after the loop."""
        return constrain(jnp.broadcast_to(head_weight, (self.shards, *head_weight.shape)),
                         (PER_SHARD, "activation_vocab", None), self.plan)


PER_SHARD = ("activation_batch", "activation_length")     # one dimension: row shards x sequence pieces


LOSS_IMPLS = ("recompute", "fused")


def chunked_cross_entropy(hidden, head_weight, targets, weights, *, chunk: int, logits_scaling: float = 1.0,
                          z_coef: float = 0.0, impl: str = "recompute", plan: ShardingPlan = ShardingPlan()):
    """The output head's loss over all tokens, logits built for about `chunk` tokens per batch shard (device) at a
    time: returns (objective, ce_sum, z_sum) with ce_sum = Σ weights · CE, z_sum = Σ weights · logsumexp² and
    objective = ce_sum + z_coef · z_sum. Only `objective` carries gradients (for hidden and head_weight).

    `impl` (`loss_impl` in the run config), the same values and gradients either way:
    - "recompute": each chunk under `jax.checkpoint`, differentiated by JAX: the backward pass builds the chunk's
      logits again, four head matmuls per token (logits, recomputed logits, ∂hidden, ∂head).
    - "fused": the gradient computed in the forward pass while the chunk's logits exist, as the loss is the
      last thing the step computes (`_fused_head_loss`, a custom VJP; the backward multiplies in the one scalar
      cotangent): three head matmuls per token. On XLA:CPU it measured slower and with more temporaries
      (benchmarks/RESULTS.md), so it is not the default until measured on an accelerator.

    hidden (B, T, H) in the compute dtype; head_weight (V, H), the output head's parameter; logits are
    `head_logits(hidden, head_weight, logits_scaling)` in float32. targets, weights (B, T). `plan` says where
    the batch shards live on the mesh being traced under.
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl={impl!r}: expected one of {list(LOSS_IMPLS)}")
    chunks = _DeviceChunks.of(*hidden.shape[:2], chunk, plan)
    per_shard_head = chunks.per_shard_head(head_weight)
    inputs = (chunks.split(hidden), per_shard_head, chunks.split(targets), chunks.split(weights),
              float(logits_scaling), float(z_coef))
    if impl == "recompute":
        ce, z = _recomputed_head_loss(*inputs)
        return ce + z_coef * z, ce, z
    objective, ce, z = _fused_head_loss(*inputs)
    return objective, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(z)


def _recomputed_head_loss(h, head, t, w, logits_scaling: float, z_coef: float):
    @jax.checkpoint
    def one_chunk(carry, inputs):
        h, t, w = inputs
        ce, z = _chunk_loss(h, head, t, w, logits_scaling, z_coef, with_gradients=False)
        return (carry[0] + ce, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (ce, z), _ = jax.lax.scan(one_chunk, (zero, zero), (h, t, w))
    return ce, z


def _chunk_loss(h, head, t, w, logits_scaling: float, z_coef: float, *, with_gradients: bool):
    """One chunk h (shards, rows, length, H) with one head per shard (shards, V, H): (ce, z)
    and, `with_gradients`, the chunk's ∂objective/∂h and ∂objective/∂head (float32). The gradient is the
    transpose of `head_logits` written out, so that the head's gradient is accumulated in float32 straight
    from the matmul (no compute-dtype copy of it per chunk)."""
    logits = jax.vmap(head_logits, (0, 0, None))(h, head, logits_scaling).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    sums = jnp.sum(w * (lse - target_logit)), jnp.sum(w * lse**2)
    if not with_gradients:
        return sums
    # ∂(w·(lse − logit_t) + z_coef·w·lse²)/∂logits = w·(1 + 2·z_coef·lse)·softmax − w·onehot(t), then through
    # logits = h · headᵀ / logits_scaling.
    scale = w * (1.0 + 2.0 * z_coef * lse) / logits_scaling
    is_target = jnp.arange(logits.shape[-1]) == t[..., None]
    d_logits = scale[..., None] * jnp.exp(logits - lse[..., None])
    d_logits = (d_logits - jnp.where(is_target, w[..., None] / logits_scaling, 0.0)).astype(h.dtype)
    d_h = jnp.einsum("srlv,svh->srlh", d_logits, head)
    d_head = jnp.einsum("srlv,srlh->svh", d_logits, h, preferred_element_type=jnp.float32)
    return sums, (d_h, d_head)  # (head is in h's dtype here: `_chunks_with_gradients` casts it once)


def _chunks_with_gradients(h, head, t, w, logits_scaling, z_coef):
    """(ce, z, ∂objective/∂h per chunk, ∂objective/∂head) over the chunks, the gradients taken chunk by chunk."""
    zero = jnp.zeros((), jnp.float32)
    head_in_compute_dtype = head.astype(h.dtype)  # cast once per step, not once per chunk

    def one_chunk(carry, inputs):
        ce, z, d_head = carry
        h, t, w = inputs
        (chunk_ce, chunk_z), (d_h, chunk_d_head) = _chunk_loss(h, head_in_compute_dtype, t, w, logits_scaling,
                                                               z_coef, with_gradients=True)
        return (ce + chunk_ce, z + chunk_z, d_head + chunk_d_head), d_h

    (ce, z, d_head), d_h = jax.lax.scan(one_chunk, (zero, zero, jnp.zeros(head.shape, jnp.float32)), (h, t, w))
    return ce, z, d_h, d_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_head_loss(h, head, t, w, logits_scaling: float, z_coef: float):
    """(objective, ce, z) over chunks h (n, shards, rows, length, H) with one head per shard (shards, V, H)."""
    ce, z = _recomputed_head_loss(h, head, t, w, logits_scaling, z_coef)  # the values only, when not differentiated
    return ce + z_coef * z, ce, z


def _fused_head_loss_fwd(h, head, t, w, logits_scaling, z_coef):
    ce, z, d_h, d_head = _chunks_with_gradients(h, head, t, w, logits_scaling, z_coef)
    return (ce + z_coef * z, ce, z), (d_h, d_head.astype(head.dtype), t, w)


def _fused_head_loss_bwd(logits_scaling, z_coef, residuals, cotangents):
    d_h, d_head, t, w = residuals
    g = cotangents[0]  # ce and z leave `chunked_cross_entropy` under stop_gradient: their cotangents are 0
    return (g.astype(d_h.dtype) * d_h, g.astype(d_head.dtype) * d_head, _zero_cotangent(t), jnp.zeros_like(w))


def _zero_cotangent(x):
    return np.zeros(x.shape, jax.dtypes.float0) if not jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros_like(x)


_fused_head_loss.defvjp(_fused_head_loss_fwd, _fused_head_loss_bwd)


def chunked_token_log_probs(hidden, head_weight, targets, *, chunk: int, logits_scaling: float = 1.0,
                            plan: ShardingPlan = ShardingPlan()):
    """Per token, log p(target) (B, T) float32, differentiable, with logits for about `chunk` tokens per device at
    a time forward and backward (each chunk under `jax.checkpoint`, its logits rebuilt in the backward pass, as
    `chunked_cross_entropy`'s "recompute"). For losses over sums of token log-probs per sequence (DPO)."""
    chunks = _DeviceChunks.of(*hidden.shape[:2], chunk, plan)
    per_shard_head = chunks.per_shard_head(head_weight)

    @jax.checkpoint
    def one_chunk(inputs):
        h, t = inputs
        logits = jax.vmap(head_logits, (0, 0, None))(h, per_shard_head, logits_scaling).astype(jnp.float32)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return target_logit - jax.nn.logsumexp(logits, axis=-1)

    return chunks.merge(jax.lax.map(one_chunk, (chunks.split(hidden), chunks.split(targets))))


def chunked_token_scores(hidden, head_weight, targets, *, chunk: int, logits_scaling: float = 1.0,
                         plan: ShardingPlan = ShardingPlan()):
    """Per token, log p(target) and whether the target is the argmax, logits built for about `chunk` tokens
    per device at a time (as `chunked_cross_entropy`): (B, T) float32 and (B, T) bool. For scoring rows too
    long for their logits to exist at once (a 512K window over a 100K vocabulary)."""
    chunks = _DeviceChunks.of(*hidden.shape[:2], chunk, plan)
    per_shard_head = chunks.per_shard_head(head_weight)

    def one_chunk(inputs):
        h, t = inputs
        logits = jax.vmap(head_logits, (0, 0, None))(h, per_shard_head, logits_scaling).astype(jnp.float32)
        chosen = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), t[..., None], axis=-1)[..., 0]
        return chosen, jnp.argmax(logits, axis=-1) == t

    chosen, greedy = jax.lax.map(one_chunk, (chunks.split(hidden), chunks.split(targets)))
    return chunks.merge(chosen), chunks.merge(greedy)
