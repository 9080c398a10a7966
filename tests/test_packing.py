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


def _packed_batch(seed):
    """One batch, so that one compiled forward serves every check of a model: row 0 the documents packed (then
    padding), row 1 the same tokens as one document, rows 2.. each document alone at the start of its row, then
    padding (the model is causal: what follows a document cannot change its logits)."""
    docs = [random_ids(seed + i, (1, n)) for i, n in enumerate(DOC_LENGTHS)]
    packed = jnp.concatenate(docs + [jnp.zeros((1, 4), jnp.int32)], axis=1)
    width = packed.shape[1]
    ids = jnp.concatenate([packed, packed] + [jnp.pad(doc, ((0, 0), (0, width - doc.shape[1]))) for doc in docs])
    segments = np.zeros(ids.shape, np.int32)
    segments[0] = np.concatenate([np.full(n, i + 1) for i, n in enumerate(DOC_LENGTHS)] + [np.zeros(4, int)])
    segments[1] = 1
    for row, n in enumerate(DOC_LENGTHS, 2):
        segments[row, :n] = 1
    return docs, ids, jnp.asarray(segments)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {},
    dict(layer_types=["attention"] * 3, position_embedding_type="rope", num_local_experts=0, num_experts_per_tok=0),
    dict(mamba_n_groups=2, num_local_experts=0, num_experts_per_tok=0),
], ids=["hybrid_moe", "dense_rope", "hybrid_two_groups"])
def test_packed_row_equals_documents_alone(hf_checkpoint, overrides):
    directory, hf_model = hf_checkpoint(**overrides)
    model = load_hf_checkpoint(directory)
    docs, ids, segments = _packed_batch(10)
    logits = np.asarray(forward(model, ids, segments).logits)
    packed = logits[:1]
    start = 0
    for row, doc in enumerate(docs, 2):
        n = doc.shape[1]
        alone = logits[row:row + 1, :n]
        assert max_rel_error(packed[:, start:start + n], alone) <= 1e-5
        assert max_rel_error(packed[:, start:start + n], hf_logits(hf_model, doc)) <= 1e-4
        start += n


def test_packing_changes_nothing_but_the_boundaries(hf_checkpoint):
    """The same row as one document: later documents' logits must differ, so the test above cannot pass by
    accident. (The batch, and so the compiled forward, of the test above's hybrid_moe case.)"""
    directory, _ = hf_checkpoint()
    model = load_hf_checkpoint(directory)
    _, ids, segments = _packed_batch(10)
    logits = np.asarray(forward(model, ids, segments).logits)
    packed, unpacked = logits[:1], logits[1:2]
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
    ids = jnp.tile(random_ids(4, (1, 12)), (3, 1))  # one row per set of positions, one compiled forward
    positions = jnp.stack([jnp.arange(12), jnp.arange(12) + 7, jnp.zeros(12, jnp.int32)])
    base, shifted, scrambled = np.split(np.asarray(forward(model, ids, None, positions).logits), 3)
    assert max_rel_error(shifted, base) <= 1e-5
    assert max_rel_error(scrambled, base) > 100 * max(max_rel_error(shifted, base), 1e-6)
