"""Grouped-query self-attention with NoPE or RoPE, for packed sequences.

A query attends to keys at or before it *in the same document*. Scores are scaled by `attention_multiplier`
(not 1/sqrt(head_dim)) and normalised in float32, as transformers does. The attention itself is the
block-wise kernel of `flash.py` (memory linear in the sequence length, work proportional to document length),
or a Pallas kernel (`pallas_attention.py`, `attention_impl`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.model.flash import flash_attention, flash_attention_context_parallel
from granite_jax.model.linear import make_linear
from granite_jax.model.pallas_attention import pallas_attention
from granite_jax.parallel.plan import sequence_split, target_platform


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


class KVCache(NamedTuple):
    """An attention layer's keys and values, preallocated for `max_len` tokens: (b, max_len, kv_heads, head_dim)
    each, in the compute dtype (after RoPE, so a decode step never recomputes them)."""

    k: jax.Array
    v: jax.Array


class Attention(nnx.Module):
    """`self_attn`: q/k/v/o projections, optional RoPE, grouped-query attention over packed documents."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        H, d = config.hidden_size, config.attention_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.scale = config.attention_multiplier
        self.use_rope = config.uses_rope
        self.rope_theta = config.rope_theta
        self.block_size = config.attention_block_size
        self.impl = config.attention_impl
        self.dtype = config.compute_dtype
        self.plan = config.sharding
        linear = functools.partial(make_linear, config, use_bias=config.attention_bias, rngs=rngs)

        self.q_proj = linear(H, self.n_heads * d, ("embed", "heads"))
        self.k_proj = linear(H, self.n_kv_heads * d, ("embed", "kv_heads"))
        self.v_proj = linear(H, self.n_kv_heads * d, ("embed", "kv_heads"))
        self.o_proj = linear(self.n_heads * d, H, ("heads", "embed"))

    @staticmethod
    def init_cache(config, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` tokens, in the compute dtype."""
        shape = (batch, max_len, config.num_key_value_heads, config.attention_head_dim)
        return KVCache(jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype))

    def _qkv(self, u, positions):
        b, T, _ = u.shape
        q = self.q_proj(u).reshape(b, T, self.n_heads, self.head_dim)
        k = self.k_proj(u).reshape(b, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(u).reshape(b, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, self.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def __call__(self, u: jax.Array, *, runs: jax.Array, positions: jax.Array, state: KVCache | None = None):
        """u (b, T, hidden); runs (b, T) document-run index; positions (b, T), used by RoPE only. Given a cache
        to fill (`state`, a prefill), the keys and values are also written to its first T slots and it is
        returned."""
        b, T, _ = u.shape
        with jax.named_scope("qkv_proj"):
            q, k, v = self._qkv(u, positions)
        split, impl = sequence_split(self.plan), self._impl()
        if split is not None and state is not None:
            raise NotImplementedError("a decoding prefill with the sequence split over devices (context > 1) is "
                                      "not supported; prefill on a mesh with context=1")
        with jax.named_scope("core"):
            if split is None and impl != "blockwise":
                out = pallas_attention(q, k, v, runs, impl=impl, scale=self.scale, plan=self.plan)
            elif split is None:
                out = flash_attention(q, k, v, runs, scale=self.scale, block_size=self.block_size)
            else:  # context parallelism: each device's queries against the keys of the whole row
                def local(q, k, v, runs):
                    return flash_attention_context_parallel(q, k, v, runs, scale=self.scale,
                                                            block_size=self.block_size, axis=split.axis,
                                                            layout=split.layout)

                heads = split.spec(None, None)
                out = jax.shard_map(local, mesh=split.mesh, in_specs=(heads, heads, heads, split.spec()),
                                    out_specs=heads, check_vma=False)(q, k, v, runs)
        with jax.named_scope("o_proj"):
            out = self.o_proj(out.reshape(b, T, self.n_heads * self.head_dim))
        if state is None:
            return out
        return out, KVCache(jax.lax.dynamic_update_slice_in_dim(state.k, k.astype(state.k.dtype), 0, axis=1),
                            jax.lax.dynamic_update_slice_in_dim(state.v, v.astype(state.v.dtype), 0, axis=1))

    def _impl(self) -> str:
        """`attention_impl` resolved for the platform compiled for (the mesh's, e.g. TPU in a dry run)."""
        if self.impl != "auto":
            return self.impl
        return "splash" if target_platform() == "tpu" else "blockwise"

    def decode(self, u: jax.Array, *, index: jax.Array, start: jax.Array, positions: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One token per row at cache slot `index` (a scalar, the same for every row); it attends to slots
        start[b] ≤ j ≤ index (slots before `start` hold a left-padded prompt's padding). u (b, 1, hidden)."""
        b = u.shape[0]
        q, k, v = self._qkv(u, positions)
        cache = KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), index, axis=1),
                        jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), index, axis=1))
        group = self.n_heads // self.n_kv_heads
        q = q.reshape(b, self.n_kv_heads, group, self.head_dim)
        scores = jnp.einsum("bkgd,bjkd->bkgj", q, cache.k.astype(self.dtype)).astype(jnp.float32) * self.scale
        slots = jnp.arange(cache.k.shape[1])
        visible = (slots[None, :] <= index) & (slots[None, :] >= start[:, None])          # (b, max_len)
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgj,bjkd->bkgd", weights, cache.v.astype(self.dtype))
        return self.o_proj(out.reshape(b, 1, self.n_heads * self.head_dim)), cache
