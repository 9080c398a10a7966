"""The splash attention kernel (interpret mode) on a mesh: under `shard_map`, rows over data x fsdp and heads
over tensor, an attention layer of the tiny hybrid model: its logits and loss gradients equal those of the
blockwise attention."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax import GraniteForCausalLM, load_preset
from granite_jax.parallel.mesh import make_mesh
from tests.multidevice import report


def main():
    config = load_preset("tiny-hybrid-moe").replace(num_hidden_layers=1, layer_types=("attention",),
                                                    moe_impl="tiled")  # one attention layer: what splash changes
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (4, 64)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 30 + [2] * 1 + [3] * 33, [1] * 64, [1] * 5 + [2] * 59, [1] * 63 + [2]], jnp.int32)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())

    def loss(model):
        logits = model(ids, segment_ids).logits
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits

    results = {}
    for impl in ("blockwise", "splash"):
        model = GraniteForCausalLM(config.replace(attention_impl=impl), rngs=nnx.Rngs(3))
        with jax.set_mesh(mesh):
            (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        results[impl] = np.asarray(logits), [np.asarray(g) for g in jax.tree.leaves(grads)]
    (splash_logits, splash_grads), (logits, grads) = results["splash"], results["blockwise"]
    report({"logits": float(np.abs(splash_logits - logits).max()),
            "gradients": max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))
                             for a, b in zip(splash_grads, grads))})
