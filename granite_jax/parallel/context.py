"""The device mesh a model is being traced for, and the activation shardings that follow from it.

`parallelism(mesh, ...)` is a context set by the training loop (and the dry run) around tracing: inside it,
the residual stream is pinned to "rows over the batch axes, everything else whole" at every layer boundary
(`constrain_rows`), so that XLA gathers FSDP-sharded weights for each layer instead of resharding activations
to match the weights; the MoE layers route locally (`granite_jax/parallel/expert.py`); and the loss gives
every batch shard its own copy of the output head (`batch_shards`, `constrain_per_shard`, used by
`granite_jax/train/step.py`). It is read when a
function is traced, not part of jit's cache key: trace a function under one setting only.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from granite_jax.parallel.mesh import BATCH_AXES, RULES, axes_size, fitted_spec


@dataclasses.dataclass(frozen=True)
class Parallelism:
    mesh: Mesh
    rules: dict = dataclasses.field(compare=False)  # logical axis -> mesh axes (granite_jax/parallel/mesh.py)
    capacity_factor: float | None = None  # expert parallelism: None = dropless (see expert.py)
    exchange: str = "auto"  # expert parallelism's token exchange: auto | all_to_all | ragged (see expert.py)

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return tuple(a for a in BATCH_AXES if a in self.mesh.shape)

    @property
    def expert_axis(self) -> str:
        """The mesh axis the experts are split over (the rules' "expert")."""
        return self.rules.get("expert", "expert")

    def spec(self, names: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec:
        """Where the rules put an array with these logical axes (as its parameter is placed)."""
        return fitted_spec(names, shape, self.mesh, self.rules)


_ACTIVE: contextvars.ContextVar[Parallelism | None] = contextvars.ContextVar("parallelism", default=None)


@contextlib.contextmanager
def parallelism(mesh: Mesh, capacity_factor: float | None = None, *, exchange: str = "auto",
                rules: dict | None = None):
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"moe_capacity_factor={capacity_factor} must be positive (or null: dropless)")
    token = _ACTIVE.set(Parallelism(mesh, RULES["fsdp_tp"] if rules is None else rules, capacity_factor, exchange))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> Parallelism | None:
    """The setting in force when its mesh has more than one device."""
    setting = _ACTIVE.get()
    return setting if setting is not None and setting.mesh.devices.size > 1 else None


def constrain_rows(x: jax.Array) -> jax.Array:
    """Pin an activation (batch, ...) to rows over the batch axes, other dimensions whole; no-op on one device."""
    return constrain_per_shard(x, shard_dim=0)


def batch_shards() -> int:
    """Into how many pieces the batch is split (the product of the batch axes); 1 on one device."""
    setting = active()
    return 1 if setting is None else axes_size(setting.mesh, setting.batch_axes)


def constrain_per_shard(x: jax.Array, shard_dim: int, vocab_dim: int | None = None) -> jax.Array:
    """Pin `x`'s `shard_dim` (of size `batch_shards()`) to the batch axes, its `vocab_dim` where the rules put
    the vocabulary, other dimensions whole; no-op on one device."""
    setting = active()
    if setting is None:
        return x
    names = [None] * x.ndim
    if vocab_dim is not None:
        names[vocab_dim] = "vocab"
    spec = list(setting.spec(tuple(names), x.shape))
    spec[shard_dim] = setting.batch_axes
    return jax.lax.with_sharding_constraint(x, NamedSharding(setting.mesh, PartitionSpec(*spec)))
