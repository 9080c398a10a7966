"""Expert parallelism: the MoE block under `shard_map`, moving tokens to the experts instead of experts to tokens.

Each device routes its own tokens, then an all-to-all over the `expert` mesh axis sends every (token, slot)
copy to the device holding its expert; that device runs its local experts (grouped matmul), and a second
all-to-all brings the results back, where they are weighted by the router gates and summed.

The exchange uses a fixed-size buffer per (source, destination) pair of `capacity` copies:
`capacity = ceil(capacity_factor × local copies / expert shards)`. Copies beyond it are dropped — in the order
(token, slot), the later ones first — their contribution is zero, and their number is returned (and logged
by the training loop as `moe_dropped`). `capacity_factor ≥ expert shards` can never drop: dropless.
`jax.lax.ragged_all_to_all` would exchange exactly the routed copies, but XLA:CPU does not implement it; this
bounded `all_to_all` runs everywhere.

Inside `granite_jax.parallel.context.parallelism(mesh, capacity_factor, expert_axis)` every `MoE` layer takes
this path when the mesh has more than one device (with an expert axis of size 1 it keeps routing local to
each device: a global sort of all tokens by expert would make XLA replicate the tokens everywhere).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from granite_jax.model.permute import inverse_permutation, move_rows
from granite_jax.parallel.context import Parallelism
from granite_jax.parallel.mesh import BATCH_AXES


def capacity(copies: int, shards: int, capacity_factor: float) -> int:
    """Copies one device may send to one expert shard."""
    return max(1, min(copies, math.ceil(capacity_factor * copies / shards)))


def dispatch_slots(destination: jax.Array, shards: int, cap: int) -> tuple[jax.Array, jax.Array]:
    """For copies with a destination shard each (n,), their slot in that destination's buffer (rank among
    the copies to the same destination, in order) and whether it is within capacity."""
    one_hot = jax.nn.one_hot(destination, shards, dtype=jnp.int32)            # (n, shards)
    rank = jnp.cumsum(one_hot, axis=0) - one_hot                               # copies before, same destination
    slot = jnp.sum(rank * one_hot, axis=-1)
    return slot, slot < cap


def expert_parallel_moe(setting: Parallelism, tokens, router_kernel, w_in, w_out, *, top_k: int, dtype,
                        grouped_matmul, token_weight):
    """tokens (N, H) global; router_kernel (H, E); w_in (E, H, 2I); w_out (E, I, H); token_weight (N,) 1 for
    real tokens, 0 for padding. Returns (out (N, H), (assignments (E,), probabilities (E,), tokens (), dropped ()))
    with the statistics summed over all devices."""
    mesh = setting.mesh
    E = w_in.shape[0]
    axis = setting.expert_axis
    shards = mesh.shape[axis]
    factor = shards if setting.capacity_factor is None else setting.capacity_factor
    local_experts = E // shards
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.shape)

    def local(tokens, router_kernel, w_in, w_out, weight):
        n, H = tokens.shape
        tokens = tokens.astype(dtype)  # the exchanged buffers in the compute dtype
        logits = (tokens @ router_kernel.astype(tokens.dtype)).astype(jnp.float32)     # (n, E)
        top_logits, top_experts = jax.lax.top_k(logits, top_k)
        gates = jax.nn.softmax(top_logits, axis=-1).astype(dtype)
        experts = top_experts.reshape(-1)                                               # (n k,) token-major
        destination = experts // local_experts
        cap = capacity(n * top_k, shards, factor)
        slot, kept = dispatch_slots(destination, shards, cap)
        # Buffer slot of every copy (shards * cap = dropped) and copy of every slot (n k = empty): the two
        # directions of one map, so every move below is a gather forward and backward (model/permute.py).
        slots = shards * cap
        slot_of_copy = jnp.where(kept, destination * cap + slot, slots).astype(jnp.int32)
        copy_of_slot = jnp.full((slots + 1,), n * top_k, jnp.int32).at[slot_of_copy].set(
            jnp.arange(n * top_k, dtype=jnp.int32))[:-1]
        token_of_slot = jnp.where(copy_of_slot < n * top_k, copy_of_slot // top_k, n)
        send = move_rows(tokens, token_of_slot[:, None], slot_of_copy.reshape(n, top_k))
        send_expert = jnp.append(experts % local_experts, -1)[copy_of_slot]                 # -1: empty slot
        received = jax.lax.all_to_all(send.reshape(shards, cap, H), axis, 0, 0, tiled=False)
        received_expert = jax.lax.all_to_all(send_expert.reshape(shards, cap), axis, 0, 0, tiled=False)

        # Run the local experts on what arrived, grouped by expert (empty slots last, in a dummy group).
        flat, flat_expert = received.reshape(-1, H), received_expert.reshape(-1)
        group = jnp.where(flat_expert < 0, local_experts, flat_expert)
        order = jnp.argsort(group, stable=True)
        position = inverse_permutation(order)
        sizes = jnp.bincount(group, length=local_experts + 1).astype(jnp.int32)
        pad = lambda w: jnp.concatenate([w, jnp.zeros((1,) + w.shape[1:], w.dtype)])  # noqa: E731  dummy expert
        gate_up = grouped_matmul(move_rows(flat, order[:, None], position[:, None]), pad(w_in.astype(dtype)), sizes)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        out_sorted = grouped_matmul(jax.nn.silu(gate) * up, pad(w_out.astype(dtype)), sizes)
        result = move_rows(out_sorted, position[:, None], order[:, None])
        back = jax.lax.all_to_all(result.reshape(shards, cap, H), axis, 0, 0, tiled=False).reshape(slots, H)

        # Each copy's result from its buffer slot (zero if dropped), weighted by its gate, summed per token.
        gathered = move_rows(back, slot_of_copy[:, None], copy_of_slot[:, None])
        out = jnp.einsum("nkh,nk->nh", gathered.reshape(n, top_k, H), gates)

        probs = jax.nn.softmax(logits, axis=-1)
        stats = (jnp.zeros((E,), jnp.float32).at[experts].add(jnp.repeat(weight, top_k)),
                 jnp.sum(probs * weight[:, None], axis=0), jnp.sum(weight),
                 jnp.sum((~kept).astype(jnp.float32) * jnp.repeat(weight, top_k)))
        return out, jax.tree.map(lambda s: jax.lax.psum(s, batch_axes), stats)

    rows = P(batch_axes)
    mapped = jax.shard_map(local, mesh=mesh,
                           in_specs=(P(batch_axes, None), P(), P(axis), P(axis), rows),
                           out_specs=(P(batch_axes, None), P()), check_vma=False)
    return mapped(tokens, router_kernel, w_in, w_out, token_weight)
