"""RMSNorm and the Mamba gated RMSNorm, with transformers' exact casting order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.parallel import logical_param


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """`weight * (x / rms(x)).astype(dtype)`: normalise in float32, cast back, then scale (Llama/T5 order)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, axis_name: str = "embed"):
        self.eps = eps
        self.dtype = dtype
        self.weight = logical_param(jnp.ones((dim,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight[...].astype(self.dtype) * rms_normalize(x, self.eps).astype(self.dtype)


class GatedRMSNorm(nnx.Module):
    """Mamba-2 output norm, gate first: `weight * groupnorm(y * silu(z))`.

    Each of `n_groups` contiguous channel groups is normalised on its own (transformers 5 and mamba_ssm's
    `RMSNormGated(group_size=d_inner/ngroups)`); with one group it is a plain RMSNorm over d_inner.
    Everything is float32 (the SSD output is float32); the result is cast to the compute dtype.
    """

    def __init__(self, dim: int, *, n_groups: int, eps: float, dtype, param_dtype):
        self.n_groups = n_groups
        self.eps = eps
        self.dtype = dtype
        self.weight = logical_param(jnp.ones((dim,), param_dtype), ("ssm_inner",))

    def __call__(self, y: jax.Array, gate: jax.Array) -> jax.Array:
        g = y.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))
        grouped = g.reshape(*g.shape[:-1], self.n_groups, g.shape[-1] // self.n_groups)
        normed = rms_normalize(grouped, self.eps).reshape(g.shape)
        return (self.weight[...].astype(jnp.float32) * normed).astype(self.dtype)
