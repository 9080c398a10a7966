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
from granite_jax.parallel.plan import RESIDUAL, constrain, current_mesh, logical_param, sequence_split


class CausalLMOutput(NamedTuple):
    logits: jax.Array  # (b, T, vocab), compute dtype, already divided by logits_scaling
    aux_loss: jax.Array  # () MoE load-balancing loss (0 for dense models), not yet multiplied by its coefficient


class DecodeCache(NamedTuple):
    """Everything decoding needs besides the parameters. `layers[i]` is a `MambaState` (constant size) or a
    `KVCache` (preallocated for `max_len` tokens); `index` () is the next free cache slot (prompt, including
    its left padding, plus the tokens generated so far, the same for every row); `start` (b,) is the slot of
    each row's first real token."""

    layers: tuple
    index: jax.Array
    start: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int) -> DecodeCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated): each layer's own."""
    return DecodeCache(tuple(DecoderLayer.init_state(config, kind, batch, max_len) for kind in config.layer_types),
                       jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32))


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
        self.subpiece_tokens, self.plan = config.subpiece_tokens, config.sharding

    @staticmethod
    def init_state(config: ModelConfig, layer_type: str, batch: int, max_len: int):
        """The decoding state of a layer of `layer_type`: a `MambaState` or a `KVCache` for `max_len` tokens."""
        if layer_type == MAMBA:
            return Mamba2Mixer.init_state(config, batch)
        return Attention.init_cache(config, batch, max_len)

    def __call__(self, h, *, runs, positions, token_mask, state=None):
        """h (b, T, hidden) → (h, router statistics or None, decoding state or None): the state is returned
        filled when this layer's empty one is given (a prefill)."""
        x = self.input_layernorm(h)
        if self.layer_type == MAMBA:
            with jax.named_scope("mamba"):
                mixed = self.mamba(x, runs=runs, state=state)
        else:
            with jax.named_scope("self_attn"):
                mixed = self.self_attn(x, runs=runs, positions=positions, state=state)
        if state is not None:
            mixed, state = mixed
        h, stats = self._ffn(h + mixed * self.residual_multiplier, token_mask)
        return h, stats, state

    def decode(self, h, *, index, start, positions, state):
        """One token per row, h (b, 1, hidden)."""
        x = self.input_layernorm(h)
        if self.layer_type == MAMBA:
            mixed, state = self.mamba.decode(x, state)
        else:
            mixed, state = self.self_attn.decode(x, index=index, start=start, positions=positions, cache=state)
        return self._ffn_tokens(h + mixed * self.residual_multiplier, None)[0], state

    def _ffn(self, h, token_mask):
        """The MoE/MLP block, over sub-pieces of `subpiece_tokens` of each device's tokens when set."""
        sub = self.subpiece_tokens
        shards = self._sequence_shards()
        T = h.shape[1]
        if not sub or T // shards <= sub:
            return self._ffn_tokens(h, token_mask)
        if (T // shards) % sub:
            raise ValueError(f"subpiece_tokens={sub} does not divide the {T // shards} tokens of a row on a device; "
                             f"use a divisor of {T // shards}")
        b, n = h.shape[0], T // shards // sub

        def by_subpiece(a):  # (b, T, ...) -> (n, b, shards · sub, ...): sub-piece k of every shard's tokens
            a = jnp.moveaxis(a.reshape(b, shards, n, sub, *a.shape[2:]), 2, 0)
            return a.reshape(n, b, shards * sub, *a.shape[4:])

        mask = jnp.ones(h.shape[:2], bool) if token_mask is None else token_mask

        @jax.checkpoint
        def one(stats_sum, inputs):
            h, mask = inputs
            h = constrain(h, RESIDUAL, self.plan)
            out, stats = self._ffn_tokens(h, None if token_mask is None else mask)
            if stats is not None:
                stats_sum = jax.tree.map(jnp.add, stats_sum, stats)
            return stats_sum, out

        zero = None if self.block_sparse_moe is None else RouterStats.zeros(self.block_sparse_moe.num_experts)
        stats, out = jax.lax.scan(one, zero, (by_subpiece(h), by_subpiece(mask)))
        out = out.reshape(n, b, shards, sub, -1)
        return jnp.moveaxis(out, 0, 2).reshape(h.shape), stats

    def _sequence_shards(self) -> int:
        mesh = current_mesh()
        return 1 if mesh is None else self.plan.sequence_shards(mesh)

    def _ffn_tokens(self, h, token_mask):
        x = self.post_attention_layernorm(h)
        with jax.named_scope("shared_mlp"):
            f = self.shared_mlp(x)
        stats = None
        if self.block_sparse_moe is not None:
            with jax.named_scope("block_sparse_moe"):
                routed, stats = self.block_sparse_moe(x, token_mask)
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

    def __call__(self, input_ids, segment_ids=None, positions=None, *, cache: DecodeCache | None = None):
        """input_ids (b, T) → (final hidden states (b, T, hidden), router statistics summed over the layers,
        or None for a dense model). Given an empty decoding `cache` (a prefill), also returns it filled with
        the T tokens: (hidden, statistics, cache)."""
        config = self.config
        _check_inputs(config, input_ids, segment_ids, positions)
        split = sequence_split(config.sharding)
        if split is not None and split.layout != "contiguous":
            # The rows are in a context layout (model/context_layout.py): runs counted over the permuted
            # row would join pieces that are not neighbours, so the layers get the data's segment ids, which
            # the context-parallel conv, SSD and attention compare only between pieces adjacent in the row.
            runs = document_runs(None, input_ids.shape) if segment_ids is None else segment_ids
        else:
            runs = document_runs(segment_ids, input_ids.shape)
        if positions is None:
            positions = positions_within_documents(runs)
        token_mask = None if segment_ids is None else segment_ids > 0

        h = constrain(self.embed(input_ids), RESIDUAL, config.sharding)
        run_layer = _with_remat(config.remat_policy)
        if cache is None and config.scan_layers and config.layer_period < len(self.layers):
            h, stats_sum = self._scan_layers(h, runs, positions, token_mask, run_layer)
            return self.norm(h), stats_sum
        stats_sum, states = None, []
        for i, layer in enumerate(self.layers):
            h, stats, state = run_layer(layer, h, runs, positions, token_mask,
                                         None if cache is None else cache.layers[i])
            states.append(state)
            h = constrain(h, RESIDUAL, config.sharding)
            if stats is not None:
                stats_sum = stats if stats_sum is None else jax.tree.map(jnp.add, stats_sum, stats)
        if cache is None:
            return self.norm(h), stats_sum
        T = input_ids.shape[1]
        return self.norm(h), stats_sum, DecodeCache(tuple(states), jnp.asarray(T, jnp.int32), cache.start)

    def _scan_layers(self, h, runs, positions, token_mask, run_layer):
        """The stack as a `lax.scan` over the repetitions of its layer pattern: the weights of the layers at the
        same place in the pattern are stacked, and one scan step runs one repetition. Same layers, same order,
        same result as the unrolled loop; XLA compiles the pattern once."""
        period = self.config.layer_period
        patterns = [self.layers[j::period] for j in range(period)]  # layers j, j + period, j + 2 period, ...
        graphdefs = [nnx.graphdef(layers[0]) for layers in patterns]
        stacked = [jax.tree.map(lambda *w: jnp.stack(w), *[nnx.state(layer) for layer in layers])
                   for layers in patterns]
        stats_sum = None if self.config.num_local_experts == 0 else RouterStats.zeros(self.config.num_local_experts)

        def repetition(carry, weights):
            h, stats_sum = carry
            for graphdef, state in zip(graphdefs, weights):
                h, stats, _ = run_layer(nnx.merge(graphdef, state), h, runs, positions, token_mask, None)
                h = constrain(h, RESIDUAL, self.config.sharding)
                if stats is not None:
                    stats_sum = jax.tree.map(jnp.add, stats_sum, stats)
            return (h, stats_sum), None

        (h, stats_sum), _ = jax.lax.scan(repetition, (h, stats_sum), stacked)
        return h, stats_sum

    def embed(self, input_ids):
        return (jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.config.compute_dtype)
                * self.config.embedding_multiplier)

    def decode(self, tokens, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """One token per row, tokens (b,), written at slot `cache.index`; returns hidden (b, hidden)."""
        h = self.embed(tokens[:, None])
        positions = (cache.index - cache.start)[:, None]
        states = []
        for layer, state in zip(self.layers, cache.layers):
            h, state = layer.decode(h, index=cache.index, start=cache.start, positions=positions, state=state)
            states.append(state)
        return self.norm(h[:, 0]), DecodeCache(tuple(states), cache.index + 1, cache.start)


def _call_layer(layer, h, runs, positions, token_mask, state):
    return layer(h, runs=runs, positions=positions, token_mask=token_mask, state=state)


def _with_remat(policy: str):
    """The layer call with the configured activation checkpointing (see `ModelConfig.remat_policy`)."""
    if policy == "none":
        return _call_layer
    if policy == "full":
        return _recomputed_in_backward
    return nnx.remat(_call_layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def _recomputed_in_backward(layer, h, runs, positions, token_mask, state):
    """The layer call saving only its inputs for the backward pass, which recomputes the layer just before
    differentiating it. `jax.checkpoint` does not do this on XLA:CPU: its compiler drops optimization barriers
    before common-subexpression elimination, which then merges the recomputation with the forward pass and
    keeps every layer's activations alive (measured: a 2-layer stack's temporaries were the same with and
    without it). Here the recomputation's input also depends on the incoming cotangent (`h + 0 · one element
    of it`, exact, one fused add), so no compiler can merge it with the forward pass or run it before the
    backward pass reaches the layer; on GPU/TPU the barrier alone already does that. A prefill (`state`
    given) has no backward pass and runs the layer as it is."""
    if state is not None:
        return _call_layer(layer, h, runs, positions, token_mask, state)
    graphdef, weights = nnx.split(layer)

    def apply(weights, h, inputs):
        return _call_layer(nnx.merge(graphdef, weights), h, *inputs, None)

    @jax.custom_vjp
    def recomputed(weights, h, inputs):
        return apply(weights, h, inputs)

    def forward(weights, h, inputs):
        return apply(weights, h, inputs), (weights, h, inputs)

    def backward(saved, cotangent):
        (weights, h, inputs), cotangent = jax.lax.optimization_barrier((saved, cotangent))
        h = h + cotangent[0].reshape(-1)[0].astype(h.dtype) * 0  # see below
        _, pullback = jax.vjp(lambda weights, h: apply(weights, h, inputs), weights, h)
        d_weights, d_h = pullback(cotangent)
        no_gradient = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), inputs)
        return d_weights, d_h, no_gradient

    recomputed.defvjp(forward, backward)
    return recomputed(weights, h, (runs, positions, token_mask))


def head_logits(hidden: jax.Array, weight: jax.Array, logits_scaling: float) -> jax.Array:
    """(hidden @ weight.T) / logits_scaling in hidden's dtype; weight (vocab, hidden) is cast to it."""
    logits = jnp.einsum("...h,vh->...v", hidden, weight.astype(hidden.dtype))
    return logits / jnp.asarray(logits_scaling, logits.dtype)


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

    def output_weight(self) -> jax.Array:
        """The output head as a (vocab, hidden) parameter: the embedding when tied, else lm_head's kernel."""
        return self.model.embed_tokens[...] if self.lm_head is None else self.lm_head.kernel[...].T

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output head on final hidden states: (h @ W_lm) / logits_scaling, in the compute dtype."""
        return head_logits(hidden, self.output_weight(), self.config.logits_scaling)

    def aux_loss(self, stats: RouterStats | None) -> jax.Array:
        if stats is None:
            return jnp.zeros((), jnp.float32)
        return load_balancing_loss(stats, self.config.num_local_experts)

    def __call__(self, input_ids, segment_ids=None, positions=None) -> CausalLMOutput:
        hidden, stats = self.model(input_ids, segment_ids, positions)
        return CausalLMOutput(logits=self.logits(hidden), aux_loss=self.aux_loss(stats))

    def init_cache(self, batch: int, max_len: int) -> DecodeCache:
        """An empty decoding cache for `batch` rows of up to `max_len` tokens."""
        return init_cache(self.config, batch, max_len)

    def prefill(self, input_ids, start, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """Left-padded prompts (b, T) whose real tokens begin at `start` (b,) → (next-token logits (b, vocab),
        the cache filled with the prompts). The padding is a document of its own, so no real token sees it."""
        T = input_ids.shape[1]
        segment_ids = (jnp.arange(T)[None, :] >= start[:, None]).astype(jnp.int32)
        hidden, _, cache = self.model(input_ids, segment_ids, cache=cache._replace(start=start.astype(jnp.int32)))
        return self.logits(hidden[:, -1]), cache

    def decode(self, tokens, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """tokens (b,) → (next-token logits (b, vocab), cache advanced by one slot)."""
        hidden, cache = self.model.decode(tokens, cache)
        return self.logits(hidden), cache


def _check_inputs(config: ModelConfig, input_ids, segment_ids, positions) -> None:
    """Shape and dtype checks that would otherwise surface as XLA errors (values are checked when concrete)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len); got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers; got dtype {input_ids.dtype}")
    for name, value in (("segment_ids", segment_ids), ("positions", positions)):
        if value is not None and tuple(value.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; expected input_ids' shape {tuple(input_ids.shape)}")
        if value is not None and not jnp.issubdtype(value.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers; got dtype {value.dtype}")
    if not isinstance(input_ids, jax.core.Tracer):
        ids = np.asarray(input_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
            raise ValueError(f"input_ids has values in [{ids.min()}, {ids.max()}]; expected [0, {config.vocab_size})")
