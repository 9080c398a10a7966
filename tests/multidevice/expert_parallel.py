"""The expert-parallel MoE (bounded all_to_all over an expert axis of 4) against the plain MoE on one device."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.config import load_preset
from granite_jax.model.moe import MoE
from granite_jax.parallel import ShardingPlan
from granite_jax.parallel.mesh import make_mesh
from tests.multidevice import report


def moe_with(plan: ShardingPlan | None = None) -> MoE:
    """The tiny preset's MoE layer (8 experts, top-2), the same weights whatever the plan."""
    overrides = {} if plan is None else {"sharding": plan}
    return MoE(load_preset("tiny-hybrid-moe", **overrides), rngs=nnx.Rngs(0))


# Compiled once per process for each MoE structure and mesh: the one-device reference serves this job and the
# ragged-exchange job, which run in the same process.
forward = nnx.jit(lambda m, u: m(u))
_gradients = nnx.jit(nnx.grad(lambda m, u: jnp.sum(jnp.sin(m(u)[0])), argnums=(0, 1)))


def gradients(moe, u):
    """Every gradient (the weights', then the input's) of a scalar of the MoE's output, as a flat list."""
    return jax.tree.leaves(_gradients(moe, u))


def against_one_device(dropless: ShardingPlan, capped: ShardingPlan):
    """The MoE on one device and on a data 2 x expert 4 mesh under a dropless and a capped plan, on the same
    (8, 16, 256) input: (moe, u, (reference out, stats), dropless (out, stats), capped (out, stats), the
    largest relative gradient error of the dropless plan, over the input and every weight)."""
    moe = moe_with()
    u = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 256)), jnp.float32)
    reference = forward(moe, u)
    reference_grads = gradients(moe, u)
    with jax.set_mesh(make_mesh({"data": 2, "expert": 4})):
        dropless_result = forward(moe_with(dropless), u)
        capped_result = forward(moe_with(capped), u)
        dropless_grads = gradients(moe_with(dropless), u)
    grad_error = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                     for a, b in zip(dropless_grads, reference_grads))
    return moe, u, reference, dropless_result, capped_result, grad_error


def main():
    moe, u, (reference, ref_stats), dropless, capped, grad_error = against_one_device(
        ShardingPlan(), ShardingPlan(moe_capacity_factor=1.0))

    # The drop rule recounted: 8 devices x 16 tokens, 2 experts per shard, capacity ceil(32 / 4) = 8.
    tokens = np.asarray(u).reshape(-1, 256)
    top = np.argsort(-(tokens @ np.asarray(moe.router.kernel[...])), axis=-1)[:, :2]
    kept = np.ones(top.shape, bool)
    for device in range(8):
        counts = np.zeros(4, int)
        for t in range(device * 16, device * 16 + 16):
            for k in range(2):
                destination = top[t, k] // 2
                kept[t, k] = counts[destination] < 8
                counts[destination] += 1
    whole = kept.all(axis=1).reshape(8, 16)
    report({
        "dropless_error": float(jnp.max(jnp.abs(dropless[0] - reference))),
        "dropless_dropped": float(dropless[1].dropped), "grad_error": grad_error,
        "capped_dropped": float(capped[1].dropped), "expected_dropped": int((~kept).sum()),
        "untouched_error": float(jnp.max(jnp.abs(capped[0] - reference)[whole])),
        "touched_changed": bool((jnp.max(jnp.abs(capped[0] - reference), axis=-1)[~whole] > 1e-6).all()),
        "stats_error": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(capped[1][:3], ref_stats[:3])),
    })
