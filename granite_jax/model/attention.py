"""Grouped-query self-attention with NoPE or RoPE, for packed sequences.

A query attends to keys at or before it *in the same document* (same segment id). Scores are scaled by
`attention_multiplier` (not 1/sqrt(head_dim)) and normalised in float32, as transformers does.

Memory stays linear in the sequence length per query block: queries are processed `block_size` at a time
under `jax.checkpoint`, so neither the forward nor the backward pass holds the full (T x T) score matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.model.linear import make_linear

# Finite "minus infinity": a fully masked row (only padding rows added to fill the last block) then gets
# uniform weights instead of NaNs, which would otherwise leak into dk/dv in the backward pass.
_MASKED = -1e30


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (b, T, head_dim) for the half-split ("NeoX") rotary convention, computed in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (b, T, heads, d): x*cos + rotate_half(x)*sin with rotate_half(x) = [-x2, x1]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def segment_causal_attention(q, k, v, segment_ids, *, scale: float, block_size: int) -> jax.Array:
    """softmax(scale * q k^T + mask) v with a same-document causal mask.

    q (b, T, n_h, d), k/v (b, T, n_kv, d), segment_ids (b, T). Returns (b, T, n_h, d) in q's dtype.
    """
    b, T, n_h, d = q.shape
    n_kv = k.shape[2]
    group = n_h // n_kv
    block = min(block_size, T)
    n_blocks = -(-T // block)
    pad = n_blocks * block - T
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n_blocks, block, n_kv, group, d)
    q_segments = jnp.pad(segment_ids, ((0, 0), (0, pad))).reshape(b, n_blocks, block)
    q_index = jnp.arange(n_blocks * block).reshape(n_blocks, block)
    k_index = jnp.arange(T)

    @jax.checkpoint
    def one_block(inputs):
        q_blk, seg_blk, idx_blk = inputs                       # (b, block, n_kv, group, d), (b, block), (block,)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k) * scale
        visible = (seg_blk[:, :, None] == segment_ids[:, None, :]) & (idx_blk[:, None] >= k_index[None, :])
        scores = jnp.where(visible[:, None, None], scores.astype(jnp.float32), _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgqs,bskd->bqkgd", probs, v)

    out = jax.lax.map(one_block, (jnp.moveaxis(q, 1, 0), jnp.moveaxis(q_segments, 1, 0), q_index))
    return jnp.moveaxis(out, 0, 1).reshape(b, n_blocks * block, n_h, d)[:, :T]


class Attention(nnx.Module):
    """`self_attn`: q/k/v/o projections, optional RoPE, grouped-query attention over packed documents."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        H, d = config.hidden_size, config.attention_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.scale = config.attention_multiplier
        self.use_rope = config.uses_rope
        self.rope_theta = config.rope_theta
        self.block_size = config.attention_block_size
        self.dtype = config.dtype
        linear = functools.partial(make_linear, config, use_bias=config.attention_bias, rngs=rngs)

        self.q_proj = linear(H, self.n_heads * d, ("embed", "heads"))
        self.k_proj = linear(H, self.n_kv_heads * d, ("embed", "kv_heads"))
        self.v_proj = linear(H, self.n_kv_heads * d, ("embed", "kv_heads"))
        self.o_proj = linear(self.n_heads * d, H, ("heads", "embed"))

    def __call__(self, u: jax.Array, *, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        b, T, _ = u.shape
        q = self.q_proj(u).reshape(b, T, self.n_heads, self.head_dim)
        k = self.k_proj(u).reshape(b, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(u).reshape(b, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, self.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = segment_causal_attention(q, k, v, segment_ids, scale=self.scale, block_size=self.block_size)
        return self.o_proj(out.reshape(b, T, self.n_heads * self.head_dim))
