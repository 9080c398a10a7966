"""The GPU kernel options as XLA's GPU compiler builds them for one deviceless H100, at the released models' shapes.

    python benchmarks/gpu_kernels.py        # ~2 min on 2 cores; needs requirements-test.txt (CUDA plugin, ptxas)

Three tables (printed as markdown, appended as JSON lines to benchmarks/results/gpu_kernels.jsonl):
1. Every Pallas Triton kernel, forward and backward: registers and spills per thread (ptxas -v for sm_90a on the
   PTX the compiler wrote) and shared memory per block against the H100's 232,448-byte opt-in limit.
   Shapes: the SSD at granite-4.0-h-1b's Mamba layer (1 row of 4,096, 48 heads of 64 channels, state 128);
   attention at h-1b's (12 query / 4 key-value heads of 128) and h-micro's (32 / 8 of 64); the experts' grouped
   matmul at h-tiny's (8,192 tokens x 6 routed copies through 64 experts, hidden 1,536, expert width 512).
2. The routed experts' SwiGLU (forward and gradient, a random cotangent) per `moe_impl`: the matmul FLOPs the
   compiled program executes over the model's count for the routed rows (18·M·H·I: three products, forward
   and two gradients each), and its temporaries. XLA's matmuls are counted from the compiled HLO, loop trips
   included (`train/dry_run.py`); a Triton kernel is opaque there, so its FLOPs are counted from its grid and
   loop bounds (`pallas_grouped_matmul.py`: 2·m·K·N per used tile and product) for the worst case (every expert
   wasting most of a tile) and for a routing drawn evenly over the experts.
3. Attention over a packed row of 4,096 and of 32,768 tokens (documents of 256..2,048 tokens, fixed seed), forward and
   backward, per `attention_impl`: the matmul FLOPs each visits over the model's count (each query against the
   keys at or before it in its own document; 4·d per query head and key forward, twice that backward),
   counted from each kernel's loop bounds: `blockwise` (model/flash.py, blocks of 512: a query block visits
   the key blocks from its first query's document start to its diagonal; forward 2 matmuls per block pair,
   backward 5) and `pallas_gpu` (JAX's Triton kernel: every key block up to the diagonal; forward blocks of
   128, 2 matmuls; backward blocks of 32, 4 for dK/dV and 3 for dQ).
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"  # the GPU compiler through deviceless devices; JAX itself stays on the CPU
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from granite_jax.hlo import executed_matmul_flops  # noqa: E402
from granite_jax.model.moe import grouped_matmul, grouped_swiglu  # noqa: E402
from granite_jax.model.pallas_attention import pallas_attention  # noqa: E402
from granite_jax.model.pallas_ssd import ssd_pallas  # noqa: E402
from granite_jax.parallel.topology import gpu_topology_devices  # noqa: E402
from granite_jax.train.gpu_kernels import compile_options, triton_kernels  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "gpu_kernels.jsonl")
GiB = 2**30
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32
SEQ = 4096
TOKENS, TOP_K, EXPERTS, HIDDEN, WIDTH, TILE = 8192, 6, 64, 1536, 512, 128  # granite-4.0-h-tiny's experts
ROWS = TOKENS * TOP_K


def _compile(loss, shapes, argnums):
    """loss's gradient compiled for one deviceless H100: (compiled program, its Triton kernels)."""
    mesh = jax.sharding.Mesh(np.array(gpu_topology_devices("h100:1")), ("x",))
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P())) for shape, dtype in shapes]
    with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as dump:
        compiled = jax.jit(jax.grad(loss, argnums=argnums)).lower(*args).compile(compiler_options=compile_options(dump))
        return compiled, triton_kernels(dump, compiled.as_text())


def _ssd_loss(x, dt, A, B, C, segment_ids):
    y, final = ssd_pallas(x, dt, A, B, C, segment_ids=segment_ids)
    return jnp.sum(y) + jnp.sum(final)


def _attention_loss(q, k, v, runs):
    return jnp.sum(pallas_attention(q, k, v, runs, impl="pallas_gpu", scale=0.1, plan=None).astype(F32))


def _experts_loss(impl, rows, w_in, w_out, sizes, cotangent):
    out = grouped_swiglu(rows, sizes, w_in, w_out, grouped_matmul=functools.partial(grouped_matmul, impl=impl))
    return jnp.sum(jnp.square(out.astype(F32)) * cotangent)  # needs the forward output: every product runs


_EXPERT_SHAPES = [((ROWS, HIDDEN), BF16), ((EXPERTS, HIDDEN, 2 * WIDTH), BF16), ((EXPERTS, WIDTH, HIDDEN), BF16),
                  ((EXPERTS,), I32), ((ROWS, HIDDEN), F32)]


def kernel_resources() -> list[dict]:
    cases = [
        ("SSD, h-1b Mamba layer", _ssd_loss, [((1, SEQ, 48, 64), BF16), ((1, SEQ, 48), F32), ((48,), F32),
                                              ((1, SEQ, 1, 128), BF16), ((1, SEQ, 1, 128), BF16), ((1, SEQ), I32)],
         (0, 1, 2, 3, 4)),
        ("attention, h-1b (d 128)", _attention_loss, [((1, SEQ, 12, 128), BF16), ((1, SEQ, 4, 128), BF16),
                                                      ((1, SEQ, 4, 128), BF16), ((1, SEQ), I32)], (0, 1, 2)),
        ("attention, h-micro (d 64)", _attention_loss, [((1, SEQ, 32, 64), BF16), ((1, SEQ, 8, 64), BF16),
                                                        ((1, SEQ, 8, 64), BF16), ((1, SEQ), I32)], (0, 1, 2)),
        ("experts, h-tiny", functools.partial(_experts_loss, "pallas_gpu"), _EXPERT_SHAPES, (0, 1, 2)),
    ]
    rows = []
    for case, loss, shapes, argnums in cases:
        _, kernels = _compile(loss, shapes, argnums)
        rows += [{"case": case, **kernel.__dict__, "within_limits": kernel.within_limits} for kernel in kernels]
    return rows


def _used_tiles(sizes: np.ndarray) -> int:
    return int(np.sum(-(-sizes // TILE)))


def expert_flops() -> list[dict]:
    model = 18.0 * ROWS * HIDDEN * WIDTH
    # three products of 2·m·K·N per used tile: forward, input gradient, weight gradient
    per_tile = 3 * 2.0 * TILE * HIDDEN * (2 * WIDTH + WIDTH)
    even = np.random.default_rng(0).multinomial(ROWS, [1 / EXPERTS] * EXPERTS)
    rows = []
    for impl in ("ragged_dot", "tiled", "pallas_gpu"):
        compiled, kernels = _compile(functools.partial(_experts_loss, impl), _EXPERT_SHAPES, (0, 1, 2))
        hlo_flops, _ = executed_matmul_flops(compiled.as_text())
        row = {"moe_impl": impl, "hlo_matmul_flops": hlo_flops, "model_flops": model,
               "temp_gib": compiled.memory_analysis().temp_size_in_bytes / GiB, "kernels": [k.name for k in kernels]}
        if kernels:
            row["kernel_flops_worst"] = per_tile * (-(-ROWS // TILE) + EXPERTS)
            row["kernel_flops_even_routing"] = per_tile * _used_tiles(even)
        rows.append(row)
    return rows


def _packed_row(seq: int, seed: int = 0) -> np.ndarray:
    """Document lengths filling one row of `seq` tokens, 256..2,048 each (the last one cut)."""
    rng, lengths = np.random.default_rng(seed), []
    while sum(lengths) < seq:
        lengths.append(min(int(rng.integers(256, 2049)), seq - sum(lengths)))
    return np.array(lengths)


def attention_flops(seq: int, head_dim: int = 128, query_heads: int = 12) -> list[dict]:
    lengths = _packed_row(seq)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)            # each token's document start
    ends = np.repeat(np.cumsum(lengths), lengths)                        # ... and end (exclusive)
    per_pair = 4.0 * head_dim * query_heads                              # one query against one key, forward
    model = 3 * per_pair * float(np.sum(lengths * (lengths + 1) / 2))

    def blockwise(block=512):
        n = seq // block
        forward = sum(i - starts[i * block:(i + 1) * block].min() // block + 1 for i in range(n))
        backward = sum((ends[j * block:(j + 1) * block].max() - 1) // block - j + 1 for j in range(n))
        return (forward * 2 + backward * 5) * 2.0 * block * block * head_dim * query_heads

    def pallas_gpu(block=128, backward_block=32):
        forward = sum(i + 1 for i in range(seq // block))
        backward = sum(i + 1 for i in range(seq // backward_block))  # pairs on or below the diagonal, each pass
        return (forward * 2 * block**2 + backward * 7 * backward_block**2) * 2.0 * head_dim * query_heads

    return [{"attention_impl": name, "seq": seq, "documents": len(lengths), "visited_flops": flops,
             "model_flops": model}
            for name, flops in (("blockwise", blockwise()), ("pallas_gpu", pallas_gpu()))]


def report(resources, experts, attention) -> str:
    lines = ["| case | kernel | registers | spilled B / thread | shared memory B (of 232,448) | threads |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['name']} | {r['registers']} | {r['spill_store_bytes']} | "
              f"{r['shared_memory_bytes']:,} | {r['threads']} |" for r in resources]
    lines += ["", "| moe_impl | compiled matmul FLOPs / routed (HLO) | Triton kernels' FLOPs / routed (worst; even "
              "routing) | temporaries |", "|---|---|---|---|"]
    for r in experts:
        ratio = {key: f"{value / r['model_flops']:.3f}" for key, value in r.items() if "flops" in key}
        kernel = f"{ratio['kernel_flops_worst']}; {ratio['kernel_flops_even_routing']}" if r["kernels"] else "—"
        hlo = "— (inside the kernels)" if r["kernels"] else ratio["hlo_matmul_flops"]
        lines.append(f"| {r['moe_impl']} | {hlo} | {kernel} | {r['temp_gib']:.2f} GiB |")
    lines += ["", "| attention_impl | packed row | visited matmul FLOPs / model's |", "|---|---|---|"]
    lines += [f"| {r['attention_impl']} | {r['seq']:,} tokens, {r['documents']} documents | "
              f"{r['visited_flops'] / r['model_flops']:.2f} |" for r in attention]
    return "\n".join(lines)


def main() -> None:
    from granite_jax.runtime import configure_process

    configure_process()  # our XLA defaults, before the first JAX computation
    resources, experts = kernel_resources(), expert_flops()
    attention = attention_flops(SEQ) + attention_flops(8 * SEQ)
    stamp = {"date": datetime.date.today().isoformat(), "device": "NVIDIA H100 80GB HBM3 (deviceless)",
             "jax": jax.__version__, "cuda_plugin": importlib.metadata.version("jax-cuda13-plugin")}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps({**stamp, "kernels": resources, "experts": experts, "attention": attention}) + "\n")
    print(f"{stamp}\n\n{report(resources, experts, attention)}")


if __name__ == "__main__":
    main()
