"""Device meshes and the one table that maps logical axis names to mesh axes.

The model names what each dimension means (`granite_jax/parallel/logical.py`); the rules below say which
mesh axes split it. Under `jax.jit`, XLA's SPMD partitioner inserts whatever communication the shardings
imply, so the rules change speed and memory, never the result.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch dimension is split over every axis that is not tensor

# Rule presets: logical axis -> mesh axis, or a tuple of mesh axes splitting it jointly (absent: replicated).
# Within one array a mesh axis is used once, by the first dimension that claims it: an expert weight
# (expert, embed, mlp) takes `expert` for its experts, so its `embed` is split over `fsdp` alone, while every
# other weight's `embed` is split over `fsdp` and `expert` together. Choose a preset with `sharding_rules`;
# the mesh sizes decide how many ways each axis splits (an axis of size 1 splits nothing).
_TENSOR = {"vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "ssm_inner": "tensor"}
RULES = {
    # FSDP over `fsdp` and `expert` (the hidden dimension of every weight: the expert axis is data-parallel
    # for everything but the experts), tensor parallelism over `tensor` (heads, MLP width, vocabulary, Mamba
    # inner width), experts over `expert`. The default.
    "fsdp_tp": {"embed": ("fsdp", "expert"), "expert": "expert", **_TENSOR},
    # FSDP only: weights split over `fsdp` and `expert` (experts over `expert`); nothing uses `tensor`.
    "fsdp": {"embed": ("fsdp", "expert"), "expert": "expert"},
    # Experts spread over the data-parallel axis (no separate expert axis), FSDP + TP as fsdp_tp.
    "ep_over_data": {"embed": "fsdp", "expert": "data", **_TENSOR},
}


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


def mesh_axes(rule) -> tuple[str, ...]:
    """A rule's mesh axes as a tuple: None -> (), "fsdp" -> ("fsdp",), ("fsdp", "expert") unchanged."""
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


def axes_size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in mesh_axes(axes))


def logical_to_spec(names: tuple[str | None, ...], rules: dict) -> PartitionSpec:
    """Map logical names to mesh axes, using each mesh axis at most once per array (first claim wins)."""
    used, spec = set(), []
    for name in names:
        axes = tuple(a for a in mesh_axes(rules.get(name) if name is not None else None) if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def fitted_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: dict) -> PartitionSpec:
    """`logical_to_spec` for an array of `shape` on `mesh`: a dimension that does not divide by its mesh axes
    keeps the longest leading run of them that it divides by (none: replicated)."""
    spec = list(logical_to_spec(tuple(names), rules))
    for i, axes in enumerate(spec):
        axes = mesh_axes(axes)
        while axes and shape[i] % axes_size(mesh, axes):
            axes = axes[:-1]
        spec[i] = None if not axes else axes[0] if len(axes) == 1 else axes
    return PartitionSpec(*spec)


def parameter_shardings(params: nnx.State, mesh: Mesh, rules: dict):
    """NamedShardings for a parameter State from each Variable's logical axes (`fitted_spec`)."""
    def sharding(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        return NamedSharding(mesh, fitted_spec(tuple(names), variable.shape, mesh, rules))

    return jax.tree.map(sharding, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_state_shardings(tx, params, param_shardings, mesh: Mesh):
    """Shardings for `tx`'s state: every parameter-shaped part (moments, accumulated gradients) sharded like
    its parameter, everything else (step counts) replicated. `params` may be abstract."""
    import optax

    per_leaf = jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(param_shardings))
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_utils.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params),
                                            per_leaf, transform_non_params=lambda _: replicated)


def check_model_fits_mesh(config, mesh: Mesh, rules: dict) -> None:
    """Every model dimension the rules split must divide by its mesh axis; otherwise a MeshError naming the
    config field, the axis and its size (rather than a silently replicated or unevenly split weight)."""
    from granite_jax.config import ATTENTION, MAMBA

    has_attention, has_mamba = ATTENTION in config.layer_types, MAMBA in config.layer_types
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
            where = (f"the {axes[0]!r} mesh axis of size {mesh.shape[axes[0]]}" if len(axes) == 1 else
                     f"the mesh axes {axes} of sizes {[mesh.shape[a] for a in axes]} (together {axes_size(mesh, axes)})")
            raise MeshError(f"{field}={value} is not divisible by {where} (the sharding rules split {logical!r} "
                            f"over {axes if len(axes) > 1 else axes[0]!r}); change the mesh or sharding_rules")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % ways:
        raise MeshError(f"data.batch_size={batch_size} is not divisible by the {ways} batch shards of mesh "
                        f"{dict(mesh.shape)} (axes {BATCH_AXES})")
