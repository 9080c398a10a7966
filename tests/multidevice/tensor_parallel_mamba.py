"""A Mamba layer with its inner width split over 4 tensor shards against the unsharded layer (1 and 2 groups),
and each shard's share of the layer's FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.config import load_preset
from granite_jax.model.mamba import Mamba2Mixer
from granite_jax.parallel.mesh import RULES, make_mesh, parameter_shardings
from tests.multidevice import report


def flops(compiled) -> float:
    return compiled.cost_analysis()["flops"]  # per device


def compare(groups: int) -> tuple[float, float]:
    """(relative error of the 4-way tensor-sharded layer, its per-shard share of the unsharded FLOPs)."""
    layer = Mamba2Mixer(load_preset("tiny-hybrid-moe", mamba_n_groups=groups), rngs=nnx.Rngs(0))
    u = jnp.asarray(np.random.default_rng(0).normal(size=(2, 40, 256)), jnp.float32)
    runs = jnp.zeros((2, 40), jnp.int32)
    reference = nnx.jit(lambda m, u: m(u, runs=runs))(layer, u)
    mesh = make_mesh({"data": 2, "tensor": 4})
    graphdef, params = nnx.split(layer, nnx.Param)
    sharded_params = jax.device_put(params, parameter_shardings(params, mesh, RULES["fsdp_tp"]))
    assert sharded_params["norm"]["weight"][...].sharding.spec == jax.sharding.PartitionSpec("tensor")

    def forward(p, u):
        return nnx.merge(graphdef, p)(u, runs=runs)

    sharded = jax.jit(forward)(sharded_params, u)
    error = float(jnp.max(jnp.abs(sharded - reference)) / jnp.max(jnp.abs(reference)))
    def step_flops(p):
        return flops(jax.jit(forward).lower(p, u).compile())

    share = step_flops(sharded_params) / step_flops(params)
    return error, share


def main():
    errors = {}
    for groups in (1, 2):
        errors[groups], errors[f"flops_share_{groups}"] = compare(groups)
    report(errors)
