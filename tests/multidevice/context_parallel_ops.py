"""The context-parallel SSD and causal conv (shard_map over a `context` axis of 2, 4 or 8 devices, contiguous
shards) against the unsharded functions and the token-by-token oracle: values and gradients, on packed rows
whose document boundaries fall at, next to and away from the shard and chunk edges."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from granite_jax.model.documents import document_runs
from granite_jax.model.flash import flash_attention, flash_attention_context_parallel
from granite_jax.model.mamba import causal_depthwise_conv, conv_halo
from granite_jax.model.ssd import ssd_chunked, ssd_context_parallel, ssd_reference
from tests.multidevice import arguments, report

H, HEAD_DIM, STATE, WIDTH = 4, 3, 5, 4


def segment_cases(T: int, shards: int, chunk: int, rng) -> dict:
    """Rows of segment ids (b = 2) for one sequence length, keyed by what they exercise."""
    piece = T // shards

    def row(boundaries, ids=None):
        ids = ids or list(range(1, len(boundaries) + 2))
        segments = np.zeros(T, np.int32)
        for start, end, value in zip([0, *boundaries], [*boundaries, T], ids):
            segments[start:end] = value
        return segments

    random_rows = []
    for _ in range(2):
        cuts = sorted(rng.choice(np.arange(1, T), size=rng.integers(1, 8), replace=False).tolist())
        random_rows.append(row(cuts))
    tiny = np.concatenate([np.repeat(np.arange(1, T), rng.integers(1, 4, T - 1))[:T]]).astype(np.int32)
    padded = row([T - piece // 2 - 3], ids=[1, 0])
    return {
        "one document": np.stack([row([]), row([])]),
        "at shard edges": np.stack([row([piece * s for s in range(1, shards)]), row([piece])]),
        "one either side of a shard edge": np.stack([row([piece - 1]), row([piece + 1])]),
        "at a chunk edge and next to it": np.stack([row([chunk]), row([chunk + 1, 2 * chunk - 1])]),
        "documents of 1-3 tokens": np.stack([tiny, tiny[::-1].copy()]),
        "reused ids": np.stack([row([2, 4, piece - 1, piece + 1], ids=[1, 1, 2, 2, 1]) if piece > 4
                                else row([piece], ids=[1, 2]), row([piece], ids=[1, 1])]),
        "trailing padding": np.stack([padded, padded]),
        "random partitions": np.stack(random_rows),
    }


def inputs(T: int, rng):
    x = rng.normal(size=(2, T, H, HEAD_DIM)).astype(np.float32)
    dt = rng.uniform(0.05, 0.6, size=(2, T, H)).astype(np.float32)
    A = -rng.uniform(0.3, 1.5, size=(H,)).astype(np.float32)
    B = rng.normal(size=(2, T, 1, STATE)).astype(np.float32)
    C = rng.normal(size=(2, T, 1, STATE)).astype(np.float32)
    return x, dt, A, B, C


def relative_error(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def compare_ssd(mesh, segments, args, chunk) -> dict:
    x, dt, A, B, C = args
    seq = P(None, "context")

    def sharded(x, dt, A, B, C):
        return jax.shard_map(lambda x, dt, A, B, C, s: ssd_context_parallel(
            x, dt, A, B, C, chunk_size=chunk, segment_ids=s, axis="context"), mesh=mesh,
            in_specs=(seq, seq, P(), seq, seq, seq), out_specs=seq, check_vma=False)(x, dt, A, B, C, segments)

    def whole(x, dt, A, B, C):
        return ssd_chunked(x, dt, A, B, C, chunk_size=chunk, segment_ids=segments)[0]

    def oracle(x, dt, A, B, C):
        return ssd_reference(x, dt, A, B, C, segment_ids=segments)[0]

    def loss(f):
        return lambda *a: jnp.sum(jnp.sin(f(*a)) * jnp.cos(a[0][..., :1]))

    values = {name: jax.jit(f)(*args) for name, f in [("sharded", sharded), ("whole", whole), ("oracle", oracle)]}
    grads = {name: jax.jit(jax.grad(loss(f), argnums=(0, 1, 2, 3, 4)))(*args)
             for name, f in [("sharded", sharded), ("whole", whole), ("oracle", oracle)]}
    return {"value_vs_whole": relative_error(values["sharded"], values["whole"]),
            "value_vs_oracle": relative_error(values["sharded"], values["oracle"]),
            "grad_vs_whole": max(relative_error(a, b) for a, b in zip(grads["sharded"], grads["whole"])),
            "grad_vs_oracle": max(relative_error(a, b) for a, b in zip(grads["sharded"], grads["oracle"]))}


def compare_conv(mesh, segments, rng) -> dict:
    T = segments.shape[1]
    x = rng.normal(size=(2, T, 6)).astype(np.float32)
    kernel = rng.normal(size=(WIDTH, 6)).astype(np.float32)
    bias = rng.normal(size=(6,)).astype(np.float32)
    seq = P(None, "context")

    def local(x, kernel, bias, segment_ids):
        runs = document_runs(segment_ids, segment_ids.shape)
        halo, halo_runs = conv_halo(x, runs, segment_ids, WIDTH, "context")
        return causal_depthwise_conv(x, kernel, bias, runs, initial_state=halo, initial_runs=halo_runs)[0]

    def sharded(x, kernel, bias):
        mapped = jax.shard_map(local, mesh=mesh, in_specs=(seq, P(), P(), seq), out_specs=seq, check_vma=False)
        return mapped(x, kernel, bias, segments)

    def whole(x, kernel, bias):
        return causal_depthwise_conv(x, kernel, bias, document_runs(segments, segments.shape))[0]

    def loss(f):
        return lambda *a: jnp.sum(jnp.sin(f(*a)) * a[0])

    grads = [jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(x, kernel, bias) for f in (sharded, whole)]
    return {"conv_value": relative_error(jax.jit(sharded)(x, kernel, bias), jax.jit(whole)(x, kernel, bias)),
            "conv_grad": max(relative_error(a, b) for a, b in zip(*grads))}


def compare_attention(mesh, segments, rng, block: int) -> dict:
    """GQA (4 query heads, 2 KV heads) over the whole row vs. each shard's queries against gathered keys."""
    T = segments.shape[1]
    q = rng.normal(size=(2, T, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, T, 2, 8)).astype(np.float32) for _ in range(2))
    seq = P(None, "context")

    def sharded(q, k, v):
        return jax.shard_map(lambda q, k, v, s: flash_attention_context_parallel(
            q, k, v, s, scale=0.3, block_size=block, axis="context"), mesh=mesh,
            in_specs=(seq, seq, seq, seq), out_specs=seq, check_vma=False)(q, k, v, segments)

    def whole(q, k, v):
        return flash_attention(q, k, v, document_runs(segments, segments.shape), scale=0.3, block_size=block)

    def loss(f):
        return lambda *a: jnp.sum(jnp.sin(f(*a)) * a[0])

    grads = [jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v) for f in (sharded, whole)]
    return {"attention_value": relative_error(jax.jit(sharded)(q, k, v), jax.jit(whole)(q, k, v)),
            "attention_grad": max(relative_error(a, b) for a, b in zip(*grads))}


def main():
    shards = arguments()["shards"]
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:shards]), ("context",))
    rng = np.random.default_rng(shards)
    results = {}
    for T, chunk in [(shards * 16, 8), (shards * 12, 5)]:  # chunks that do and do not divide a shard
        args = inputs(T, rng)
        for name, segments in segment_cases(T, shards, chunk, rng).items():
            segments = jnp.asarray(segments)
            results[f"T={T} chunk={chunk} {name}"] = {**compare_ssd(mesh, segments, args, chunk),
                                                      **compare_conv(mesh, segments, rng),
                                                      **compare_attention(mesh, segments, rng, block=chunk - chunk % 4)}
    report(results)


if __name__ == "__main__":
    main()
