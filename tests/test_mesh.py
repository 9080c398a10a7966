"""Mesh construction and logical-axis rules (the parts that do not need several devices)."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from granite_jax import GraniteForCausalLM, load_preset
from granite_jax.parallel.mesh import RULES, MeshError, check_batch, logical_to_spec, make_mesh, parameter_shardings

EIGHT = list(range(8))  # stand-ins: the size checks run before any device is touched


@pytest.mark.parametrize("sizes, message", [
    ({"data": 3, "fsdp": 2}, r"has 6 devices; there are 8"),
    ({"data": -1, "fsdp": -1}, r"at most one axis can take the remaining devices"),
    ({"data": -1, "tensor": 3}, r"8 devices are not divisible by the fixed axes' 3"),
    ({"pipeline": 2}, r"unknown mesh axes \['pipeline'\]"),
    ({"data": 0}, r"must be positive"),
])
def test_bad_mesh_sizes(sizes, message):
    with pytest.raises(MeshError, match=message):
        make_mesh(sizes, devices=EIGHT)


def test_one_device_mesh_and_batch_check():
    mesh = make_mesh({"data": -1})
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1, "expert": 1, "context": 1}
    check_batch(4 * jax.device_count(), mesh)


def test_logical_rules_map_parameters():
    fsdp = ("fsdp", "expert", "context")  # weights' FSDP axes: every axis that does not split their use
    assert logical_to_spec(("expert", "embed", "mlp"), RULES["fsdp_tp"]) == PartitionSpec(
        "expert", ("fsdp", "context"), "tensor")
    # Each mesh axis once per array, first claim wins: non-expert weights split embed over fsdp, expert, context.
    assert logical_to_spec(("embed", "embed"), RULES["fsdp_tp"]) == PartitionSpec(fsdp, None)
    assert logical_to_spec(("embed", "heads"), RULES["fsdp_tp"]) == PartitionSpec(fsdp, "tensor")
    model = nnx.eval_shape(lambda: GraniteForCausalLM(load_preset("tiny-hybrid-moe"), rngs=nnx.Rngs(0)))
    _, params = nnx.split(model, nnx.Param)
    shardings = parameter_shardings(params, make_mesh({"data": -1}), RULES["fsdp_tp"])
    assert shardings["model"]["layers"][0]["block_sparse_moe"]["input_linear"].spec == PartitionSpec(
        "expert", ("fsdp", "context"), "tensor")
    assert shardings["model"]["embed_tokens"].spec == PartitionSpec("tensor", fsdp)
