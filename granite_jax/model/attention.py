"""Grouped-query self-attention with NoPE or RoPE, for packed sequences.

A query attends to keys at or before it *in the same document* (same segment id). Scores are scaled by
`attention_multiplier` (not 1/sqrt(head_dim)) and normalised in float32, as transformers does.

Memory stays linear in the sequence length per query block: queries are processed a block at a time under
`jax.checkpoint`, so neither the forward nor the backward pass holds the full (T x T) score matrix. (Long
context beyond tens of thousands of tokens needs a flash-style kernel or context parallelism: not yet.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.model.linear import make_linear

# Finite "minus infinity": softmax of a row with every key masked gives uniform weights, not NaNs that would
# leak into dk/dv in the backward pass. (Every real query sees itself, so this only guards degenerate rows.)
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


def _attend(q, k, v, q_segments, k_segments, q_index, k_index, scale):
    """One query block against a key prefix. q (b, Tq, n_kv, group, d), k/v (b, Tk, n_kv, d)."""
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) * scale
    visible = (q_segments[:, :, None] == k_segments[:, None, :]) & (q_index[:, None] >= k_index[None, :])
    scores = jnp.where(visible[:, None, None], scores.astype(jnp.float32), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v)


def segment_causal_attention(q, k, v, segment_ids, *, scale: float, block_size: int,
                             max_blocks: int = 32) -> jax.Array:
    """softmax(scale * q k^T + mask) v with a same-document causal mask.

    q (b, T, n_h, d), k/v (b, T, n_kv, d), segment_ids (b, T). Returns (b, T, n_h, d) in q's dtype.

    Queries are split into blocks (of `block_size`, or more so that there are at most `max_blocks`); block i
    only reads the keys up to its own end, which skips the masked upper triangle (about half the work), and is
    recomputed in the backward pass (`jax.checkpoint`), so only one block's scores are alive at a time.
    """
    b, T, n_h, d = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, T, n_kv, n_h // n_kv, d)
    block = max(min(block_size, T), -(-T // max_blocks))
    index = jnp.arange(T)
    attend = jax.checkpoint(functools.partial(_attend, scale=scale))
    outputs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        outputs.append(attend(q[:, start:end], k[:, :end], v[:, :end], segment_ids[:, start:end],
                              segment_ids[:, :end], index[start:end], index[:end]))
    return jnp.concatenate(outputs, axis=1).reshape(b, T, n_h, d)


class Attention(nnx.Module):
    """`self_attn`: q/k/v/o projections, optional RoPE, grouped-query attention over packed documents."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        H, d = config.hidden_size, config.attention_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.scale = config.attention_multiplier
        self.use_rope = config.uses_rope
        self.rope_theta = config.rope_theta
        self.block_size = config.attention_block_size
        self.dtype = config.compute_dtype
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
