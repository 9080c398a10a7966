"""Generation with caches: equal to transformers' `generate`, prefill + decode = a full forward, one decode
compilation, batching of prompts of different lengths, sampling, stops and bad requests."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LAYERS, forward, make_hf_model, max_rel_error
from flax import nnx

from granite_jax.config import load_preset
from granite_jax.eval.generate import GenerationError, Generator, SamplingConfig, sample_next
from granite_jax.formats import load_hf_checkpoint
from granite_jax.model import GraniteForCausalLM
from granite_jax.model.granite import init_cache

# Untied heads: a random tied model mostly repeats its input token, which would make a weak test.
HYBRID_MOE = dict(tie_word_embeddings=False)
DENSE_ROPE = dict(tie_word_embeddings=False, layer_types=["attention"] * 3, position_embedding_type="rope",
                  num_local_experts=0)
HYBRID_TWO_GROUPS = dict(tie_word_embeddings=False, mamba_n_groups=2, num_local_experts=0,
                         layer_types=["mamba", "mamba", "attention"])
# The cache size of the shared generator's calls: one prompt bucket (64) + 32 new tokens, what the greedy test
# below needs. The tests whose results do not depend on it use it too, so that they share its compilations.
MAX_LEN = 96


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """The HYBRID_MOE checkpoint (seed 0), its transformers model, our model and one Generator shared by the
    tests of this module (its prefill and decode compile once per batch size and sampling)."""
    directory = tmp_path_factory.mktemp("generate") / "hf"
    hf = make_hf_model(0, **HYBRID_MOE)
    hf.save_pretrained(directory)
    model = load_hf_checkpoint(str(directory))
    return types.SimpleNamespace(hf=hf, model=model, generator=Generator(model))


@pytest.mark.parametrize("case", ["hybrid_moe", "dense_rope"])
def test_greedy_generation_equals_transformers(hf_checkpoint, moe, case):
    import torch

    if case == "hybrid_moe":
        hf, generator = moe.hf, moe.generator
    else:
        directory, hf = hf_checkpoint(**DENSE_ROPE)
        generator = Generator(load_hf_checkpoint(directory))
    prompt = np.random.default_rng(1).integers(0, 128, (1, 11))
    with torch.no_grad():
        expected = hf.generate(torch.tensor(prompt), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, 11:].tolist()
    result = generator.generate(prompt.tolist(), max_new_tokens=32)  # max_len: just enough, MAX_LEN
    assert len(set(expected)) > 4, "the oracle's output should not be degenerate"
    assert result.tokens[0] == expected and result.finish_reasons == ["length"]


@nnx.jit
def prefill(model, ids, lengths, cache):
    """`model.prefill` compiled (op by op, the tiny preset's prefill takes seconds of dispatch and compiles)."""
    return model.prefill(ids, lengths, cache)


@nnx.jit
def decode(model, token, cache):
    """One `model.decode` step, compiled once per shape (every step of a loop reuses it)."""
    return model.decode(token, cache)


# Prompt lengths in one 64-token bucket: left-padded by 51 tokens (13 crosses the chunk size, 8, of the test
# models), by none, and by 24.
PROMPTS = (13, 64, 40)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [HYBRID_MOE, DENSE_ROPE, HYBRID_TWO_GROUPS],
                         ids=["hybrid_moe", "dense_rope", "two_groups"])
def test_prefill_then_decode_steps_equal_a_full_forward(hf_checkpoint, moe, overrides):
    """A Generator's prefill of left-padded prompts, then 16 decode steps fed the next token of each row (batch 3
    and MAX_LEN: the hybrid MoE shares the programs of test_batched_prompts_of_different_lengths_equal_each_alone),
    give the logits of a plain forward of each row."""
    if overrides is HYBRID_MOE:
        model, generator = moe.model, moe.generator
    else:
        model = load_hf_checkpoint(hf_checkpoint(**overrides)[0])
        generator = Generator(model)
    steps = 16
    ids = np.random.default_rng(2).integers(0, 128, (len(PROMPTS), 64 + steps))
    full = np.asarray(forward(model, jnp.asarray(ids, jnp.int32)).logits)
    greedy, key = SamplingConfig(), jax.random.key(0)
    _, logits, cache = generator.prefill([ids[r, :n].tolist() for r, n in enumerate(PROMPTS)], 64, MAX_LEN, key,
                                         greedy)
    outputs = [np.asarray(logits)]
    for step in range(steps):
        tokens = jnp.asarray([ids[r, n + step] for r, n in enumerate(PROMPTS)], jnp.int32)
        _, logits, cache = generator.decode(tokens, cache, key, greedy)
        outputs.append(np.asarray(logits))
    expected = np.stack([full[r, n - 1:n + steps] for r, n in enumerate(PROMPTS)])
    assert max_rel_error(np.stack(outputs, axis=1), expected) < 1e-5


def test_decode_compiles_once(moe):
    generator = Generator(moe.model)  # its own: it counts its traces from zero
    generator.generate([[1, 2, 3, 4, 5]], max_new_tokens=20, max_len=MAX_LEN)
    generator.generate([[9, 8, 7]], max_new_tokens=20, max_len=MAX_LEN)  # another prompt in the same bucket
    assert generator.trace_counts == {"prefill": 1, "decode": 1}


@pytest.mark.slow
def test_batched_prompts_of_different_lengths_equal_each_alone(moe):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 128, n).tolist() for n in (3, 17, 9)]
    together = moe.generator.generate(prompts, max_new_tokens=12, max_len=MAX_LEN).tokens
    alone = [moe.generator.generate([p], max_new_tokens=12, max_len=MAX_LEN).tokens[0] for p in prompts]
    assert together == alone


def test_sampling_filters():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    keys = jax.random.split(jax.random.key(0), 200)
    draws = lambda sampling: np.stack([np.asarray(sample_next(logits, k, sampling)) for k in keys])  # noqa: E731
    assert np.array_equal(np.asarray(sample_next(logits, keys[0], SamplingConfig())), [1, 0])
    assert (draws(SamplingConfig(temperature=1.0, top_k=1)) == [1, 0]).all()
    top2 = draws(SamplingConfig(temperature=1.0, top_k=2))
    assert set(top2[:, 0]) == {1, 3} and set(top2[:, 1]) == {0, 3}
    # top_p 0.5: row 0 keeps only its top token (p = 0.64); row 1's top two have 0.52 and 0.47.
    top_p = draws(SamplingConfig(temperature=1.0, top_p=0.5))
    assert set(top_p[:, 0]) == {1} and set(top_p[:, 1]) == {0}
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.9))[:, 1]) == {0, 3}
    everything = draws(SamplingConfig(temperature=1.0))
    assert set(everything[:, 0]) == {0, 1, 2, 3}


def test_temperature_sampling_is_seeded(moe):
    sampling = SamplingConfig(temperature=1.5, top_k=20, top_p=0.95)
    run = lambda seed: moe.generator.generate([[1, 2, 3]], max_new_tokens=16, sampling=sampling, seed=seed,  # noqa: E731
                                              max_len=MAX_LEN).tokens
    assert run(0) == run(0) and run(0) != run(1)


class _CharTokenizer:
    """ids 0..127 ↔ ASCII characters; EOS is id 4."""

    vocab_size, eos_id, pad_id = 128, 4, 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_stops_on_eos_and_stop_strings(moe):
    generator, tokenizer = moe.generator, _CharTokenizer()
    free = generator.generate([[1, 2, 3]], max_new_tokens=24, tokenizer=tokenizer, max_len=MAX_LEN).tokens[0]
    eos = free[5]
    stopped = generator.generate([[1, 2, 3]], max_new_tokens=24, eos_id=eos, max_len=MAX_LEN)
    assert stopped.tokens[0] == free[:free.index(eos)] and stopped.finish_reasons == ["eos"]
    stop = tokenizer.decode(free[6:8])
    result = generator.generate([[1, 2, 3]], max_new_tokens=24, stop_strings=[stop], tokenizer=tokenizer,
                                max_len=MAX_LEN)
    text = tokenizer.decode(free)
    assert result.finish_reasons == ["stop"] and result.texts[0] == text[:text.find(stop)]


def test_bad_requests_are_clear_errors(moe):
    generator = moe.generator
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generator.generate([[1, 2], []], max_new_tokens=4)
    with pytest.raises(GenerationError, match=r"longest prompt has 30 tokens; with max_new_tokens=8 it needs a cache "
                                              r"of 38 tokens, but max_len=32"):
        generator.generate([list(range(30))], max_new_tokens=8, max_len=32)
    with pytest.raises(GenerationError, match=r"outside the model's vocabulary \[0, 128\)"):
        generator.generate([[1, 500]], max_new_tokens=4)
    with pytest.raises(GenerationError, match="top_p=0.0"):
        generator.generate([[1]], max_new_tokens=4, sampling=SamplingConfig(temperature=1.0, top_p=0.0))


@pytest.mark.slow
def test_generation_on_the_tiny_preset_in_bfloat16():
    """bf16 compute through prefill and decode: runs, and decode logits track the full forward. The preset's
    first two layers (Mamba, attention) with chunks of 32: the forward's 40 tokens cross a chunk boundary."""
    model = GraniteForCausalLM(load_preset("tiny-hybrid-moe", compute_dtype="bfloat16", **TINY_LAYERS),
                               rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(4).integers(3, 4096, (1, 40)), jnp.int32)
    full = np.asarray(forward(model, ids).logits, np.float32)
    logits, cache = prefill(model, ids[:, :30], jnp.zeros((1,), jnp.int32), init_cache(model.config, 1, 48))
    for t in range(30, 40):
        logits, cache = decode(model, ids[:, t], cache)
    assert max_rel_error(np.asarray(logits, np.float32), full[:, -1]) < 0.05
