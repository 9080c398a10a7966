"""Direct preference optimisation: the loss over packed preference pairs, and its reference model.

A batch is rows of packed pairs (`granite_jax.data.preference`): pair k of a row is its segments 2k - 1 (chosen)
and 2k (rejected), loss weights 1 on the reply tokens. The log-probability of a reply is the sum of its tokens'
log p(target) — per-token log-probs come out of the chunked head (`chunked_token_log_probs`, logits for one
chunk at a time) and are summed per segment with `jax.ops.segment_sum`, so nothing (tokens × vocab) exists
beyond what the cross-entropy loss builds.

The loss of a pair, with δ = (π_c − ref_c) − (π_r − ref_r) the difference of its two log-ratios:
- sigmoid (DPO, Rafailov et al. 2023), with cDPO's label smoothing ε: −(1 − ε)·log σ(β·δ) − ε·log σ(−β·δ);
- ipo (Azar et al. 2023, eq. 17, on per-token mean log-ratios as TRL computes it): (δ̄ − 1/(2β))².
Rewards are β·(π − ref); the reward accuracy is the fraction of pairs whose chosen reward is the larger.

The reference log-probs are computed in the same step, under `stop_gradient`, from the starting weights:
a frozen copy of them (`reference`; one more copy of the parameters in memory, not in the optimizer state), or
with LoRA the same model with every adapter weight set to zero, which is exactly the base model (no copy).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.model.context_layout import in_context_layout
from granite_jax.model.head import chunked_token_log_probs
from granite_jax.model.lora import enable_dropout

PAIR_METRICS = ("loss", "reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin")


def token_log_probs(model, batch: dict, *, chunk: int):
    """(log p(target) per token (B, T), the model's MoE statistics) for the batch, logits chunked."""
    hidden, stats = model.model(batch["input_ids"], batch["segment_ids"], batch["positions"])
    log_probs = chunked_token_log_probs(hidden, model.output_weight(), batch["targets"], chunk=chunk,
                                        logits_scaling=model.config.logits_scaling, plan=model.config.sharding)
    return log_probs, stats


def segment_sums(values, segment_ids):
    """Per row, the sum of `values` (B, T) over each segment id 0..T: (B, T + 1). Segment ids are < T + 1 as each
    segment holds at least one token."""
    return jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=v.shape[0] + 1))(values, segment_ids)


def pair_sums(values, segment_ids):
    """(chosen, rejected) sums of `values` per pair slot, each (B, T // 2): slot k - 1 of a row is its pair k,
    segments 2k - 1 and 2k. Slots without a pair sum to 0."""
    sums = segment_sums(values, segment_ids)
    pairs = values.shape[1] // 2
    return sums[:, 1:2 * pairs:2], sums[:, 2:2 * pairs + 1:2]


def reply_log_probs(log_probs, batch: dict):
    """(chosen, rejected) reply log-probs Σ weight · log p(target) per pair slot, (B, T // 2) each."""
    return pair_sums(log_probs * batch["loss_weights"], batch["segment_ids"])


def pair_mask(batch: dict):
    """(B, T // 2) float: 1 where the row has pair k (its chosen segment has tokens)."""
    tokens, _ = pair_sums((batch["segment_ids"] > 0).astype(jnp.float32), batch["segment_ids"])
    return (tokens > 0).astype(jnp.float32)


def dpo_pair_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float,
                    label_smoothing: float = 0.0, loss: str = "sigmoid", chosen_tokens=None, rejected_tokens=None):
    """Per pair (loss, chosen reward, rejected reward), from the four reply log-probs (any shape, float32).
    `chosen_tokens` / `rejected_tokens`: the replies' token counts, for the IPO loss's per-token means."""
    chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    if loss == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
    elif loss == "ipo":
        delta = chosen_ratio / jnp.maximum(chosen_tokens, 1.0) - rejected_ratio / jnp.maximum(rejected_tokens, 1.0)
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss={loss!r}: expected 'sigmoid' or 'ipo'")
    return losses, beta * chosen_ratio, beta * rejected_ratio


def reference_model(graphdef, params, *, frozen=None, reference=None):
    """The reference model: `reference` (a frozen copy of the starting parameters) when given, else — LoRA, the
    base weights in `frozen` — the model with every adapter weight zero, which computes the base model exactly."""
    if reference is not None:
        return nnx.merge(graphdef, reference) if frozen is None else nnx.merge(graphdef, reference, frozen)
    if frozen is None:
        raise ValueError("DPO needs a reference: a copy of the starting parameters, or LoRA adapters to turn off")
    return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, params), frozen)


def dpo_loss_fn(params, graphdef, batch, *, beta: float, label_smoothing: float = 0.0, loss: str = "sigmoid",
                aux_coef: float = 0.0, chunk: int, frozen=None, reference=None, dropout_key=None):
    """Mean DPO loss over the batch's pairs + aux_coef · MoE load-balancing loss, and the pair metrics (means over
    pairs). `params` are differentiated; `frozen` (LoRA's base weights) and `reference` are not."""
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    if dropout_key is not None:
        enable_dropout(model, dropout_key)
    batch = in_context_layout(batch, model.config.sharding)
    log_probs, stats = token_log_probs(model, batch, chunk=chunk)
    ref_log_probs, _ = token_log_probs(reference_model(graphdef, params, frozen=frozen, reference=reference), batch,
                                       chunk=chunk)
    policy_chosen, policy_rejected = reply_log_probs(log_probs, batch)
    reference_chosen, reference_rejected = jax.lax.stop_gradient(reply_log_probs(ref_log_probs, batch))
    chosen_tokens, rejected_tokens = pair_sums(batch["loss_weights"], batch["segment_ids"])
    losses, chosen_rewards, rejected_rewards = dpo_pair_losses(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta,
        label_smoothing=label_smoothing, loss=loss, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    mask = pair_mask(batch)
    pairs = jnp.sum(mask)

    def mean(x):
        return jnp.sum(mask * x) / jnp.maximum(pairs, 1.0)

    aux = model.aux_loss(stats)
    dpo = mean(losses)
    chosen_rewards, rejected_rewards = jax.lax.stop_gradient((chosen_rewards, rejected_rewards))
    dropped = jnp.zeros((), jnp.float32) if stats is None else stats.dropped
    return dpo + aux_coef * aux, dict(
        loss=dpo, aux_loss=aux, tokens=jnp.sum(batch["loss_weights"]), moe_dropped=dropped, pairs=pairs,
        reward_accuracy=mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        reward_chosen=mean(chosen_rewards), reward_rejected=mean(rejected_rewards),
        reward_margin=mean(chosen_rewards - rejected_rewards))


@dataclasses.dataclass(frozen=True)
class PreferenceOptimization:
    """The DPO objective (`dpo_loss_fn`: `pair_loss` "sigmoid" or "ipo"); evaluated as the pair metrics'
    means (PAIR_METRICS)."""

    beta: float
    label_smoothing: float
    pair_loss: str
    aux_coef: float
    chunk: int
    uses_reference: ClassVar[bool] = True  # the starting weights' log-probs, computed in the same step

    def train_loss(self, params, graphdef, batch, *, frozen=None, reference=None, dropout_key=None):
        """(total, metrics), differentiated in `params`."""
        return dpo_loss_fn(params, graphdef, batch, beta=self.beta, label_smoothing=self.label_smoothing,
                           loss=self.pair_loss, aux_coef=self.aux_coef, chunk=self.chunk, frozen=frozen,
                           reference=reference, dropout_key=dropout_key)

    def eval_sums(self, params, graphdef, batch, *, frozen=None, reference=None):
        """({metric: Σ over pairs}, pairs)."""
        _, metrics = dpo_loss_fn(params, graphdef, batch, beta=self.beta, label_smoothing=self.label_smoothing,
                                 loss=self.pair_loss, chunk=self.chunk, frozen=frozen, reference=reference)
        return {name: metrics[name] * metrics["pairs"] for name in PAIR_METRICS}, metrics["pairs"]
