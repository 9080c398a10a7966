"""Logical axis names carried by every parameter.

The model names what each array dimension *means*; a table of rules (issue: distributed training) maps those
names to mesh axes. The model code never names a device.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx

# Every logical axis name the model uses, with what it indexes.
LOGICAL_AXES = {
    "vocab": "token ids of the embedding / output head",
    "embed": "the model width (hidden_size)",
    "heads": "query heads x head_dim, fused (q_proj out, o_proj in)",
    "kv_heads": "key/value heads x head_dim, fused",
    "mlp": "width of an MLP (shared, dense or one expert's)",
    "expert": "routed experts",
    "ssm_heads": "Mamba heads (dt_bias, A_log, D)",
    "ssm_inner": "Mamba inner width, mamba_n_heads x mamba_d_head (norm, out_proj in)",
    "ssm_in_proj": "the fused [z | x | B | C | dt] output of in_proj",
    "ssm_conv_dim": "channels of the depthwise conv: x, B and C",
    "conv_width": "taps of the depthwise conv",
}


def partitioned(initializer: Callable, names: tuple[str | None, ...]) -> Callable:
    """Wrap an initializer so the parameter it makes carries `names` as its logical axes.

    Sharding is applied later by the caller that owns the mesh (eager sharding is off), so models can be
    built on one CPU device or under `jax.eval_shape` without a mesh.
    """
    unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axis names {unknown}; known: {sorted(LOGICAL_AXES)}")
    return nnx.with_partitioning(initializer, names, eager_sharding=False)


def logical_param(value, names: tuple[str | None, ...]) -> nnx.Param:
    """A parameter holding `value` whose dimensions carry the logical axis `names`."""
    if len(names) != value.ndim:
        raise ValueError(f"{len(names)} logical axis names {names} for a parameter of shape {value.shape}")
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)
