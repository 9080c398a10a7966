"""The Pallas SSD kernels (interpret mode) on meshes: under `shard_map` with rows over data x fsdp and heads over
tensor, and inside the context-parallel SSD with the sequence over context, a Mamba layer of the tiny
hybrid model: its logits and loss gradients equal those of the XLA SSD on the same mesh."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax import GraniteForCausalLM, load_preset
from granite_jax.parallel.mesh import make_mesh
from tests.multidevice import report

MESHES = {"rows_and_heads": {"data": 2, "fsdp": 2, "tensor": 2}, "context": {"data": 2, "context": 4}}


def main():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 1000, (4, 64)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 30 + [2] * 1 + [3] * 33, [1] * 64, [1] * 5 + [2] * 59, [1] * 63 + [2]], jnp.int32)

    def loss(model):
        logits = model(ids, segment_ids).logits
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits

    errors = {}
    for name, axes in MESHES.items():
        mesh = make_mesh(axes, jax.devices())
        results = {}
        for impl in ("xla", "pallas"):
            config = load_preset("tiny-hybrid-moe").replace(  # one Mamba layer: what the SSD changes
                num_hidden_layers=1, layer_types=("mamba",), moe_impl="tiled", ssd_impl=impl)
            model = GraniteForCausalLM(config, rngs=nnx.Rngs(3))
            with jax.set_mesh(mesh):
                (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
            results[impl] = np.asarray(logits), [np.asarray(g) for g in jax.tree.leaves(grads)]
        (logits, grads), (want_logits, want_grads) = results["pallas"], results["xla"]
        # Relative to each leaf's largest gradient, floored at 1e-6: A_log's gradient here is ~1e-9 (its terms
        # cancel), so its float32 rounding (~4e-13 apart) would otherwise read as a relative error of 3e-4.
        errors[name] = {"logits": float(np.abs(logits - want_logits).max()),
                        "gradients": max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))
                                         for a, b in zip(grads, want_grads))}
    report(errors)
