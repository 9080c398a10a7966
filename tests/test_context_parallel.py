"""Context parallelism: a row split over the devices of a `context` mesh axis. Multi-device parts run as
`python -m tests.multidevice.NAME` on virtual CPU devices (tests/test_parallel.py:_run_module)."""

import numpy as np
import pytest

from tests.test_parallel import TRAIN, _metrics, _run_module


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_context_parallel_ssd_conv_and_attention_equal_the_unsharded_functions(shards):
    """Each shard runs the chunked SSD from a zero state; the shards' (decay, final state) summaries are
    all-gathered and scanned into each shard's entering state, added to its first document's outputs; the
    conv's halo is the previous shard's last inputs, counted only where their document continues; attention
    takes each shard's queries against the all-gathered keys with documents counted over the whole row. Values
    and gradients (x, dt, A, B, C; conv input, kernel, bias; q, k, v) equal the unsharded functions' (and the
    SSD's token-by-token oracle's), for document boundaries at, next to and away from shard and chunk edges,
    1-3 token documents, reused ids, trailing padding and random partitions, with chunks that do and do not
    divide a shard."""
    results = _run_module("context_parallel_ops", {"shards": shards}, devices=shards)
    assert len(results) == 16
    for case, errors in results.items():
        assert errors["value_vs_whole"] < 1e-5 and errors["value_vs_oracle"] < 1e-5, (case, errors)
        assert errors["grad_vs_whole"] < 1e-4 and errors["grad_vs_oracle"] < 1e-4, (case, errors)
        assert errors["conv_value"] < 1e-6 and errors["conv_grad"] < 1e-5, (case, errors)
        assert errors["attention_value"] < 1e-5 and errors["attention_grad"] < 1e-5, (case, errors)


CONTEXT_MESHES = {"context 8": {"context": 8}, "fsdp 2 x context 4": {"fsdp": 2, "context": 4},
                  "expert 2 x context 4": {"expert": 2, "context": 4},
                  "data 2 x tensor 2 x context 2": {"data": 2, "tensor": 2, "context": 2}}


@pytest.mark.parametrize("model", ["tiny-hybrid-moe", "tiny-dense-rope"])
def test_context_parallel_training_gives_the_one_device_losses(tmp_path, model):
    """Three training steps of a 2-layer model with every row split over a context axis (alone and with fsdp,
    expert, data x tensor) give the one-device losses and gradient norms: the Mamba layer's halo and state
    passing, attention over the gathered keys, expert parallelism over rows x pieces, the loss over each
    device's tokens and the gradient reductions over context are all exact."""
    layers = ["mamba", "attention"] if model == "tiny-hybrid-moe" else ["attention", "attention"]
    overrides = {**TRAIN, "model": model,
                 "model_overrides": {"num_hidden_layers": 2, "layer_types": layers, "mamba_chunk_size": 16}}
    reference = _run_module("train_meshes", {"meshes": {"one device": {"data": 1}}, "root": str(tmp_path),
                                             "overrides": overrides}, devices=1)["one device"]
    sharded = _run_module("train_meshes", {"meshes": CONTEXT_MESHES, "root": str(tmp_path), "overrides": overrides})
    reference_norms = _metrics(tmp_path / "onedevice", "grad_norm")
    assert len(reference) == 3 and set(sharded) == set(CONTEXT_MESHES)
    for name, losses in sharded.items():
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(_metrics(tmp_path / name.replace(" ", ""), "grad_norm"), reference_norms,
                                   rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("seq_len, context, message", [
    (100, 8, r"data.seq_len=100 is not divisible by the 8 context shards .*; use a multiple of 8"),
    (24, 8, r"leaves 3 tokens per shard, fewer than mamba_d_conv=4"),
    (1040, 2, r"leaves 520 tokens per shard, not a multiple of attention_block_size=512; use a seq_len that is a "
              r"multiple of 1024"),
])
def test_sequence_that_the_context_axis_cannot_split_is_an_error(seq_len, context, message):
    from granite_jax import load_preset
    from granite_jax.parallel import ShardingPlan
    from granite_jax.parallel.mesh import MeshError, check_sequence
    from tests.test_parallel import _mesh

    with pytest.raises(MeshError, match=message):
        check_sequence(seq_len, _mesh(context=context), ShardingPlan(), load_preset("tiny-hybrid-moe"))
    check_sequence(1024, _mesh(context=context), ShardingPlan(), load_preset("tiny-hybrid-moe"))
