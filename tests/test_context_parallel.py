"""Context parallelism: a row split over the devices of a `context` mesh axis. Multi-device parts run in the
shared 8-device process (tests/conftest.py: `eight_devices`)."""

import types

import numpy as np
import pytest
from conftest import context_meshes, context_run, eight_device_job, metrics


@eight_device_job("context ops 8 shards")
def test_context_parallel_ssd_conv_and_attention_equal_the_unsharded_functions(eight_devices):
    """Each shard runs the chunked SSD from a zero state; the shards' (decay, final state) summaries are
    all-gathered and scanned into each shard's entering state, added to its first document's outputs; the
    conv's halo is the previous shard's last inputs, counted only where their document continues; attention
    takes each shard's queries against the all-gathered keys with documents counted over the whole row. Values
    and gradients (x, dt, A, B, C; conv input, kernel, bias; q, k, v) equal the unsharded functions' (and the
    SSD's token-by-token oracle's), for document boundaries at, next to and away from shard and chunk edges,
    1-3 token documents, one-token documents, reused ids, trailing padding and random partitions (and 12 pairs
    of rows drawn by hypothesis per layout), with a chunk that does not divide a piece (contiguous) and one that
    does (zigzag)."""
    results = dict(eight_devices("context ops 8 shards"))
    for layout in ("contiguous", "zigzag"):  # 12 drawn pairs of rows per layout, each within tolerance
        drawn = results.pop(f"{layout} hypothesis partitions")
        assert "failed" not in drawn and len(drawn) == 8, drawn  # value and grad: ssd vs whole and oracle, conv, attn
    assert len(results) == 22  # 10 kinds of rows and the shared weights, in two layouts
    for case, errors in results.items():
        assert len(errors) == (3 if case.endswith("shared weights") else 8), (case, errors)
        for name, error in errors.items():
            assert error < (1e-5 if "value" in name else 1e-4), (case, name, error)


@pytest.mark.parametrize("model", [pytest.param(m, marks=eight_device_job(f"context meshes {m}"))
                                   for m in ("tiny-hybrid-moe", "tiny-dense-rope")])
def test_context_parallel_training_gives_the_one_device_losses(model, eight_devices, reference_train):
    """Two training steps of a 2-layer model with every row split over a context axis (the hybrid with expert
    and tensor, and with fsdp in sub-pieces of 4 tokens per device, zigzag; the attention model alone on
    context 8 and with expert, contiguous and zigzag) give the one-device losses and gradient norms: the Mamba
    layer's halo and state passing, attention over the gathered keys, expert parallelism over rows x pieces,
    the loss over each device's tokens and the gradient reductions over context are all exact."""
    reference, reference_dir = reference_train(context_run(model))
    job = f"context meshes {model}"
    sharded = eight_devices(job)
    reference_norms = metrics(reference_dir, "grad_norm")
    assert len(reference) == 2 and set(sharded) == set(context_meshes(model))
    for name, losses in sharded.items():
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(metrics(eight_devices.root(job) / name.replace(" ", ""), "grad_norm"),
                                   reference_norms, rtol=1e-4, err_msg=name)


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

    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, "context": context})
    with pytest.raises(MeshError, match=message):
        check_sequence(seq_len, mesh, ShardingPlan(), load_preset("tiny-hybrid-moe"))
    check_sequence(1024, mesh, ShardingPlan(), load_preset("tiny-hybrid-moe"))


def test_zigzag_balances_causal_attention_over_the_shards():
    """For one 512K-token document on 8 and 16 context shards, the attention work (query block x key block
    pairs the flash kernel visits) of the busiest shard over the mean: contiguous pieces leave the last shard
    with nearly twice the mean; zigzag pieces (r and 2N-1-r) give every shard the same. The layout's token order
    is a permutation, and a row permuted by it puts shard r's pieces at its contiguous slice."""
    from granite_jax.parallel.sequence import causal_attention_work, layout_order

    for shards in (8, 16):
        contiguous = causal_attention_work(524288, shards, "contiguous", block=512)
        zigzag = causal_attention_work(524288, shards, "zigzag", block=512)
        assert contiguous.sum() == zigzag.sum()
        assert contiguous.max() / contiguous.mean() > 1.8
        assert zigzag.max() / zigzag.mean() <= 1.1
    order = layout_order(16, 2, "zigzag")
    assert sorted(order) == list(range(16))
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])


@eight_device_job("context_parallel_program")
def test_compiled_context_parallel_step_moves_no_full_length_activations(eight_devices):
    """The compiled train step of a 2-Mamba-layer tiny model, rows of 64K tokens split over 8 context devices:
    no collective carries a float array with the sequence's full length (the halo and the SSM summaries are
    all that cross devices in a Mamba layer), the summaries are all-gathered as (8, rows, heads, head_dim,
    d_state) once per layer forward (and its recomputation); and its temporaries per device are at most a
    quarter of the same row's on one device. (The length must not be the vocabulary's 4096: the embedding's
    gradient would look like a full-length activation.)"""
    result = eight_devices("context_parallel_program")
    assert result["full_length_float_collectives"] == [], result
    assert result["summary_all_gathers"] >= 2, result
    assert result["temp_context_8"] <= result["temp_context_1"] / 4, result


@eight_device_job("scoring_mesh")
def test_scoring_over_a_context_axis_equals_one_device(eight_devices):
    """eval.py's scorer (perplexity, multiple choice) on `--mesh '{context: 8}'` and on data 2 x context 4 with
    the zigzag layout: every request's summed log-likelihood equals one device's (1e-4 nats) and the greedy
    flags are the same; on context 8, requests packed several to a row score what they score alone in a row
    (documents stay apart across the shards); a decoding prefill with the sequence split is refused, saying
    what to do instead."""
    result = eight_devices("scoring_mesh")
    for name in ("context 8", "data 2 x context 4 zigzag"):
        assert result[name]["max_abs_difference"] < 1e-4 and result[name]["greedy_equal"], result
    assert result["context 8"]["packed_vs_alone"] < 1e-4, result
    assert "not supported; prefill on a mesh with context=1" in result["prefill"], result


@eight_device_job("long_row_memory")
def test_the_512k_steps_temporaries_fit_the_host(eight_devices):
    """configs/pretrain-512k.yaml's train step compiled at its 524,288-token rows on 8 context devices (one
    compile: XLA:CPU's compile time does not depend on the row's length): at most 1.25 GB of temporaries per
    device, so that 8 devices plus the process's ~2 GB stay under 12 GB of host memory (1.21 GB when written;
    all-gathered keys and values and a second Mamba scan over kept per-token outputs made it 2.2 GB)."""
    result = eight_devices("long_row_memory")
    assert result["seq_len"] == 524288 and result["devices"] == 8, result
    assert result["temporaries"] <= 1.25e9, result
