"""The language-modelling objective (its loss over the chunked output head, `granite_jax.model.head`), and the
train and eval steps of any objective (DPO's: `train/dpo.py`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from granite_jax.model.context_layout import in_context_layout
from granite_jax.model.head import chunked_cross_entropy
from granite_jax.model.lora import enable_dropout
from granite_jax.train.optim import gradient_norm


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any


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


@dataclasses.dataclass(frozen=True)
class LanguageModeling:
    """The objective of pretraining and SFT: `loss_fn` (cross-entropy over the weighted tokens, the MoE
    load-balancing loss, the z-loss); evaluated as the mean token cross-entropy."""

    aux_coef: float
    z_loss: float
    chunk: int
    loss_impl: str = "recompute"
    uses_reference: ClassVar[bool] = False  # no reference model

    def train_loss(self, params, graphdef, batch, *, frozen=None, reference=None, dropout_key=None):
        """(total, metrics), differentiated in `params`."""
        return loss_fn(params, graphdef, batch, aux_coef=self.aux_coef, z_loss=self.z_loss, chunk=self.chunk,
                       loss_impl=self.loss_impl, frozen=frozen, dropout_key=dropout_key)

    def eval_sums(self, params, graphdef, batch, *, frozen=None, reference=None):
        """({"loss": Σ token losses}, tokens): summed over a validation set, then divided."""
        _, metrics = loss_fn(params, graphdef, batch, aux_coef=0.0, z_loss=0.0, chunk=self.chunk,
                             loss_impl=self.loss_impl, frozen=frozen)
        return {"loss": metrics["loss"] * metrics["tokens"]}, metrics["tokens"]


DROPOUT_STREAM = 0xD0  # the dropout keys are the run seed's key folded with this, then with the step


def make_train_step(tx: optax.GradientTransformation, objective, *, dropout_seed: int | None = None):
    """`train_step(graphdef, state, batch, frozen=None, reference=None) -> (state, metrics)` of `objective`
    (`LanguageModeling`, or `granite_jax.train.dpo.PreferenceOptimization`), jitted with the model's graphdef
    static: the model's configuration, its sharding plan included, is part of what is compiled, as is the mesh
    set with `jax.set_mesh`. The state is donated. `frozen`: the model state that is not trained (LoRA's base
    weights), not donated; `reference`: the reference model's parameters of an objective that uses one (DPO;
    None with LoRA: the adapters turned off). `dropout_seed`: the LoRA adapters' dropout is on, its key for step
    s the seed's key folded with DROPOUT_STREAM and s (a resumed run drops the same features)."""
    @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
    def train_step(graphdef, state: TrainState, batch, frozen=None, reference=None):
        key = (None if dropout_seed is None else
               jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), DROPOUT_STREAM), state.step))
        (_, metrics), grads = jax.value_and_grad(objective.train_loss, has_aux=True)(
            state.params, graphdef, batch, frozen=frozen, reference=reference, dropout_key=key)
        metrics["grad_norm"] = gradient_norm(grads)
        return apply_finite_update(tx, state, grads, metrics)

    return train_step


def apply_finite_update(tx: optax.GradientTransformation, state: TrainState, grads, metrics: dict):
    """The state after `tx`'s update with `grads`, or the state as it was (parameters and optimizer state,
    accumulated gradients included) when the gradients or the update are not finite; `skipped_update` (a
    boolean) is true then. A loss can be finite while its gradient or Adam's update overflows: such an update is
    never applied, so no checkpoint holds non-finite weights (large-scale trainers skip and count such steps
    too). The step counter advances either way: it counts the batches read."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Element-wise: the norm of a huge but finite update (1e30 per entry) overflows float32.
    skipped = ~jnp.isfinite(metrics["grad_norm"]) | jnp.any(jnp.asarray(
        [~jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))

    def unless_skipped(new, old):
        return jax.tree.map(lambda n, o: jnp.where(skipped, o, n), new, old)

    # The flag itself is an output of the step: XLA then computes it once. Were every output a function of it
    # (`1.0 - finite`), XLA would fuse a copy of the chain that combines the leaves' flags into each of the
    # 3 x leaves selects: 2,868 of the tiny model's 9,062 train-step ops (benchmarks/RESULTS.md, session 10).
    metrics["skipped_update"] = skipped
    return TrainState(state.step + 1, unless_skipped(params, state.params),
                      unless_skipped(opt_state, state.opt_state)), metrics


def make_eval_step(objective):
    """`eval_step(graphdef, params, batch, frozen=None, reference=None) -> ({metric: sum}, count)` of
    `objective` (its `eval_sums`), jitted with the graphdef static; no dropout."""
    @functools.partial(jax.jit, static_argnums=0)
    def eval_step(graphdef, params, batch, frozen=None, reference=None):
        return objective.eval_sums(params, graphdef, batch, frozen=frozen, reference=reference)

    return eval_step
