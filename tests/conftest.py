"""Shared fixtures: small random transformers checkpoints saved to disk (the oracle), and helpers."""

from __future__ import annotations

import os

# One persistent XLA compilation cache for the suite: this process and every subprocess it starts (they inherit
# the environment). Dozens of training subprocesses compile the same small train step; with the cache each one
# after the first starts in about half the time (65 s -> 34 s on the 2-core machine). Executables read from the
# cache give the same results, memory analysis and HLO text. Set before JAX is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax-compilation"))

import jax.numpy as jnp  # noqa: E402
import numpy as np
import pytest
from flax import nnx

# A tiny hybrid MoE in transformers' field names. Tests override fields per case.
TINY_HF = dict(
    vocab_size=128, hidden_size=64, intermediate_size=32, shared_intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, layer_types=["mamba", "attention", "mamba"],
    mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=8,
    num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0, logits_scaling=2.0,
    residual_multiplier=0.3, attention_multiplier=0.1, rms_norm_eps=1e-5, tie_word_embeddings=True,
    position_embedding_type="nope", pad_token_id=None,
)


def make_hf_model(seed: int = 0, **overrides):
    """A random `GraniteMoeHybridForCausalLM` whose Mamba constants and norm weights are perturbed away from
    their init values (ones / log(1..n)), so that mistakes in how they are read cannot hide."""
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    torch.manual_seed(seed)
    config = GraniteMoeHybridConfig(**{**TINY_HF, **overrides})
    model = GraniteMoeHybridForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-2:]
            if leaf[-1] in ("A_log", "dt_bias", "D", "bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a random transformers model to a fresh directory; returns (directory, torch model)."""

    def make(seed: int = 0, name: str = "hf", **overrides):
        model = make_hf_model(seed, **overrides)
        directory = tmp_path / name
        model.save_pretrained(directory)
        return str(directory), model

    return make


def hf_logits(model, input_ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(input_ids)), use_cache=False).logits.float().numpy()


@nnx.jit
def forward(model, input_ids, segment_ids=None, positions=None):
    return model(input_ids, segment_ids, positions)


def max_rel_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def random_ids(seed: int, shape, vocab: int = 128):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)
