"""The context-parallel SSD, causal conv and attention (shard_map over a `context` axis of 2 or 8 devices,
contiguous and zigzag layouts) against the unsharded functions and the token-by-token oracle: values and
gradients, on packed rows whose document boundaries fall at, next to and away from the shard, piece and chunk
edges, and on partitions that hypothesis draws (and shrinks, should one fail). All cases of one length and
layout run as one batch of rows, and the segment ids are an argument of the compiled functions: one
compilation per function and shape."""

import functools
import math
from typing import NamedTuple

import hypothesis as hyp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from granite_jax.model.documents import document_runs
from granite_jax.model.flash import flash_attention, flash_attention_context_parallel
from granite_jax.model.mamba import causal_conv_context_parallel, causal_depthwise_conv
from granite_jax.model.ssd import ssd_chunked, ssd_context_parallel, ssd_reference
from granite_jax.parallel.sequence import LAYOUTS, layout_order, pieces_per_shard
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
        "at zigzag piece edges": np.stack([row([piece // 2 * s for s in range(1, 2 * shards, 3)]),
                                           row([piece // 2, T - piece // 2])]),
        "one either side of a shard edge": np.stack([row([piece - 1]), row([piece + 1])]),
        "at a chunk edge and next to it": np.stack([row([chunk]), row([chunk + 1, 2 * chunk - 1])]),
        "documents of 1-3 tokens": np.stack([tiny, tiny[::-1].copy()]),
        "one-token documents": np.stack([np.arange(1, T + 1, dtype=np.int32)] * 2),
        "reused ids": np.stack([row([2, 4, piece - 1, piece + 1], ids=[1, 1, 2, 2, 1]) if piece > 4
                                else row([piece], ids=[1, 2]), row([piece], ids=[1, 1])]),
        "trailing padding": np.stack([padded, padded]),
        "random partitions": np.stack(random_rows),
    }


def inputs(b: int, T: int, rng):
    x = rng.normal(size=(b, T, H, HEAD_DIM)).astype(np.float32)
    dt = rng.uniform(0.05, 0.6, size=(b, T, H)).astype(np.float32)
    A = -rng.uniform(0.3, 1.5, size=(H,)).astype(np.float32)
    B = rng.normal(size=(b, T, 1, STATE)).astype(np.float32)
    C = rng.normal(size=(b, T, 1, STATE)).astype(np.float32)
    return x, dt, A, B, C


def relative_error(a, b, floor: float = 0.0) -> float:
    """max |a - b| over max |b|, the denominator at least `floor` (and never zero); NumPy arrays."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), floor, 1e-30))


def loss_of(f):
    return lambda *a: jnp.sum(jnp.sin(f(*a)) * jnp.cos(a[0][..., :1]))


# The unsharded functions (whole row, token-by-token oracle) do not depend on the mesh or the layout: compiled
# once per (operation, name, static settings) and shape for the whole process, not once per layout.
_UNSHARDED: dict = {}


def jitted(check: "Check") -> dict:
    """name -> (value, gradients w.r.t. every argument but the trailing segment ids), compiled once per shape:
    the segment ids are an argument, so new partitions of the same shape reuse the compilation."""
    def compiled(f):
        return jax.jit(f), jax.jit(jax.grad(loss_of(f), argnums=tuple(range(len(check.args)))))

    out = {}
    for name, f in check.functions.items():
        if name == "sharded":
            out[name] = compiled(f)
        else:
            key = (check.prefix, name, check.static)
            if key not in _UNSHARDED:
                _UNSHARDED[key] = compiled(f)
            out[name] = _UNSHARDED[key]
    return out


def errors_against(compiled: dict, args, segments, per_row: tuple, cases: dict, prefix: str) -> dict:
    """Values and gradients of compiled["sharded"] against each other function's, every case (a slice of rows)
    on its own; gradients of arguments shared by all rows (per_row False) under the case "shared weights".

    A gradient is measured against at least 1% of the largest gradient of the same function: one that is zero
    in exact arithmetic (the keys' gradient when every document is one token, whose softmax is constant) is
    float32 rounding noise on both sides, and noise over noise is no relative error."""
    # On the host: slicing and reducing device arrays of each shape (sharded ones included) would compile a
    # program per operation and shape.
    values = {name: np.asarray(value(*args, segments)) for name, (value, _) in compiled.items()}
    grads = {name: [np.asarray(g) for g in grad(*args, segments)] for name, (_, grad) in compiled.items()}
    errors = {case: {} for case in [*cases, "shared weights"]}
    for name in compiled:
        if name == "sharded":
            continue
        pairs = list(zip(grads["sharded"], grads[name], per_row))
        for case, rows in cases.items():
            floor = 1e-2 * max(float(np.max(np.abs(b[rows] if row else b))) for _, b, row in pairs)
            errors[case][f"{prefix}_value_vs_{name}"] = relative_error(values["sharded"][rows], values[name][rows])
            errors[case][f"{prefix}_grad_vs_{name}"] = max(
                relative_error(a[rows], b[rows], floor) for a, b, row in pairs if row)
        if not all(per_row):
            floor = 1e-2 * max(float(np.max(np.abs(b))) for _, b, _ in pairs)
            errors["shared weights"][f"{prefix}_grad_vs_{name}"] = max(
                relative_error(a, b, floor) for a, b, row in pairs if not row)
    return errors


def in_layout(f, layout: str, shards: int, per_row: tuple):
    """f(*args, segments) run on rows put in the context layout, as the data path and the model do around the
    layers: the per_row arguments and the segment ids permuted along time, the result permuted back."""
    def wrapped(*args):
        *args, segments = args
        order = layout_order(segments.shape[1], shards, layout)
        args = [jnp.take(a, order, axis=1) if row else a for a, row in zip(args, per_row)]
        return jnp.take(f(*args, jnp.take(segments, order, axis=1)), np.argsort(order), axis=1)

    return wrapped


class Check(NamedTuple):
    """One operation's functions (the sharded one first; each f(*args, segments)) and its arguments."""
    prefix: str
    functions: dict
    args: tuple
    per_row: tuple  # which arguments have a row and a time dimension (the rest are weights shared by all rows)
    static: tuple = ()  # the settings the unsharded functions close over (chunk, block)


def ssd_check(mesh, layout, chunk, args) -> Check:
    seq = P(None, "context")
    per_row = (True, True, False, True, True)

    def sharded(x, dt, A, B, C, segments):
        return jax.shard_map(lambda x, dt, A, B, C, s: ssd_context_parallel(
            x, dt, A, B, C, chunk_size=chunk, segment_ids=s, axis="context", layout=layout), mesh=mesh,
            in_specs=(seq, seq, P(), seq, seq, seq), out_specs=seq, check_vma=False)(x, dt, A, B, C, segments)

    def whole(x, dt, A, B, C, segments):
        return ssd_chunked(x, dt, A, B, C, chunk_size=chunk, segment_ids=segments)[0]

    def oracle(x, dt, A, B, C, segments):
        return ssd_reference(x, dt, A, B, C, segment_ids=segments)[0]

    return Check("ssd", {"sharded": in_layout(sharded, layout, mesh.size, per_row), "whole": whole,
                         "oracle": oracle}, args, per_row, (chunk,))


def conv_check(mesh, layout, b, T, rng) -> Check:
    args = (rng.normal(size=(b, T, 6)).astype(np.float32), rng.normal(size=(WIDTH, 6)).astype(np.float32),
            rng.normal(size=(6,)).astype(np.float32))
    seq = P(None, "context")
    per_row = (True, False, False)

    def sharded(x, kernel, bias, segments):
        return jax.shard_map(functools.partial(causal_conv_context_parallel, axis="context", layout=layout),
                             mesh=mesh, in_specs=(seq, P(), P(), seq), out_specs=seq,
                             check_vma=False)(x, kernel, bias, segments)

    def whole(x, kernel, bias, segments):
        return causal_depthwise_conv(x, kernel, bias, document_runs(segments, segments.shape))[0]

    return Check("conv", {"sharded": in_layout(sharded, layout, mesh.size, per_row), "whole": whole}, args, per_row)


def attention_check(mesh, layout, b, T, block: int, rng) -> Check:
    """GQA (4 query heads, 2 KV heads) over the whole row vs. each shard's queries against gathered keys."""
    args = (rng.normal(size=(b, T, 4, 8)).astype(np.float32),
            *(rng.normal(size=(b, T, 2, 8)).astype(np.float32) for _ in range(2)))
    seq = P(None, "context")
    per_row = (True, True, True)

    def sharded(q, k, v, segments):
        return jax.shard_map(lambda q, k, v, s: flash_attention_context_parallel(
            q, k, v, s, scale=0.3, block_size=block, axis="context", layout=layout), mesh=mesh,
            in_specs=(seq, seq, seq, seq), out_specs=seq, check_vma=False)(q, k, v, segments)

    def whole(q, k, v, segments):
        return flash_attention(q, k, v, document_runs(segments, segments.shape), scale=0.3, block_size=block)

    return Check("attention", {"sharded": in_layout(sharded, layout, mesh.size, per_row), "whole": whole},
                 args, per_row, (block,))


def checks(mesh, layout, b, T, chunk, rng) -> list[tuple[Check, dict]]:
    """The three operations' checks on rows of b x T, each with its compiled functions."""
    piece = T // (mesh.size * pieces_per_shard(layout))
    block = math.gcd(chunk - chunk % 4, piece)
    made = [ssd_check(mesh, layout, chunk, inputs(b, T, rng)), conv_check(mesh, layout, b, T, rng),
            attention_check(mesh, layout, b, T, block, rng)]
    return [(check, jitted(check)) for check in made]


def partitions(T: int):
    """Hypothesis: a row of T positions cut into documents of 1..T tokens, ids fresh or reused from two
    documents back (1,1,2,2,1,1-like), optionally ending in padding (id 0)."""
    @st.composite
    def row(draw):
        lengths, total = [], 0
        while total < T:
            length = draw(st.integers(1, min(T - total, draw(st.sampled_from([3, T // 4, T])))))
            lengths.append(length)
            total += length
        ids = []
        for i in range(len(lengths)):
            reuse = i >= 2 and draw(st.booleans()) and ids[i - 2] != ids[i - 1]
            ids.append(ids[i - 2] if reuse else i + 1)
        if len(lengths) > 1 and draw(st.booleans()):
            ids[-1] = 0  # trailing padding
        return np.repeat(np.asarray(ids, np.int32), lengths)

    return st.lists(row(), min_size=2, max_size=2).map(np.stack)


def random_partitions(compiled: list, rows: int, T: int, examples: int) -> dict:
    """Hypothesis-drawn partitions (2 rows per example, `examples` examples, shrunk to a minimal failing row
    pair if one fails), run through the named cases' compiled functions of the same T and chunk (`compiled`,
    for batches of `rows` rows: the pair is repeated to fill them): the largest error of each comparison over
    all examples, or the failing example."""
    worst: dict[str, float] = {}

    @hyp.settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(hyp.HealthCheck))
    @hyp.given(partitions(T))
    def holds(segments):
        batch = jnp.asarray(np.tile(segments, (rows // 2, 1)))
        for check, functions in compiled:
            errors = errors_against(functions, check.args, batch, check.per_row, {"rows": slice(0, 2)},
                                    check.prefix)
            for name, error in {**errors["rows"], **errors["shared weights"]}.items():
                worst[name] = max(worst.get(name, 0.0), error)
                assert error < (1e-5 if "value" in name else 1e-4), (name, error, segments.tolist())

    try:
        holds()
    except AssertionError as failure:
        return {"failed": str(failure)}
    return worst


def main():
    shards = arguments()["shards"]
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:shards]), ("context",))
    rng = np.random.default_rng(shards)
    results = {}
    # A chunk that does not divide a piece in the contiguous layout, one that does in zigzag (the training on
    # meshes runs zigzag half-pieces of one chunk and shorter than a chunk).
    sizes = {"contiguous": (shards * 12, 5), "zigzag": (shards * 16, 8)}
    for layout in LAYOUTS:
        T, chunk = sizes[layout]
        named_rows = segment_cases(T, shards, chunk, rng)
        segments = jnp.asarray(np.concatenate(list(named_rows.values())))   # every case in one batch
        cases = {name: slice(2 * i, 2 * i + 2) for i, name in enumerate(named_rows)}
        compiled = checks(mesh, layout, segments.shape[0], T, chunk, rng)
        errors = [errors_against(functions, check.args, segments, check.per_row, cases, check.prefix)
                  for check, functions in compiled]
        for case in errors[0]:
            results[f"{layout} T={T} chunk={chunk} {case}"] = {k: v for e in errors for k, v in e[case].items()}
        results[f"{layout} hypothesis partitions"] = random_partitions(compiled, segments.shape[0], T, examples=12)
    report(results)
