"""The `ragged` exchange (jax.lax.ragged_all_to_all, which XLA:CPU lacks), with the collective emulated from
all_gather by its documented semantics, against the plain MoE."""

import jax
import jax.numpy as jnp
import numpy as np

from granite_jax.parallel import ShardingPlan
from tests.multidevice import report
from tests.multidevice.expert_parallel import against_one_device


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """Source i's rows [input_offsets_i[me], + send_sizes_i[me]) land at output_offsets_i[me] in mine."""
    everything = jax.lax.all_gather(operand, axis_name)
    sources, rows = everything.shape[0], everything.shape[1]
    me = jax.lax.axis_index(axis_name)
    starts = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    reads = jax.lax.all_gather(input_offsets, axis_name)[:, me]
    r = jnp.arange(output.shape[0])
    inside = (r[None] >= starts[:, None]) & (r[None] < (starts + sizes)[:, None])
    source = jnp.argmax(inside, axis=0)
    taken = everything.reshape(sources * rows, -1)[
        jnp.where(inside.any(0), source * rows + reads[source] + r - starts[source], 0)]
    return jnp.where(inside.any(0)[:, None], taken, output)


def main():
    jax.lax.ragged_all_to_all = emulated_ragged_all_to_all
    moe, u, (reference, _), (dropless, dropless_stats), (capped, capped_stats), grad_error = against_one_device(
        ShardingPlan(moe_exchange="ragged"), ShardingPlan(moe_exchange="ragged", moe_capacity_factor=0.5))

    # The drop rule recounted: device (d, e) holds row 4d + e (16 tokens, 32 copies); buffers of 16 rows.
    tokens = np.asarray(u).reshape(-1, 256)
    top = np.argsort(-(tokens @ np.asarray(moe.router.kernel[...])), axis=-1)[:, :2]
    kept = np.ones(top.shape, bool)
    for d in range(2):
        for receiver in range(4):
            filled = 0
            for source in range(4):
                first = (4 * d + source) * 16
                mine = [(top[t, k], t, k) for t in range(first, first + 16) for k in range(2)
                        if top[t, k] // 2 == receiver]
                for _, t, k in sorted(mine):
                    kept[t, k] = filled < 16
                    filled += 1
    whole = kept.all(axis=1).reshape(8, 16)
    report({
        "dropless_error": float(jnp.max(jnp.abs(dropless - reference))),
        "dropless_dropped": float(dropless_stats.dropped),
        "grad_error": grad_error,
        "capped_dropped": float(capped_stats.dropped), "expected_dropped": int((~kept).sum()),
        "untouched_error": float(jnp.max(jnp.abs(capped - reference)[whole])),
        "touched_changed": bool((jnp.max(jnp.abs(capped - reference), axis=-1)[~whole] > 1e-6).all()),
    })
