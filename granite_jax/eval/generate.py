"""Text generation with a constant-size Mamba state and a preallocated KV cache.

    prompts → left-pad to a bucket of 64 tokens → prefill (chunked SSD, flash attention; fills the cache, one
    compilation per bucket) → decode steps (the SSD recurrence, one attention query over the cache, a sampled
    token; ONE compiled function reused for every step and every call with the same batch/cache shape)

Prompts of different lengths are left-padded: the padding is its own document (see `GraniteForCausalLM.prefill`), so
no state, conv tap or attention crosses into a prompt. Rows stop on EOS or a stop string; finished rows keep
producing padding until every row is done or `max_new_tokens` is reached.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.model.granite import DecodeCache, GraniteForCausalLM, init_cache

PROMPT_BUCKET = 64  # prompt lengths are padded up to a multiple of this: one prefill compilation per bucket


class GenerationError(ValueError):
    """A generation request cannot be served (empty prompt, prompt longer than the cache, bad sampling values)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature 0 = greedy; top_k 0 and top_p 1.0 = no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self, vocab_size: int | None = None) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k} must be an integer >= 0 (0 = off)")
        if vocab_size is not None and self.top_k > vocab_size:
            raise GenerationError(f"top_k={self.top_k} is more than the vocabulary's {vocab_size} tokens "
                                  "(0 = off: every token)")
        if not 0.0 < self.top_p <= 1.0:  # NaN fails this too
            raise GenerationError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")


def sample_next(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next token per row from logits (b, vocab): greedy, or temperature sampling after top-k / top-p."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (stop string / EOS excluded)
    texts: list[str] | None  # decoded, cut before a stop string (when a tokenizer was given)
    finish_reasons: list[str]  # "eos", "stop", or "length"


class Generator:
    """Compiled prefill/decode for one model; reuse it across calls to reuse the compilations.

    `trace_counts` counts how often each function was traced (= compiled): a test checks that decoding
    compiles once, however many tokens are generated.
    """

    def __init__(self, model: GraniteForCausalLM, *, pad_id: int = 0):
        self.config = model.config
        self.pad_id = pad_id
        self.graphdef, self.params = nnx.split(model)
        self.trace_counts = {"prefill": 0, "decode": 0}

        def prefill(params, ids, start, cache, key, sampling):
            self.trace_counts["prefill"] += 1
            logits, cache = nnx.merge(self.graphdef, params).prefill(ids, start, cache)
            return sample_next(logits, key, sampling), logits, cache

        def decode(params, tokens, cache, key, sampling):
            self.trace_counts["decode"] += 1
            logits, cache = nnx.merge(self.graphdef, params).decode(tokens, cache)
            return sample_next(logits, key, sampling), logits, cache

        self._prefill = jax.jit(prefill, static_argnames="sampling", donate_argnums=(3,))
        self._decode = jax.jit(decode, static_argnames="sampling", donate_argnums=(2,))

    def prefill(self, prompts: Sequence[Sequence[int]], width: int, max_len: int, key, sampling: SamplingConfig):
        """Left-pad `prompts` to `width` tokens and run them; returns (first tokens, logits, cache)."""
        ids = np.full((len(prompts), width), self.pad_id, np.int32)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = prompt
        start = np.asarray([width - len(p) for p in prompts], np.int32)
        cache = init_cache(self.config, len(prompts), max_len)
        return self._prefill(self.params, jnp.asarray(ids), jnp.asarray(start), cache, key, sampling=sampling)

    def decode(self, tokens, cache: DecodeCache, key, sampling: SamplingConfig):
        return self._decode(self.params, tokens, cache, key, sampling=sampling)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), eos_id: int | None = None,
                 stop_strings: Sequence[str] = (), tokenizer=None, max_len: int | None = None,
                 seed: int = 0, on_token: Callable[[int, int], None] | None = None) -> Generation:
        """Generate up to `max_new_tokens` per prompt (lists of token ids).

        `max_len`: cache capacity in tokens (prompt bucket + new tokens); None = just enough.
        `on_token(row, token)` is called for every token kept, as it is generated (streaming).
        Stop strings need `tokenizer` (they are matched in the decoded text).
        """
        prompts = [list(p) for p in prompts]
        _check_request(prompts, max_new_tokens, sampling, self.config.vocab_size, stop_strings, tokenizer)
        longest = max(len(p) for p in prompts)
        width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
        if max_len is None:
            max_len = width + max_new_tokens
        elif longest + max_new_tokens > max_len:
            raise GenerationError(f"the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} "
                                  f"it needs a cache of {longest + max_new_tokens} tokens, but max_len={max_len}")
        width = min(width, max_len - max_new_tokens)
        key = jax.random.key(seed)
        key, sub = jax.random.split(key)
        tokens, _, cache = self.prefill(prompts, width, max_len, sub, sampling)
        n = len(prompts)
        generated = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        texts = [""] * n if tokenizer is not None else None
        for step in range(max_new_tokens):
            host = np.asarray(tokens).tolist()
            for row in range(n):
                if finish[row]:
                    continue
                if eos_id is not None and host[row] == eos_id:
                    finish[row] = "eos"
                    continue
                generated[row].append(host[row])
                if on_token is not None:
                    on_token(row, host[row])
                if stop_strings:
                    texts[row] = tokenizer.decode(generated[row])
                    if any(s in texts[row] for s in stop_strings):
                        finish[row] = "stop"
            if all(finish) or step == max_new_tokens - 1:
                break
            key, sub = jax.random.split(key)
            tokens, _, cache = self.decode(tokens, cache, sub, sampling)
        finish = [f or "length" for f in finish]
        if tokenizer is not None:
            texts = [_cut_at_stop(tokenizer.decode(g), stop_strings) for g in generated]
        return Generation(generated, texts, finish)


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _check_request(prompts, max_new_tokens, sampling, vocab_size, stop_strings, tokenizer) -> None:
    if not prompts:
        raise GenerationError("no prompts given")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise GenerationError(f"prompt {index} is empty (0 tokens); give at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise GenerationError(f"prompt {index} has token ids outside the model's vocabulary [0, {vocab_size})")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if stop_strings and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer to match the decoded text")
    if any(not stop for stop in stop_strings):
        raise GenerationError("a stop string is empty: it would match before the first token")
    sampling.validate(vocab_size)
