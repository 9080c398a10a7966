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
    # Also 8 experts, top-3 (the other MoE cases: 4 experts, top-2): routing and the aux loss for another E and k.
    "time_step_limit_8_experts_top3": dict(time_step_limit=(0.05, 2.0), num_local_experts=8, num_experts_per_tok=3),
}


# Every case at 21 tokens, not a multiple of the chunk size (8) nor of the attention block (24): the SSD and the
# attention pad their tail. 16 tokens (a multiple of both: no padding) once, on the hybrid MoE (Mamba, attention,
# experts); the padding code is the same for every case.
@pytest.mark.parametrize("case, seq_len", [(case, 21) for case in sorted(CASES)] + [("hybrid_moe", 16)])
def test_float32_logits_match_transformers(hf_checkpoint, case, seq_len):
    """Logits, and the MoE load-balancing loss (transformers' `aux_loss`; 0 for a dense model)."""
    import torch

    directory, hf_model = hf_checkpoint(**CASES[case])
    model = load_hf_checkpoint(directory)
    ids = random_ids(1, (2, seq_len))
    out = forward(model, ids)
    moe = hf_model.config.num_local_experts > 0  # transformers has no router logits to count without experts
    with torch.no_grad():
        expected = hf_model(torch.tensor(np.asarray(ids)), use_cache=False, output_router_logits=moe)
    assert out.logits.dtype == jnp.float32
    assert max_rel_error(out.logits, expected.logits.float().numpy()) <= 1e-4
    if moe:
        assert float(expected.aux_loss) > 0
        assert float(out.aux_loss) == pytest.approx(float(expected.aux_loss), rel=1e-5)
    else:
        assert float(out.aux_loss) == 0.0


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
