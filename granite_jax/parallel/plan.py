"""The sharding plan: what each array dimension means, which mesh axes split it, and the MoE's exchange choices.

- Logical axis names: every parameter carries names for what its dimensions mean (`partitioned`,
  `logical_param`); activations are named where the model pins them (`constrain`). The model never names a
  device or a mesh axis.
- `RULES`: presets mapping logical names, of parameters and of activations alike, to mesh axes. A preset can
  move the batch or split the sequence without touching model code.
- `ShardingPlan`: a frozen, hashable value (the rule preset, the MoE exchange and capacity) that the model
  holds in its configuration (`ModelConfig.sharding`), so it is part of the traced program's static
  structure. The mesh itself is JAX's: installed with `jax.set_mesh(mesh)` and read while tracing with
  `jax.sharding.get_abstract_mesh()`; both are part of jit's cache key, so tracing one function under two
  plans or two meshes gives two programs.

Nothing here imports the model: the model imports this module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from granite_jax.parallel.sequence import LAYOUTS

# Every logical axis name, with what it indexes. Parameters use the plain names, activations the
# `activation_` ones: the same meaning (the model width) is split differently in a weight (FSDP) and in the
# residual stream (whole on every device of a batch shard).
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
    "activation_batch": "rows of a batch (and the per-batch-shard copies of the loss)",
    "activation_length": "token positions of a row (the sequence)",
    "activation_embed": "the model width of the residual stream",
    "activation_vocab": "the vocabulary dimension of logits and of the loss's output-head copies",
}

# Rule presets: logical axis -> mesh axis, or a tuple of mesh axes splitting it jointly (absent: whole).
# Within one array a mesh axis is used once, by the first dimension that claims it: an expert weight
# (expert, embed, mlp) takes `expert` for its experts, so its `embed` is split over `fsdp` alone, while every
# other weight's `embed` is split over `fsdp` and `expert` together. Choose a preset with `sharding_rules`;
# the mesh sizes decide how many ways each axis splits (an axis of size 1 splits nothing).
_TENSOR = {"vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "ssm_inner": "tensor",
           "activation_vocab": "tensor"}
# Rows of a batch over every axis that is not tensor or context; the sequence over context (context
# parallelism); the residual width whole.
_ROWS = {"activation_batch": ("data", "fsdp", "expert"), "activation_length": "context"}
RULES = {
    # FSDP over `fsdp`, `expert` and `context` (the hidden dimension of every weight: the expert axis is
    # data-parallel for everything but the experts, and the context axis's devices, which split rows rather
    # than hold different ones, share the weights' storage too, as in MaxText), tensor parallelism over
    # `tensor` (heads, MLP width, vocabulary, Mamba inner width), experts over `expert`. The default.
    "fsdp_tp": {"embed": ("fsdp", "expert", "context"), "expert": "expert", **_TENSOR, **_ROWS},
    # FSDP only: weights split over `fsdp`, `expert` and `context` (experts over `expert`); nothing uses `tensor`.
    "fsdp": {"embed": ("fsdp", "expert", "context"), "expert": "expert", **_ROWS},
    # Experts spread over the data-parallel axis (no separate expert axis), FSDP + TP as fsdp_tp.
    "ep_over_data": {"embed": ("fsdp", "context"), "expert": "data", **_TENSOR, **_ROWS},
}
EXCHANGES = ("auto", "all_to_all", "ragged")  # expert parallelism's token exchange (granite_jax/parallel/expert.py)

# The residual stream (b, T, hidden).
RESIDUAL = ("activation_batch", "activation_length", "activation_embed")


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


def mesh_axes(rule) -> tuple[str, ...]:
    """A rule's mesh axes as a tuple: None -> (), "fsdp" -> ("fsdp",), ("fsdp", "expert") unchanged."""
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


def axes_size(mesh, axes) -> int:
    """How many ways `axes` split an array on `mesh` (a Mesh or an AbstractMesh)."""
    return math.prod(mesh.shape[a] for a in mesh_axes(axes))


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _rule_axes(name, rules: dict) -> tuple[str, ...]:
    """The mesh axes of a logical name, or of a tuple of names (a dimension that merges several, e.g. rows and
    sequence pieces: their axes in order)."""
    if name is None:
        return ()
    if isinstance(name, tuple):
        return tuple(a for n in name for a in mesh_axes(rules.get(n)))
    return mesh_axes(rules.get(name))


def logical_to_spec(names: tuple, rules: dict) -> PartitionSpec:
    """Map logical names to mesh axes, using each mesh axis at most once per array (first claim wins)."""
    used, spec = set(), []
    for name in names:
        axes = tuple(a for a in _rule_axes(name, rules) if a not in used)
        used.update(axes)
        spec.append(_spec_entry(axes))
    return PartitionSpec(*spec)


def fitted_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh, rules: dict) -> PartitionSpec:
    """`logical_to_spec` for an array of `shape` on `mesh`: mesh axes the mesh lacks are dropped, and a
    dimension that does not divide by its mesh axes keeps the longest leading run of them that it divides by
    (none: whole)."""
    spec = list(logical_to_spec(tuple(names), rules))
    for i, axes in enumerate(spec):
        axes = tuple(a for a in mesh_axes(axes) if a in mesh.shape)
        while axes and shape[i] % axes_size(mesh, axes):
            axes = axes[:-1]
        spec[i] = _spec_entry(axes)
    return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """How a model is laid out over the mesh it is traced under. Hashable: it is a static part of the model.

    rules: a preset of `RULES` (parameters and activations); moe_capacity_factor: expert parallelism's
    receive buffers as a multiple of the even share of (token, slot) copies, None = dropless;
    moe_exchange: expert parallelism's token exchange, `auto` (ragged_all_to_all on GPU/TPU, all_to_all on
    CPU), `all_to_all` or `ragged` (granite_jax/parallel/expert.py); context_layout: which pieces of a row each
    device of the sequence axes holds, `contiguous` or `zigzag` (granite_jax/parallel/sequence.py).
    """

    rules: str = "fsdp_tp"
    moe_capacity_factor: float | None = None
    moe_exchange: str = "auto"
    context_layout: str = "contiguous"

    def __post_init__(self):
        if self.rules not in RULES:
            raise ValueError(f"sharding_rules={self.rules!r}: expected one of {sorted(RULES)}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ValueError(f"moe_capacity_factor={self.moe_capacity_factor} must be positive (or null: dropless)")
        if self.moe_exchange not in EXCHANGES:
            raise ValueError(f"moe_exchange={self.moe_exchange!r}: expected one of {list(EXCHANGES)}")
        if self.context_layout not in LAYOUTS:
            raise ValueError(f"context_layout={self.context_layout!r}: expected one of {list(LAYOUTS)}")

    @property
    def table(self) -> dict:
        """The preset's logical-name -> mesh-axes table."""
        return RULES[self.rules]

    def axes(self, name: str, mesh) -> tuple[str, ...]:
        """The mesh axes (of `mesh`) that split the logical axis `name`."""
        return tuple(a for a in mesh_axes(self.table.get(name)) if a in mesh.shape)

    def batch_axes(self, mesh) -> tuple[str, ...]:
        return self.axes("activation_batch", mesh)

    def kernel_axes(self, mesh, heads: str, *head_counts: int) -> tuple[tuple[str, ...] | None,
                                                                        tuple[str, ...] | None]:
        """(row axes, head axes) a per-row, per-head Pallas kernel keeps under `shard_map` (a Pallas call is
        opaque to XLA's sharding propagation): rows split as the batch is, heads as the logical axis `heads` is
        when that divides every one of `head_counts` (e.g. query and key/value heads, which must stay together),
        else whole on each device. None for an axis that is not split, as a PartitionSpec entry."""
        head_axes = self.axes(heads, mesh)
        if any(count % axes_size(mesh, head_axes) for count in head_counts):
            head_axes = ()
        return self.batch_axes(mesh) or None, head_axes or None

    def sequence_axes(self, mesh) -> tuple[str, ...]:
        """The mesh axes a row's tokens are split over (context parallelism)."""
        return self.axes("activation_length", mesh)

    def sequence_shards(self, mesh) -> int:
        return axes_size(mesh, self.sequence_axes(mesh))

    def token_axes(self, mesh) -> tuple[str, ...]:
        """The mesh axes a flattened (rows x tokens) batch is split over: the batch's, then the sequence's."""
        return self.batch_axes(mesh) + tuple(a for a in self.sequence_axes(mesh) if a not in self.batch_axes(mesh))

    def expert_axis(self, mesh) -> str | None:
        """The mesh axis the experts are split over, or None when the mesh has no such axis."""
        axes = self.axes("expert", mesh)
        return axes[0] if axes else None

    def batch_shards(self, mesh) -> int:
        """Into how many pieces the batch is split on `mesh` (the product of the batch axes)."""
        return axes_size(mesh, self.batch_axes(mesh))

    def spec(self, names: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> PartitionSpec:
        """Where the rules put an array with these logical axes on `mesh`."""
        return fitted_spec(names, shape, mesh, self.table)


class SequenceSplit(NamedTuple):
    """How a row is split over devices for context parallelism: the mesh, the axes of its rows and of its
    tokens. `spec(...)` places a (rows, tokens, ...) array inside `shard_map`."""

    mesh: object
    rows: tuple[str, ...]
    tokens: tuple[str, ...]
    layout: str = "contiguous"

    @property
    def axis(self):
        """The name collectives take for the sequence axes (one axis, or their tuple)."""
        return self.tokens[0] if len(self.tokens) == 1 else self.tokens

    def spec(self, *rest) -> PartitionSpec:
        return PartitionSpec(self.rows or None, self.axis, *rest)


def sequence_split(plan: ShardingPlan) -> SequenceSplit | None:
    """The split of the rows' tokens on the current mesh, or None when they are whole (no context parallelism)."""
    mesh = current_mesh()
    if mesh is None or plan.sequence_shards(mesh) == 1:
        return None
    return SequenceSplit(mesh, plan.batch_axes(mesh), plan.sequence_axes(mesh), plan.context_layout)


def target_platform() -> str:
    """The platform the code being traced is compiled for: the current mesh's devices' (a dry run compiles for
    TPU devices from a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def current_mesh():
    """The mesh installed with `jax.set_mesh`, or None when there is none or it has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def constrain(x: jax.Array, names: tuple, plan: ShardingPlan) -> jax.Array:
    """Pin `x`, whose dimensions mean `names` (a logical name, None, or a tuple of names for a dimension that
    merges several), where `plan`'s rules put them on the current mesh; a no-op without a mesh of several
    devices."""
    mesh = current_mesh()
    if mesh is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"{len(names)} logical axis names {names} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, plan.spec(names, x.shape, mesh))
