"""Expert parallelism: the MoE block under `shard_map`, moving tokens to the experts instead of experts to tokens.

Each device routes its own tokens, then an exchange over the `expert` mesh axis sends every (token, slot) copy
to the device holding its expert; that device runs its local experts (grouped matmul), and the reverse
exchange brings the results back, where they are weighted by the router gates and summed. Two exchanges
(`moe_exchange`), both with a receive buffer of static size set by `moe_capacity_factor` (null: dropless):

- `all_to_all` (CPU, and anywhere on request): `jax.lax.all_to_all` of a fixed buffer per (source,
  destination) pair of `ceil(capacity_factor × copies per device / expert shards)` rows. Copies beyond a
  pair's buffer are dropped, the later (token, slot) copies first. `capacity_factor ≥ expert shards` never drops.
- `ragged` (GPU and TPU; XLA:CPU does not implement it): `jax.lax.ragged_all_to_all` sends exactly the routed
  copies, sorted by expert. Each device receives into one buffer of `ceil(capacity_factor × copies per
  device)` rows, filled by source device in order; what does not fit is dropped (the later sources' copies,
  within a source its later experts'). `capacity_factor ≥ expert shards` never drops. It moves no padding:
  traffic is the routed copies, not the buffer.

Dropped copies contribute zero; their number is returned (the training loop logs it as `moe_dropped`).

Every `MoE` layer (granite_jax/model/moe.py) takes this path when it is traced under a mesh of more than one
device (with an expert axis of size 1 it keeps routing local to each device: a global sort of all tokens by
expert would make XLA replicate the tokens everywhere). The layer supplies the routing and the experts'
SwiGLU (`route`, `run_experts`); this module owns only the `shard_map` and the exchanges.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from granite_jax.parallel.permute import move_rows, sort_by
from granite_jax.parallel.plan import EXCHANGES, ShardingPlan


def resolve_exchange(exchange: str, platform: str) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"moe_exchange={exchange!r}; expected one of {EXCHANGES}")
    if exchange == "auto":
        return "all_to_all" if platform == "cpu" else "ragged"
    return exchange


def capacity(copies: int, shards: int, capacity_factor: float) -> int:
    """Copies one device may send to one expert shard (the `all_to_all` exchange)."""
    return max(1, min(copies, math.ceil(capacity_factor * copies / shards)))


def dispatch_slots(destination: jax.Array, shards: int, cap: int) -> tuple[jax.Array, jax.Array]:
    """For copies with a destination shard each (n,), their slot in that destination's buffer (rank among
    the copies to the same destination, in order) and whether it is within capacity."""
    one_hot = jax.nn.one_hot(destination, shards, dtype=jnp.int32)            # (n, shards)
    rank = jnp.cumsum(one_hot, axis=0) - one_hot                               # copies before, same destination
    slot = jnp.sum(rank * one_hot, axis=-1)
    return slot, slot < cap


def _exclusive_cumsum(x: jax.Array) -> jax.Array:
    return jnp.cumsum(x) - x


def _bounded_exchange(tokens, experts, w_in, w_out, *, axis, shards, top_k, factor, run_experts):
    """The `all_to_all` exchange. Returns every copy's expert output in (token, slot) order, zero where
    dropped, and whether each copy was kept."""
    n, H = tokens.shape
    local_experts = w_in.shape[0]
    destination = experts // local_experts
    cap = capacity(n * top_k, shards, factor)
    slot, kept = dispatch_slots(destination, shards, cap)
    # Buffer slot of every copy (shards * cap = dropped) and copy of every slot (n k = empty): the two
    # directions of one map, so every move is a gather forward and backward (parallel/permute.py).
    slots = shards * cap
    slot_of_copy = jnp.where(kept, destination * cap + slot, slots).astype(jnp.int32)
    copy_of_slot = jnp.full((slots + 1,), n * top_k, jnp.int32).at[slot_of_copy].set(
        jnp.arange(n * top_k, dtype=jnp.int32))[:-1]
    token_of_slot = jnp.where(copy_of_slot < n * top_k, copy_of_slot // top_k, n)
    send = move_rows(tokens, token_of_slot[:, None], slot_of_copy.reshape(n, top_k))
    send_expert = jnp.append(experts % local_experts, local_experts)[copy_of_slot]   # local_experts: empty
    received = jax.lax.all_to_all(send.reshape(shards, cap, H), axis, 0, 0, tiled=False)
    received_expert = jax.lax.all_to_all(send_expert.reshape(shards, cap), axis, 0, 0, tiled=False)
    result = run_experts(received.reshape(slots, H), received_expert.reshape(slots), w_in, w_out)
    back = jax.lax.all_to_all(result.reshape(shards, cap, H), axis, 0, 0, tiled=False).reshape(slots, H)
    return move_rows(back, slot_of_copy[:, None], copy_of_slot[:, None]), kept


def _ragged_exchange(tokens, experts, w_in, w_out, *, axis, shards, top_k, factor, run_experts):
    """The `ragged` exchange (`jax.lax.ragged_all_to_all`). Same contract as `_bounded_exchange`."""
    n, H = tokens.shape
    copies = n * top_k
    local_experts = w_in.shape[0]
    # My copies sorted by expert: by destination device, then by its local expert.
    order, position = sort_by(experts)
    sorted_rows = move_rows(tokens, (order // top_k)[:, None], position.reshape(n, top_k))
    counts = jnp.bincount(experts, length=shards * local_experts).reshape(shards, local_experts).astype(jnp.int32)
    send_sizes = counts.sum(axis=1)
    input_offsets = _exclusive_cumsum(send_sizes)

    # What each source sends me, per local expert; where its block starts in my buffer; how much of it fits.
    received_counts = jax.lax.all_to_all(counts, axis, 0, 0, tiled=False)              # (shards, local)
    received_sizes = received_counts.sum(axis=1)
    buffer_rows = max(1, min(shards * copies, math.ceil(factor * copies)))
    received_offsets = _exclusive_cumsum(received_sizes)
    received_kept = jnp.clip(buffer_rows - received_offsets, 0, received_sizes)
    # The senders' view of the same numbers: where my block goes in each destination, how much it keeps.
    output_offsets = jax.lax.all_to_all(received_offsets, axis, 0, 0, tiled=False)
    send_kept = jax.lax.all_to_all(received_kept, axis, 0, 0, tiled=False)
    source_offsets = jax.lax.all_to_all(input_offsets, axis, 0, 0, tiled=False)      # my block in each source

    arrived = jax.lax.ragged_all_to_all(sorted_rows, jnp.zeros((buffer_rows, H), sorted_rows.dtype), input_offsets,
                                        send_kept, output_offsets, received_kept, axis_name=axis)
    # The local expert of every buffer row, from the per-source counts (local_experts: an empty row).
    row = jnp.arange(buffer_rows)
    source = jnp.clip(jnp.searchsorted(received_offsets, row, side="right") - 1, 0, shards - 1)
    within = row - received_offsets[source]
    expert_of_row = jnp.sum(within[:, None] >= jnp.cumsum(received_counts, axis=1)[source], axis=1)
    expert_of_row = jnp.where(within < received_kept[source], expert_of_row, local_experts)
    result = run_experts(arrived, expert_of_row, w_in, w_out)
    back = jax.lax.ragged_all_to_all(result, jnp.zeros((copies, H), result.dtype), received_offsets,
                                     received_kept, source_offsets, send_kept, axis_name=axis)

    destination = experts[order] // local_experts                                      # sorted copies' device
    kept_sorted = jnp.arange(copies) - input_offsets[destination] < send_kept[destination]
    return move_rows(back, position[:, None], order[:, None]), kept_sorted[position]


def _gather_all_but_experts(w: jax.Array, spec: P) -> jax.Array:
    """Inside shard_map: gather every split dimension of an expert weight but the first (the experts')."""
    for dim, axes in enumerate(spec):
        if dim > 0 and axes is not None:
            w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
    return w


def expert_parallel_moe(plan: ShardingPlan, mesh, tokens, token_weight, router_kernel, w_in, w_out, *, moe,
                        run_experts):
    """The routed experts over `mesh` (the mesh being traced under): every device routes its own rows and an
    exchange over the plan's expert axis carries each (token, slot) copy to its expert's device and back.

    tokens (N, H) global, split over the plan's batch and sequence axes (rows, then their pieces); token_weight
    (N,) 1 for real tokens, 0 for padding; router_kernel (H, E); w_in (E, H, 2I); w_out (E, I, H). The model
    supplies the math:
    `moe(tokens, token_weight, router_kernel, dispatch=...)` routes, dispatches and combines
    (`granite_jax.model.moe.routed_experts`); `run_experts(rows, local_expert, w_in, w_out)` runs the rows that
    arrived through this device's experts (local_expert = the number of local experts: an empty row).
    Returns (out (N, H), router statistics summed over all devices).
    """
    axis = plan.expert_axis(mesh)
    shards = mesh.shape[axis]
    factor = shards if plan.moe_capacity_factor is None else plan.moe_capacity_factor
    token_axes = plan.token_axes(mesh)
    exchange = {"all_to_all": _bounded_exchange, "ragged": _ragged_exchange}[
        resolve_exchange(plan.moe_exchange, mesh.abstract_device.platform)]

    # The expert weights enter as their parameters are split (experts over `axis`, the hidden dimension FSDP)
    # and are gathered whole here: the gather's transpose reduce-scatters their gradients. Entering replicated,
    # they would be gathered by XLA outside and their gradients all-reduced whole over the FSDP axes.
    w_in_spec = plan.spec(("expert", "embed", "mlp"), w_in.shape, mesh)
    w_out_spec = plan.spec(("expert", "mlp", "embed"), w_out.shape, mesh)

    def local(tokens, router_kernel, w_in, w_out, weight):
        w_in, w_out = _gather_all_but_experts(w_in, w_in_spec), _gather_all_but_experts(w_out, w_out_spec)

        def dispatch(tokens, experts):
            return exchange(tokens, experts, w_in, w_out, axis=axis, shards=shards,
                            top_k=experts.shape[0] // tokens.shape[0], factor=factor, run_experts=run_experts)

        out, stats = moe(tokens, weight, router_kernel, dispatch=dispatch)
        return out, jax.lax.psum(stats, token_axes)

    rows = P(token_axes)
    mapped = jax.shard_map(local, mesh=mesh,
                           in_specs=(P(token_axes, None), P(), w_in_spec, w_out_spec, rows),
                           out_specs=(P(token_axes, None), P()), check_vma=False)
    return mapped(tokens, router_kernel, w_in, w_out, token_weight)
