"""Context parallelism: a row split over the devices of a `context` mesh axis. Multi-device parts run as
`python -m tests.multidevice.NAME` on virtual CPU devices (tests/test_parallel.py:_run_module)."""

import pytest

from tests.test_parallel import _run_module


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
