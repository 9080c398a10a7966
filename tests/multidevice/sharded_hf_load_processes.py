"""One of 2 processes (4 virtual CPU devices each) loading an HF checkpoint onto an fsdp=8 mesh that spans both:
the slices this process holds equal the plain load's, and the bytes it reads from disk. Argument:
{"directory": HF_DIR, "coordinator": "127.0.0.1:PORT", "process": i}."""

import numpy as np
from flax import nnx

from granite_jax import GraniteForCausalLM, ModelConfig, load_hf_checkpoint
from granite_jax.formats.hf import ReadStats
from granite_jax.parallel.distributed import initialize
from granite_jax.parallel.mesh import RULES, make_mesh, parameter_shardings
from tests.multidevice import arguments, report


def main():
    args = arguments()
    initialize(args["coordinator"], 2, args["process"])
    directory = args["directory"]
    plain = {path: np.asarray(v[...])
             for path, v in nnx.to_flat_state(nnx.state(load_hf_checkpoint(directory), nnx.Param))}
    abstract = nnx.eval_shape(lambda: GraniteForCausalLM(ModelConfig.from_hf(directory), rngs=nnx.Rngs(0)))
    shardings = parameter_shardings(nnx.state(abstract, nnx.Param), make_mesh({"fsdp": 8}), RULES["fsdp"])
    stats = ReadStats()
    model = load_hf_checkpoint(directory, shardings=shardings, stats=stats)
    mismatched = [".".join(map(str, path)) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                  if not all(np.array_equal(np.asarray(shard.data), plain[path][shard.index])
                             for shard in v[...].addressable_shards)]
    report({"mismatched": mismatched, "bytes_read": stats.bytes_read,
            "checkpoint_bytes": sum(a.nbytes for a in plain.values())})
