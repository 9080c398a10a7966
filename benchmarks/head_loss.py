"""The output head's loss and its gradient, `loss_impl` recompute (each chunk under `jax.checkpoint`, its logits
built again in the backward pass; the default) against fused (the gradient computed in the forward pass), in
one run (`model/head.py: chunked_cross_entropy`).

    python benchmarks/head_loss.py             # granite-4.0-h-1b's head (100,352 x 2,048), bf16 hidden states

For each: the compiled matmul FLOPs of value_and_grad (as the train step calls it) in units of one
tokens x vocabulary x hidden matmul, XLA's temporaries for 32,768 tokens (compile only, nothing allocated),
and the measured time of value_and_grad on this machine's default device for `--tokens` tokens. Appends to
benchmarks/results/head_loss.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from granite_jax.hlo import executed_matmul_flops  # noqa: E402
from granite_jax.model.head import chunked_cross_entropy  # noqa: E402

VOCAB, HIDDEN, CHUNK = 100_352, 2_048, 1_024


def head_loss(impl: str):
    def loss(hidden, head, targets, weights):
        return chunked_cross_entropy(hidden, head, targets, weights, chunk=CHUNK, z_coef=1e-4, impl=impl)[0]
    return loss


def _arguments(tokens: int, abstract: bool):
    shapes = [((1, tokens, HIDDEN), jnp.bfloat16), ((VOCAB, HIDDEN), jnp.float32), ((1, tokens), jnp.int32),
              ((1, tokens), jnp.float32)]
    if abstract:
        return [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    key = jax.random.key(0)
    return [jax.random.normal(key, shapes[0][0], jnp.bfloat16), 0.02 * jax.random.normal(key, shapes[1][0]),
            jax.random.randint(key, shapes[2][0], 0, VOCAB), jnp.ones(shapes[3][0])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2_048, help="tokens of the timed runs")
    parser.add_argument("--compiled-tokens", type=int, default=32_768, help="tokens of the compile-only figures")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from granite_jax.runtime import configure_process

    configure_process()  # our XLA defaults, before the first JAX computation
    results = []
    for name in ("recompute", "fused"):
        step = jax.jit(jax.value_and_grad(head_loss(name), argnums=(0, 1)))
        compiled = step.lower(*_arguments(args.compiled_tokens, abstract=True)).compile()
        flops, _ = executed_matmul_flops(compiled.as_text())
        temporaries = compiled.memory_analysis().temp_size_in_bytes
        inputs = _arguments(args.tokens, abstract=False)
        jax.block_until_ready(step(*inputs))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(*inputs))
            times.append(time.perf_counter() - start)
        row = {"implementation": name, "head_matmuls": flops / (2 * args.compiled_tokens * VOCAB * HIDDEN),
               "temporaries_gib": temporaries / 2**30, "compiled_tokens": args.compiled_tokens,
               "timed_tokens": args.tokens, "seconds": min(times), "device": str(jax.devices()[0].device_kind),
               "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(row), flush=True)
        results.append(row)
    previous, fused = results
    print(f"fused / recompute: time {fused['seconds'] / previous['seconds']:.3f}, head matmuls "
          f"{fused['head_matmuls']:.2f} / {previous['head_matmuls']:.2f}, temporaries "
          f"{fused['temporaries_gib']:.2f} / {previous['temporaries_gib']:.2f} GiB")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "head_loss.jsonl"), "a") as out:
        for row in results:
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
