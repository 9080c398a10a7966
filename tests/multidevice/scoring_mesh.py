"""Scoring on a mesh: `Scorer(mesh=...)` with every row's tokens split over a context axis (contiguous and
zigzag) gives the one-device per-request log-likelihoods and greedy flags, and, on the context axis, a
packed row gives each document what it gets alone in its row; a decoding prefill under a split sequence is
refused with a message."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax import load_preset
from granite_jax.eval.scoring import Request, Scorer
from granite_jax.model.granite import GraniteForCausalLM
from granite_jax.parallel.mesh import make_mesh
from granite_jax.parallel.plan import ShardingPlan
from tests.multidevice import report


def main():
    config = load_preset("tiny-hybrid-moe", num_hidden_layers=2, layer_types=["mamba", "attention"],
                         mamba_chunk_size=16)
    model = GraniteForCausalLM(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    requests = [Request(tuple(rng.integers(1, 4000, rng.integers(1, 60)).tolist()),
                        tuple(rng.integers(1, 4000, rng.integers(1, 40)).tolist())) for _ in range(12)]
    options = dict(seq_len=128, batch_size=2, chunk_tokens=24)
    reference = Scorer(model, **options).score(requests)
    meshes = {"context 8": ({"context": 8}, "contiguous"),
              "data 2 x context 4 zigzag": ({"data": 2, "context": 4}, "zigzag")}
    result = {}
    for name, (sizes, layout) in meshes.items():
        scorer = Scorer(model, mesh=make_mesh(sizes), plan=ShardingPlan(context_layout=layout), **options)
        scores = scorer.score(requests)
        result[name] = {"max_abs_difference": max(abs(a[0] - b[0]) for a, b in zip(scores, reference)),
                        "greedy_equal": [a[1] for a in scores] == [b[1] for b in reference]}
        if layout == "contiguous":  # each request alone in its row (and padding), on the same mesh and program
            alone = [scorer.score([request])[0] for request in requests]
            result[name]["packed_vs_alone"] = max(abs(a[0] - b[0]) for a, b in zip(scores, alone))
    try:
        with jax.set_mesh(make_mesh({"context": 8})):
            model.prefill(jnp.zeros((1, 64), jnp.int32), jnp.zeros((1,), jnp.int32), model.init_cache(1, 80))
        result["prefill"] = "ran"
    except NotImplementedError as e:
        result["prefill"] = str(e)
    report(result)
