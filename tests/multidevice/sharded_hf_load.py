"""Loading an HF checkpoint straight onto a mesh (`load_hf_checkpoint(shardings=...)`) against the plain load:
every parameter equal, each placed as the rules say, and the bytes read per device about 1/N of the checkpoint
where the rules split the tensors; and the same checkpoint imported as a run (`convert import`) restored onto
the mesh by `RunDirectory(...).load(shardings)` (what `init_from=run:` does). Argument: {"directory": HF_DIR,
"run_dir": the import's run directory, "meshes": {name: [mesh sizes, rules]}}."""

import os

import jax
import numpy as np
from flax import nnx

from granite_jax import GraniteForCausalLM, ModelConfig, load_hf_checkpoint
from granite_jax.formats.hf import ReadStats
from granite_jax.parallel.mesh import RULES, make_mesh, parameter_shardings
from granite_jax.sources import RunDirectory
from tests.multidevice import arguments, report


def _checkpoint_bytes(directory: str) -> int:
    from safetensors import safe_open

    total = 0
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="numpy") as f:
                total += sum(f.get_tensor(k).nbytes for k in f.keys())
    return total


def _compare(model, plain: dict, shardings) -> dict:
    """Parameters that differ from the plain load, that are not placed as `shardings` say, and how many are
    split over devices."""
    mismatched, misplaced, split = [], [], 0
    expected = dict(nnx.to_flat_state(shardings))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, path))
        value = variable[...]
        if not value.sharding.is_equivalent_to(expected[path], value.ndim):
            misplaced.append(name)
        if not np.array_equal(np.asarray(value), plain[name]) or value.dtype != plain[name].dtype:
            mismatched.append(name)
        split += any(s is not None for s in value.sharding.spec)
    return {"mismatched": mismatched, "misplaced": misplaced, "split": split}


def check(directory: str, run_dir: str | None, plain: dict, sizes: dict, rules: str) -> dict:
    mesh = make_mesh(sizes)
    abstract = nnx.eval_shape(lambda: GraniteForCausalLM(ModelConfig.from_hf(directory), rngs=nnx.Rngs(0)))
    shardings = parameter_shardings(nnx.state(abstract, nnx.Param), mesh, RULES[rules])
    stats = ReadStats()
    result = _compare(load_hf_checkpoint(directory, shardings=shardings, stats=stats), plain, shardings)
    total = _checkpoint_bytes(directory)
    per_device = sorted(stats.per_device.values())
    result |= {"parameters": len(plain), "checkpoint_bytes": total, "bytes_read": stats.bytes_read,
               "max_device_fraction": per_device[-1] / total, "min_device_fraction": per_device[0] / total}
    if run_dir is not None:
        result["run"] = _compare(RunDirectory(run_dir).load(shardings), plain, shardings)
    return result


def main():
    args = arguments()
    directory = args["directory"]
    plain = {".".join(map(str, path)): np.asarray(v[...])
             for path, v in nnx.to_flat_state(nnx.state(load_hf_checkpoint(directory), nnx.Param))}
    report({name: check(directory, args.get("run_dir"), plain, sizes, rules)
            for name, (sizes, rules) in args["meshes"].items()}
           | {"devices": jax.device_count()})
