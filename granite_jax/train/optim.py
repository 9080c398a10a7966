"""Optimizer and learning-rate schedules (optax): AdamW with decoupled weight decay, global-norm clipping,
warmup then cosine or WSD decay, gradient accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from granite_jax.train.config import OptimizerConfig
from granite_jax.tree import path_names

# Parameters that are never decayed: norms, biases and the Mamba per-head constants.
_NO_DECAY_LEAVES = {"bias", "A_log", "D", "dt_bias"}


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    warmup = min(config.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=config.min_lr_ratio)
    else:  # wsd: hold the peak, then decay linearly over the last `decay_fraction` of the steps
        decay = max(int(rest * config.decay_fraction), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [rest - decay])
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def update_learning_rate(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The learning rate of optimizer update u (counted from 0). `total_steps`, the warmup and the schedule count
    micro-steps (batches); with gradient accumulation over k of them, update u comes after micro-step
    (u + 1)·k and takes the schedule's value at micro-step u·k, so the schedule ends where the run does (optax's
    MultiSteps counts updates: a schedule over micro-steps given to it unchanged would only reach 1/k of its
    length)."""
    schedule, k = learning_rate_schedule(config, total_steps), config.grad_accum_steps
    return schedule if k == 1 else (lambda update: schedule(update * k))


def learning_rate_at(config: OptimizerConfig, total_steps: int, step: int) -> float:
    """The learning rate applied by the update that micro-step `step` (from 1) contributes to."""
    return float(update_learning_rate(config, total_steps)((step - 1) // config.grad_accum_steps))


def decay_mask(params: nnx.State) -> nnx.State:
    """True for weights that get weight decay: matrices and embeddings, not norms, biases or A_log/D/dt_bias."""
    def wants_decay(path, leaf):
        names = path_names(path)
        return leaf.ndim >= 2 and not _NO_DECAY_LEAVES & set(names) and not any("norm" in n for n in names)
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def gradient_norm(grads) -> jax.Array:
    """The global L2 norm of a gradient tree (optax.global_norm), its leaves summed in reverse parameter order:
    last layer first, the order the backward pass produces them. XLA:CPU's memory scheduler follows the order
    of the sum's operands; summed in parameter order (the embedding first, which the backward pass finishes
    last) it schedules every layer's rematerialised forward pass before the first layer's backward, and the
    tiny model's step at 2K tokens holds 218 KB per token instead of 120 (4 Mamba layers, `remat_policy:
    full`)."""
    return optax.global_norm(jax.tree.leaves(grads)[::-1])


def clip_by_gradient_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm (same formula) with the norm of `gradient_norm`."""
    def update(updates, state, params=None):
        del params
        norm = gradient_norm(updates)
        keep = norm < max_norm
        return jax.tree.map(lambda u: jnp.where(keep, u, u / norm.astype(u.dtype) * max_norm), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = update_learning_rate(config, total_steps)
    tx = optax.chain(
        clip_by_gradient_norm(config.clip_norm),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                    mask=decay_mask),
    )
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return tx
