"""Inference state memory and decode speed: a hybrid Granite 4.0 config vs the all-attention config of the
same size (same hidden size, heads and layer count, every layer attention), in one run.

State memory is the decoding cache: per Mamba layer the conv and SSM states (float32, constant in the
context length), per attention layer the keys and values of every context token (compute dtype). It is
computed from the cache's array shapes for every (context, batch) point, and measured where the model and
cache fit (the device allocator's `bytes_in_use` before and after allocating the cache; on a GPU/TPU only);
rows say which.

Decode speed: the cache is allocated for `context + steps` tokens and marked as holding `context` tokens
(its contents do not change the work of a decode step), then `steps` compiled decode steps are timed.

    python benchmarks/decode_memory.py                              # h-1b vs all-attention h-1b, bf16
    python benchmarks/decode_memory.py --preset tiny-hybrid-moe --contexts 512 2048 --batches 1 4   # CPU check

Prints one JSON line per point, then the reduction table; writes a PNG of memory vs context (needs
matplotlib: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from granite_jax.config import ATTENTION, load_preset  # noqa: E402
from granite_jax.model import GraniteForCausalLM  # noqa: E402
from granite_jax.model.granite import init_cache  # noqa: E402


def configs(preset: str, dtype: str):
    hybrid = load_preset(preset, compute_dtype=dtype, param_dtype=dtype)
    attention = dataclasses.replace(hybrid, layer_types=(ATTENTION,) * hybrid.num_hidden_layers)
    return {"hybrid": hybrid, "all-attention": attention}


def state_bytes(config, batch: int, context: int) -> int:
    shapes = jax.eval_shape(lambda: init_cache(config, batch, context))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(shapes.layers))


def param_bytes(config) -> int:
    shapes = nnx.eval_shape(lambda: GraniteForCausalLM(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(shapes, nnx.Param)))


def bytes_in_use() -> int | None:
    """The device allocator's bytes in use; None on CPU, where XLA keeps no allocator statistics (and the
    process's resident-memory delta is unreliable: freed buffers are reused)."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("bytes_in_use") if stats else None


def measure(model, config, batch: int, context: int, steps: int) -> dict:
    graphdef, params = nnx.split(model)

    @jax.jit
    def make_cache():
        cache = init_cache(config, batch, context + steps)
        return cache._replace(index=jnp.asarray(context, jnp.int32))

    @jax.jit
    def decode(params, tokens, cache):
        logits, cache = nnx.merge(graphdef, params).decode(tokens, cache)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    decode = jax.jit(decode.__wrapped__, donate_argnums=(2,))
    make_cache.lower().compile()  # compile first, so that only the cache's allocation is counted
    before = bytes_in_use()
    cache = make_cache()
    jax.block_until_ready(cache)
    after = bytes_in_use()
    tokens = jnp.ones((batch,), jnp.int32)
    tokens, cache = decode(params, tokens, cache)  # compile + warm up
    jax.block_until_ready(tokens)
    start = time.perf_counter()
    for _ in range(steps - 1):
        tokens, cache = decode(params, tokens, cache)
    jax.block_until_ready(tokens)
    elapsed = time.perf_counter() - start
    return {"measured_state_gib": None if before is None else (after - before) / 2**30,
            "decode_tokens_per_s": batch * (steps - 1) / elapsed, "ms_per_step": 1e3 * elapsed / (steps - 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="granite-4.0-h-1b")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="measure only where params + state fit in this much (default: 80%% of the device's "
                             "memory on a GPU, 8 GiB on CPU)")
    parser.add_argument("--models", nargs="+", default=["hybrid", "all-attention"])
    parser.add_argument("--png", default=os.path.join(ROOT, "benchmarks", "results", "decode_memory.png"))
    parser.add_argument("--report-from", nargs="+", default=None,
                        help="skip measuring: print the table and plot from JSON lines written by earlier runs")
    args = parser.parse_args(argv)
    from granite_jax.runtime import configure_process

    configure_process()  # our XLA defaults, before the first JAX computation
    if args.report_from:
        rows = [json.loads(line) for path in args.report_from for line in open(path) if line.startswith("{")]
        args.batches = sorted({r["batch"] for r in rows})
        args.contexts = sorted({r["context"] for r in rows})
        args.preset, args.dtype = rows[0]["preset"], rows[0]["dtype"]
        report(rows, args, rows[0]["machine"])
        return

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    budget = args.budget_gib or (0.8 * stats["bytes_limit"] / 2**30 if "bytes_limit" in stats else 8.0)
    machine = f"{device.device_kind} ({device.platform}), {platform.node()}"
    rows = []
    for name, config in configs(args.preset, args.dtype).items():
        if name not in args.models:
            continue
        weights = param_bytes(config) / 2**30
        model = None
        for batch in args.batches:
            for context in args.contexts:
                analytic = state_bytes(config, batch, context) / 2**30
                row = dict(model=name, preset=args.preset, batch=batch, context=context, dtype=args.dtype,
                           state_gib=analytic, params_gib=weights, machine=machine)
                # the cache is allocated for context + steps tokens; measured where that and the weights fit
                if weights + state_bytes(config, batch, context + args.steps) / 2**30 * 1.1 < budget:
                    if model is None:
                        model = GraniteForCausalLM(config, rngs=nnx.Rngs(0))
                    row.update(measure(model, config, batch, context, args.steps))
                    row["how"] = ("measured" if row["measured_state_gib"] is not None
                                  else "speed measured; state from the cache's array shapes")
                else:
                    row.update(how="analytic (does not fit)")
                print(json.dumps(row), flush=True)
                rows.append(row)
        del model
    if set(args.models) == {"hybrid", "all-attention"}:
        report(rows, args, machine)


def report(rows: list[dict], args, machine: str) -> None:
    print(f"\n{machine}; {args.preset}, {args.dtype}; state = decoding cache only")
    print("| batch | context | hybrid state | all-attention state | reduction | hybrid decode tok/s | "
          "all-attention decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        for context in args.contexts:
            h, a = [next(r for r in rows if r["model"] == m and r["batch"] == batch and r["context"] == context)
                    for m in ("hybrid", "all-attention")]
            speed = lambda r: f"{r['decode_tokens_per_s']:,.2f}" if "decode_tokens_per_s" in r else "—"  # noqa: E731
            print(f"| {batch} | {context:,} | {h['state_gib']:.3f} GiB | {a['state_gib']:.3f} GiB | "
                  f"{1 - h['state_gib'] / a['state_gib']:.1%} | {speed(h)} | {speed(a)} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for batch in args.batches:
        for name, style in (("hybrid", "-o"), ("all-attention", "--s")):
            points = [r for r in rows if r["model"] == name and r["batch"] == batch]
            ax.plot([r["context"] for r in points], [r["state_gib"] for r in points], style,
                    label=f"{name}, batch {batch}")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decoding state (GiB)",
           title=f"{args.preset} vs all-attention, {args.dtype}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.png), exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
