"""Our model computes what transformers' GraniteMoeHybridForCausalLM computes (the oracle), on random tiny
checkpoints saved with `save_pretrained` and loaded through `load_hf_checkpoint`."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, hf_logits, max_rel_error, random_ids

from granite_jax import load_hf_checkpoint

CASES = {
    "hybrid_moe": {},
    "hybrid_dense": dict(num_local_experts=0, num_experts_per_tok=0),
    "dense_rope": dict(layer_types=["attention"] * 3, position_embedding_type="rope", num_local_experts=0,
                       num_experts_per_tok=0, rope_theta=500.0),
    "untied_proj_bias_rope": dict(tie_word_embeddings=False, mamba_proj_bias=True, attention_bias=True,
                                  position_embedding_type="rope"),
    "two_groups": dict(mamba_n_groups=2),
    "time_step_limit": dict(time_step_limit=(0.05, 2.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seq_len", [16, 21])  # a multiple of the chunk size (8) and not
def test_float32_logits_match_transformers(hf_checkpoint, case, seq_len):
    directory, hf_model = hf_checkpoint(**CASES[case])
    model = load_hf_checkpoint(directory)
    ids = random_ids(1, (2, seq_len))
    out = forward(model, ids)
    assert out.logits.dtype == jnp.float32
    assert max_rel_error(out.logits, hf_logits(hf_model, ids)) <= 1e-4


def test_aux_loss_matches_transformers(hf_checkpoint):
    import torch

    directory, hf_model = hf_checkpoint(num_local_experts=8, num_experts_per_tok=3)
    model = load_hf_checkpoint(directory)
    ids = random_ids(2, (2, 19))
    with torch.no_grad():
        expected = hf_model(torch.tensor(np.asarray(ids)), use_cache=False, output_router_logits=True).aux_loss
    assert float(forward(model, ids).aux_loss) == pytest.approx(float(expected), rel=1e-5)


def test_dense_model_has_zero_aux_loss(hf_checkpoint):
    directory, _ = hf_checkpoint(num_local_experts=0, num_experts_per_tok=0)
    assert float(forward(load_hf_checkpoint(directory), random_ids(0, (1, 8))).aux_loss) == 0.0


@pytest.mark.parametrize("case", ["hybrid_moe", "dense_rope"])
def test_bfloat16_argmax_matches_transformers(hf_checkpoint, case):
    import torch

    directory, hf_model = hf_checkpoint(**CASES[case])
    ids = random_ids(3, (2, 24))
    hf_model = hf_model.to(torch.bfloat16)
    expected = hf_logits(hf_model, ids)
    model = load_hf_checkpoint(directory, dtype="bfloat16", param_dtype="bfloat16")
    logits = forward(model, ids).logits
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.argmax(np.asarray(logits, np.float32), -1), np.argmax(expected, -1))
