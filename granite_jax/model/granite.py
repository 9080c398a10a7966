"""The Granite 4.0 decoder stack and causal-LM head (`GraniteMoeHybridForCausalLM`).

Module and attribute names mirror the checkpoint (`model.layers[i].mamba.in_proj` ↔
`model.layers.{i}.mamba.in_proj.weight`), so conversion is a rename plus a transpose.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.config import MAMBA, ModelConfig
from granite_jax.model.attention import Attention
from granite_jax.model.documents import document_runs, positions_within_documents
from granite_jax.model.linear import make_linear
from granite_jax.model.mamba import Mamba2Mixer
from granite_jax.model.moe import MoE, RouterStats, SharedMLP, load_balancing_loss
from granite_jax.model.norms import RMSNorm
from granite_jax.parallel import logical_param


class CausalLMOutput(NamedTuple):
    logits: jax.Array  # (b, T, vocab), compute dtype, already divided by logits_scaling
    aux_loss: jax.Array  # () MoE load-balancing loss (0 for dense models), not yet multiplied by its coefficient


class DecoderLayer(nnx.Module):
    """Pre-norm mixer (Mamba or attention) and pre-norm FFN (routed experts + shared MLP), each added to the
    residual stream scaled by `residual_multiplier`."""

    def __init__(self, config: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        self.layer_type = layer_type
        self.residual_multiplier = config.residual_multiplier
        norm = lambda: RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=config.compute_dtype,  # noqa: E731
                               param_dtype=config.param_dtype)
        self.input_layernorm = norm()
        if layer_type == MAMBA:
            self.mamba = Mamba2Mixer(config, rngs=rngs)
        else:
            self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.block_sparse_moe = MoE(config, rngs=rngs) if config.is_moe else None
        self.shared_mlp = SharedMLP(config, rngs=rngs)

    def __call__(self, h, *, runs, positions, token_mask):
        u = self.input_layernorm(h)
        if self.layer_type == MAMBA:
            u = self.mamba(u, runs=runs)
        else:
            u = self.self_attn(u, runs=runs, positions=positions)
        h = h + u * self.residual_multiplier
        u = self.post_attention_layernorm(h)
        f = self.shared_mlp(u)
        stats = None
        if self.block_sparse_moe is not None:
            routed, stats = self.block_sparse_moe(u, token_mask)
            f = routed + f
        return h + f * self.residual_multiplier, stats


class GraniteModel(nnx.Module):
    """`model`: embeddings, decoder layers, final norm. Returns hidden states and summed router statistics."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        embedding = nnx.initializers.normal(config.initializer_range)(
            rngs.params(), (config.vocab_size, config.hidden_size), config.param_dtype)
        if config.pad_token_id is not None:  # transformers zeroes the padding row at init
            embedding = embedding.at[config.pad_token_id].set(0)
        self.embed_tokens = logical_param(embedding, ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(config, kind, rngs=rngs) for kind in config.layer_types])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=config.compute_dtype,
                            param_dtype=config.param_dtype)

    def __call__(self, input_ids, segment_ids=None, positions=None) -> tuple[jax.Array, RouterStats | None]:
        config = self.config
        _check_inputs(config, input_ids, segment_ids, positions)
        runs = document_runs(segment_ids, input_ids.shape)
        if positions is None:
            positions = positions_within_documents(runs)
        token_mask = None if segment_ids is None else segment_ids > 0

        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(config.compute_dtype) * config.embedding_multiplier
        run_layer = _with_remat(config.remat_policy)
        total = None
        for layer in self.layers:
            h, stats = run_layer(layer, h, runs, positions, token_mask)
            if stats is not None:
                total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        return self.norm(h), total


def _call_layer(layer, h, runs, positions, token_mask):
    return layer(h, runs=runs, positions=positions, token_mask=token_mask)


def _with_remat(policy: str):
    """The layer call, under `jax.checkpoint` with the configured policy (see `ModelConfig.remat_policy`)."""
    if policy == "none":
        return _call_layer
    save = {"full": jax.checkpoint_policies.nothing_saveable,
            "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]
    return nnx.remat(_call_layer, policy=save)


class GraniteForCausalLM(nnx.Module):
    """Granite 4.0 causal LM. `GraniteForCausalLM(config, rngs=nnx.Rngs(0))(input_ids, segment_ids, positions)`.

    input_ids (b, T) int; segment_ids (b, T) int, one id >= 1 per packed document, 0 for padding (None: one
    document per row); positions (b, T) int, used by RoPE only (None: position within each document).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = GraniteModel(config, rngs=rngs)
        self.lm_head = (None if config.tie_word_embeddings else
                        make_linear(config, config.hidden_size, config.vocab_size, ("embed", "vocab"),
                                    use_bias=False, rngs=rngs))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output head on final hidden states: (h @ W_lm) / logits_scaling, in the compute dtype."""
        if self.lm_head is None:
            weight = self.model.embed_tokens[...].astype(self.config.compute_dtype)
            logits = jnp.einsum("...h,vh->...v", hidden, weight)
        else:
            logits = self.lm_head(hidden)
        return logits / jnp.asarray(self.config.logits_scaling, logits.dtype)

    def aux_loss(self, stats: RouterStats | None) -> jax.Array:
        if stats is None:
            return jnp.zeros((), jnp.float32)
        return load_balancing_loss(stats, self.config.num_local_experts)

    def __call__(self, input_ids, segment_ids=None, positions=None) -> CausalLMOutput:
        hidden, stats = self.model(input_ids, segment_ids, positions)
        return CausalLMOutput(logits=self.logits(hidden), aux_loss=self.aux_loss(stats))


def _check_inputs(config: ModelConfig, input_ids, segment_ids, positions) -> None:
    """Shape and dtype checks that would otherwise surface as XLA errors (values are checked when concrete)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len); got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers; got dtype {input_ids.dtype}")
    for name, value in (("segment_ids", segment_ids), ("positions", positions)):
        if value is not None and tuple(value.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}; expected input_ids' shape {tuple(input_ids.shape)}")
        if value is not None and not jnp.issubdtype(value.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers; got dtype {value.dtype}")
    if not isinstance(input_ids, jax.core.Tracer):
        ids = np.asarray(input_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
            raise ValueError(f"input_ids has values in [{ids.min()}, {ids.max()}]; expected [0, {config.vocab_size})")
