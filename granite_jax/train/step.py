"""Loss, train step and eval step.

The cross-entropy is computed `chunk` tokens per device at a time (`chunked_cross_entropy`), so logits over the
(up to 100K) vocabulary exist for one chunk at a time, forward and backward, never for the whole batch. On a mesh,
every batch shard multiplies its rows by its own copy of the output head (gathered once per step), so that
each device sums its head gradient over its chunks and the devices' sums are reduced once per step: with one
head shared by all shards, XLA reduces the head gradient across devices (and re-gathers the FSDP-sharded
head) once per chunk — for granite-4.0-h-small on 64 devices, 256 chunks of a 100352 × 4096 gradient.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from granite_jax.model.documents import document_runs, positions_within_documents
from granite_jax.model.granite import head_logits
from granite_jax.model.lora import enable_dropout
from granite_jax.parallel.plan import ShardingPlan, constrain, current_mesh
from granite_jax.parallel.sequence import layout_order
from granite_jax.train.optim import gradient_norm


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any


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


def context_order(length: int, plan: ShardingPlan) -> np.ndarray | None:
    """The token order of a row of `length` under the plan's context layout on the current mesh (row[order] is
    in the layout), or None when rows stay in order (contiguous layout, or no split sequence)."""
    mesh = current_mesh()
    if mesh is None or plan.context_layout == "contiguous" or plan.sequence_shards(mesh) == 1:
        return None
    return layout_order(length, plan.sequence_shards(mesh), plan.context_layout)


def in_context_layout(batch: dict, plan: ShardingPlan) -> dict:
    """The batch as the model takes it under a non-contiguous context layout (`parallel/sequence.py`): positions
    counted in row order, then every per-token array (ids, segment ids, positions, targets, weights) permuted
    into the layout. Applied once per step, to integer and weight arrays only; the loss is a sum over tokens,
    so the order does not change it. The batch itself under the contiguous layout or an unsplit sequence."""
    ids = batch["input_ids"]
    order = context_order(ids.shape[1], plan)
    if order is None:
        return batch
    if batch.get("positions") is None:
        batch = {**batch, "positions": positions_within_documents(document_runs(batch.get("segment_ids"), ids.shape))}
    return {name: (value if value is None else jnp.take(value, order, axis=1)) for name, value in batch.items()}


def loss_fn(params, graphdef, batch, *, aux_coef: float, z_loss: float, chunk: int, loss_impl: str = "recompute",
            frozen=None, dropout_key=None):
    """Mean token cross-entropy + aux_coef · MoE load-balancing loss + z_loss · mean logsumexp².

    `params` are the weights differentiated; `frozen`, the rest of the model's state when only some weights are
    trained (LoRA: the base weights), merged in but not differentiated. `dropout_key`: this step's key for the
    LoRA adapters' dropout (None: no dropout)."""
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    if dropout_key is not None:
        enable_dropout(model, dropout_key)
    batch = in_context_layout(batch, model.config.sharding)
    hidden, stats = model.model(batch["input_ids"], batch["segment_ids"], batch["positions"])
    weights = batch["loss_weights"]
    with jax.named_scope("head"):
        objective, ce_sum, z_sum = chunked_cross_entropy(
            hidden, model.output_weight(), batch["targets"], weights, chunk=chunk, z_coef=z_loss,
            impl=loss_impl, logits_scaling=model.config.logits_scaling, plan=model.config.sharding)
    tokens = jnp.maximum(jnp.sum(weights), 1.0)
    ce = ce_sum / tokens
    aux = model.aux_loss(stats)
    total = objective / tokens + aux_coef * aux
    dropped = jnp.zeros((), jnp.float32) if stats is None else stats.dropped
    return total, dict(loss=ce, aux_loss=aux, z=z_sum / tokens, tokens=jnp.sum(weights), moe_dropped=dropped)


DROPOUT_STREAM = 0xD0  # the dropout keys are the run seed's key folded with this, then with the step


def make_train_step(tx: optax.GradientTransformation, *, aux_coef: float, z_loss: float, chunk: int,
                    loss_impl: str = "recompute", dropout_seed: int | None = None, dpo=None):
    """`train_step(graphdef, state, batch, frozen=None, reference=None) -> (state, metrics)`, jitted with the
    model's graphdef static: the model's configuration, its sharding plan included, is part of what is compiled,
    as is the mesh set with `jax.set_mesh`. The state is donated. `frozen`: the model state that is not trained
    (LoRA's base weights), not donated. `dropout_seed`: the LoRA adapters' dropout is on, its key for step s the seed's
    key folded with DROPOUT_STREAM and s (a resumed run drops the same features). `dpo` (a `DPOConfig`): the
    DPO loss over preference pairs (`train/dpo.py`) instead of the cross-entropy, `reference` the frozen starting
    parameters (None with LoRA: the adapters turned off); z_loss and loss_impl do not apply to it."""
    if dpo is None:
        loss = functools.partial(loss_fn, aux_coef=aux_coef, z_loss=z_loss, chunk=chunk, loss_impl=loss_impl)
    else:
        from granite_jax.train.dpo import dpo_loss_fn

        loss = functools.partial(dpo_loss_fn, beta=dpo.beta, label_smoothing=dpo.label_smoothing, loss=dpo.loss,
                                 aux_coef=aux_coef, chunk=chunk)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
    def train_step(graphdef, state: TrainState, batch, frozen=None, reference=None):
        key = (None if dropout_seed is None else
               jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), DROPOUT_STREAM), state.step))
        extra = {} if dpo is None else {"reference": reference}
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, graphdef, batch, frozen=frozen,
                                                                     dropout_key=key, **extra)
        metrics["grad_norm"] = gradient_norm(grads)
        return apply_finite_update(tx, state, grads, metrics)

    return train_step


def apply_finite_update(tx: optax.GradientTransformation, state: TrainState, grads, metrics: dict):
    """The state after `tx`'s update with `grads`, or the state as it was (parameters and optimizer state,
    accumulated gradients included) when the gradients or the update are not finite; `skipped_update` is 1
    then. A loss can be finite while its gradient or Adam's update overflows: such an update is never applied,
    so no checkpoint holds non-finite weights (large-scale trainers skip and count such steps too). The step
    counter advances either way: it counts the batches read."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Element-wise: the norm of a huge but finite update (1e30 per entry) overflows float32.
    finite = jnp.isfinite(metrics["grad_norm"]) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))

    def unless_skipped(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    metrics["skipped_update"] = 1.0 - finite.astype(jnp.float32)
    return TrainState(state.step + 1, unless_skipped(params, state.params),
                      unless_skipped(opt_state, state.opt_state)), metrics


def make_eval_step(*, chunk: int, loss_impl: str = "recompute"):
    """`eval_step(graphdef, params, batch, frozen=None) -> (Σ token losses, tokens)`, jitted with the graphdef
    static; no dropout."""
    @functools.partial(jax.jit, static_argnums=0)
    def eval_step(graphdef, params, batch, frozen=None):
        _, metrics = loss_fn(params, graphdef, batch, aux_coef=0.0, z_loss=0.0, chunk=chunk, loss_impl=loss_impl,
                             frozen=frozen)
        return metrics["loss"] * metrics["tokens"], metrics["tokens"]

    return eval_step
