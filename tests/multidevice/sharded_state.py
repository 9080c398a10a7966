"""Parameters and Adam moments of the tiny hybrid MoE on an fsdp 2 x tensor 2 x expert 2 mesh: their specs."""

import jax
from flax import nnx

from granite_jax import GraniteForCausalLM, load_preset
from granite_jax.parallel.mesh import RULES, make_mesh
from granite_jax.train.config import OptimizerConfig
from granite_jax.train.optim import make_optimizer
from granite_jax.train.setup import sharded_train_state
from tests.multidevice import report


def main():
    model = GraniteForCausalLM(load_preset("tiny-hybrid-moe"), rngs=nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "expert": 2})
    tx = make_optimizer(OptimizerConfig(grad_accum_steps=2), 10)
    state = sharded_train_state(params, tx, mesh, RULES["fsdp_tp"])
    experts = state.params["model"]["layers"][0]["block_sparse_moe"]["input_linear"]
    q = state.params["model"]["layers"][2]["self_attn"]["q_proj"]["kernel"]
    report({
        "experts": f"{tuple(experts[...].sharding.spec)} {experts[...].addressable_shards[0].data.shape}",
        "q_proj": str(tuple(q[...].sharding.spec)),
        "moments": str(sorted({tuple(x.sharding.spec) for x in jax.tree.leaves(state.opt_state) if x.ndim == 3},
                             key=str)),
        "scalars": str({tuple(x.sharding.spec) for x in jax.tree.leaves(state.opt_state) if x.ndim == 0}),
    })
