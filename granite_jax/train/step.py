"""Loss, train step and eval step.

The cross-entropy is computed `chunk` tokens at a time under `jax.checkpoint`, so logits over the (up to
100K) vocabulary exist for one chunk at a time, forward and backward, never for the whole batch.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any


def chunked_cross_entropy(hidden, head, targets, weights, *, chunk: int, z_loss: float = 0.0):
    """Σ weights · CE and Σ weights · logsumexp² over all tokens, logits built for about `chunk` tokens at a time.

    hidden (B, T, H); head maps (..., H) → (..., V) logits; targets, weights (B, T). Returns (ce_sum, z_sum).
    The chunks are slices of the sequence, every row at once (B × chunk/B tokens), so that the batch dimension
    keeps its sharding: chunking the flattened batch would put each chunk on one device.
    """
    B, T, H = hidden.shape
    length = max(1, min(T, chunk // B))
    pad = -T % length
    n = (T + pad) // length
    split = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(  # noqa: E731
        B, n, length, *x.shape[2:]), 1, 0)
    hidden, targets, weights = split(hidden), split(targets), split(weights)

    @jax.checkpoint
    def one_chunk(carry, inputs):
        h, t, w = inputs
        logits = head(h).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        ce, z = carry
        return (ce + jnp.sum(w * (lse - target_logit)), z + jnp.sum(w * lse**2)), None

    (ce, z), _ = jax.lax.scan(one_chunk, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                              (hidden, targets, weights))
    return ce, z


def loss_fn(params, graphdef, batch, *, aux_coef: float, z_loss: float, chunk: int):
    """Mean token cross-entropy + aux_coef · MoE load-balancing loss + z_loss · mean logsumexp²."""
    model = nnx.merge(graphdef, params)
    hidden, stats = model.model(batch["input_ids"], batch["segment_ids"], batch["positions"])
    weights = batch["loss_weights"]
    ce_sum, z_sum = chunked_cross_entropy(hidden, model.logits, batch["targets"], weights, chunk=chunk)
    tokens = jnp.maximum(jnp.sum(weights), 1.0)
    ce = ce_sum / tokens
    aux = model.aux_loss(stats)
    total = ce + aux_coef * aux + z_loss * z_sum / tokens
    dropped = jnp.zeros((), jnp.float32) if stats is None else stats.dropped
    return total, dict(loss=ce, aux_loss=aux, z=z_sum / tokens, tokens=jnp.sum(weights), moe_dropped=dropped)


def make_train_step(graphdef, tx: optax.GradientTransformation, *, aux_coef: float, z_loss: float, chunk: int):
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, graphdef=graphdef, aux_coef=aux_coef, z_loss=z_loss,
                                                   chunk=chunk), has_aux=True)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_step(state: TrainState, batch):
        (_, metrics), grads = grad_fn(state.params, batch=batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(graphdef, *, chunk: int):
    @jax.jit
    def eval_step(params, batch):
        _, metrics = loss_fn(params, graphdef, batch, aux_coef=0.0, z_loss=0.0, chunk=chunk)
        return metrics["loss"] * metrics["tokens"], metrics["tokens"]

    return eval_step
