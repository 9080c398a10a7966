"""A packed row gives, for each document, the logits of that document run alone: attention, the causal conv and
the SSM state never carry information across a document boundary."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, hf_logits, max_rel_error, random_ids

from granite_jax import load_hf_checkpoint
from granite_jax.model.documents import document_runs, positions_within_documents

# With chunk size 8: a document filling chunk 0 exactly, one starting at a chunk boundary, a length-1
# document, one crossing a boundary, then padding (segment id 0).
DOC_LENGTHS = [8, 5, 1, 7, 3]


def _packed_row(seed):
    docs = [random_ids(seed + i, (1, n)) for i, n in enumerate(DOC_LENGTHS)]
    ids = jnp.concatenate(docs + [jnp.zeros((1, 4), jnp.int32)], axis=1)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(DOC_LENGTHS)] + [np.zeros(4, int)])
    return docs, ids, jnp.asarray(segments[None], jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {},
    dict(layer_types=["attention"] * 3, position_embedding_type="rope", num_local_experts=0, num_experts_per_tok=0),
    dict(mamba_n_groups=2, num_local_experts=0, num_experts_per_tok=0),
], ids=["hybrid_moe", "dense_rope", "hybrid_two_groups"])
def test_packed_row_equals_documents_alone(hf_checkpoint, overrides):
    directory, hf_model = hf_checkpoint(**overrides)
    model = load_hf_checkpoint(directory)
    docs, ids, segments = _packed_row(10)
    packed = np.asarray(forward(model, ids, segments).logits)
    start = 0
    for doc in docs:
        alone = np.asarray(forward(model, doc).logits)
        n = doc.shape[1]
        assert max_rel_error(packed[:, start:start + n], alone) <= 1e-5
        assert max_rel_error(packed[:, start:start + n], hf_logits(hf_model, doc)) <= 1e-4
        start += n


def test_packing_changes_nothing_but_the_boundaries(hf_checkpoint):
    """The same row without segment ids is one long document: later documents' logits must differ, so the
    test above cannot pass by accident."""
    directory, _ = hf_checkpoint()
    model = load_hf_checkpoint(directory)
    _, ids, segments = _packed_row(10)
    packed = np.asarray(forward(model, ids, segments).logits)
    unpacked = np.asarray(forward(model, ids).logits)
    np.testing.assert_allclose(packed[:, :8], unpacked[:, :8], rtol=1e-5, atol=1e-5)
    assert max_rel_error(unpacked[:, 8:13], packed[:, 8:13]) > 1e-2


def test_positions_restart_in_each_document():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(positions_within_documents(document_runs(segments, segments.shape)),
                                  [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_explicit_positions_drive_rope(hf_checkpoint):
    """RoPE uses the `positions` given: shifting every position of a RoPE model changes nothing (relative
    encoding) while positions that disagree with the tokens' order do."""
    directory, _ = hf_checkpoint(layer_types=["attention"] * 3, position_embedding_type="rope",
                                 num_local_experts=0, num_experts_per_tok=0)
    model = load_hf_checkpoint(directory)
    for layer in model.model.layers:  # sharpen attention so that positions visibly matter
        layer.self_attn.q_proj.kernel.set_value(layer.self_attn.q_proj.kernel[...] * 30)
    ids = random_ids(4, (1, 12))
    base = np.asarray(forward(model, ids).logits)
    shifted = np.asarray(forward(model, ids, None, jnp.arange(12)[None] + 7).logits)
    scrambled = np.asarray(forward(model, ids, None, jnp.asarray([[0] * 12])).logits)
    assert max_rel_error(shifted, base) <= 1e-5
    assert max_rel_error(scrambled, base) > 100 * max(max_rel_error(shifted, base), 1e-6)
