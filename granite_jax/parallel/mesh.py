"""Device meshes, and the placement of parameters and batches on them by the plan's rules.

The model names what each dimension means and the rules say which mesh axes split it
(`granite_jax/parallel/plan.py`). Under `jax.jit`, XLA's SPMD partitioner inserts whatever communication the
shardings imply, so the rules change speed and memory, never the result.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from granite_jax.parallel.plan import RULES, ShardingPlan, axes_size, fitted_spec, logical_to_spec, mesh_axes
from granite_jax.parallel.sequence import pieces_per_shard

__all__ = ["MESH_AXES", "RULES", "MeshError", "batch_sharding", "check_batch", "check_model_fits_mesh",
           "check_sequence", "logical_to_spec", "make_mesh", "parameter_shardings"]

MESH_AXES = ("data", "fsdp", "tensor", "expert", "context")


class MeshError(ValueError):
    """Mesh sizes that do not fit the devices, or shapes that do not divide over the mesh."""


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
    """A mesh with axes MESH_AXES; a size of -1 means "the remaining devices" (at most one axis)."""
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; expected some of {MESH_AXES}")
    shape = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, n in shape.items() if n == -1]
    if len(free) > 1:
        raise MeshError(f"mesh axes {free} are all -1; at most one axis can take the remaining devices")
    fixed = math.prod(n for n in shape.values() if n != -1)
    if any(n == 0 or n < -1 for n in shape.values()):
        raise MeshError(f"mesh sizes {shape} must be positive (or -1)")
    if free:
        if len(devices) % fixed:
            raise MeshError(f"mesh {shape}: {len(devices)} devices are not divisible by the fixed axes' {fixed}")
        shape[free[0]] = len(devices) // fixed
    if math.prod(shape.values()) != len(devices):
        raise MeshError(f"mesh {shape} has {math.prod(shape.values())} devices; there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(tuple(shape.values())), MESH_AXES)


def parameter_shardings(params: nnx.State, mesh: Mesh, rules: dict):
    """NamedShardings for a parameter State from each Variable's logical axes (`fitted_spec`)."""
    def sharding(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        return NamedSharding(mesh, fitted_spec(tuple(names), variable.shape, mesh, rules))

    return jax.tree.map(sharding, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_model_fits_mesh(config, mesh: Mesh, rules: dict) -> None:
    """Every model dimension the rules split (of `config`, a ModelConfig: read, not imported, since the model
    config holds the sharding plan) must divide by its mesh axis; otherwise a MeshError naming the
    config field, the axis and its size (rather than a silently replicated or unevenly split weight)."""
    has_attention, has_mamba = config.num_attention_layers > 0, config.num_mamba_layers > 0
    dimensions = [("num_local_experts", config.num_local_experts, "expert", config.num_local_experts > 0),
                  ("num_attention_heads", config.num_attention_heads, "heads", has_attention),
                  ("num_key_value_heads", config.num_key_value_heads, "kv_heads", has_attention),
                  ("mamba_n_heads", config.mamba_n_heads, "ssm_heads", has_mamba),
                  ("mamba_d_inner", config.mamba_d_inner, "ssm_inner", has_mamba),
                  ("intermediate_size", config.intermediate_size, "mlp", config.num_local_experts > 0),
                  ("shared_intermediate_size", config.shared_intermediate_size, "mlp", True),
                  ("vocab_size", config.vocab_size, "vocab", True),
                  ("hidden_size", config.hidden_size, "embed", True)]
    for field, value, logical, used in dimensions:
        axes = tuple(a for a in mesh_axes(rules.get(logical)) if mesh.shape[a] > 1)
        if used and axes and value % axes_size(mesh, axes):
            raise MeshError(f"{field}={value} is not divisible by {_describe_axes(mesh, axes)} (the sharding rules "
                            f"split {logical!r} over {axes if len(axes) > 1 else axes[0]!r}); change the mesh or "
                            "sharding_rules")


def _describe_axes(mesh: Mesh, axes: tuple[str, ...]) -> str:
    if len(axes) == 1:
        return f"the {axes[0]!r} mesh axis of size {mesh.shape[axes[0]]}"
    sizes = [mesh.shape[a] for a in axes]
    return f"the mesh axes {axes} of sizes {sizes} (together {axes_size(mesh, axes)})"


def batch_sharding(mesh: Mesh, plan: ShardingPlan = ShardingPlan()) -> NamedSharding:
    """Where a batch's (rows, tokens) arrays live: rows over the plan's batch axes, tokens as the sequence."""
    return NamedSharding(mesh, logical_to_spec(("activation_batch", "activation_length"), plan.table))


def check_sequence(seq_len: int, mesh: Mesh, plan: ShardingPlan, config) -> None:
    """A sequence split over the context axis must split evenly, into shards the conv halo and the attention
    blocks of `config` (a ModelConfig) fit; a context axis the rules leave unused is an error (the sequence
    would stay whole)."""
    context = mesh.shape.get("context", 1)
    axes = plan.sequence_axes(mesh)
    if context > 1 and "context" not in axes:
        raise MeshError(f"mesh context={context} but sharding_rules={plan.rules!r} leaves the sequence whole "
                        "(its activation_length rule does not name 'context'); choose rules that split it")
    shards = axes_size(mesh, axes)
    if shards == 1:
        return
    n = shards * pieces_per_shard(plan.context_layout)
    what = (f"{shards} context shards" if n == shards
            else f"{n} pieces of context_layout={plan.context_layout!r} over {shards} context shards")
    if seq_len % n:
        raise MeshError(f"data.seq_len={seq_len} is not divisible by the {what} of mesh {dict(mesh.shape)}; "
                        f"use a multiple of {n}")
    piece = seq_len // n
    unit = "shard" if n == shards else "piece"
    if config.num_mamba_layers and piece < config.mamba_d_conv:
        raise MeshError(f"data.seq_len={seq_len} over {what} leaves {piece} tokens per {unit}, "
                        f"fewer than mamba_d_conv={config.mamba_d_conv}")
    block = min(config.attention_block_size, piece)
    if config.num_attention_layers and piece % block:
        raise MeshError(f"data.seq_len={seq_len} over {what} leaves {piece} tokens per {unit}, not "
                        f"a multiple of attention_block_size={config.attention_block_size}; use a seq_len that is a "
                        f"multiple of {n * config.attention_block_size}")


def check_batch(batch_size: int, mesh: Mesh, plan: ShardingPlan = ShardingPlan()) -> None:
    axes = plan.batch_axes(mesh)
    ways = axes_size(mesh, axes)
    if batch_size % ways:
        raise MeshError(f"data.batch_size={batch_size} is not divisible by the {ways} batch shards of mesh "
                        f"{dict(mesh.shape)} (axes {axes})")
