"""Training-step speed and peak memory: granite_jax vs transformers on the same config, in one run.

Each measurement runs in a fresh subprocess so that its peak memory (host ru_maxrss; on a GPU also the
device's peak) is its own. A step is forward + backward + AdamW update on one row of `seq_len` tokens
(batch 1, float32 parameters), the loss a mean next-token cross-entropy. MFU uses the FLOP accounting of
`granite_jax/model/flops.py`. Prints one JSON line per measurement and one per sequence length with the
ratios (ours / transformers).

    python benchmarks/model_step.py                      # bench-hybrid-moe at 2K and 8K
    python benchmarks/model_step.py --seq-lens 1024 --steps 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def measure_ours(preset: str, seq_len: int, steps: int, seed: int, remat: str, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from granite_jax import GraniteForCausalLM, load_preset

    config = load_preset(preset, remat_policy=remat, compute_dtype=dtype)
    model = GraniteForCausalLM(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, (1, seq_len + 1)), jnp.int32)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def loss_fn(params):
        out = nnx.merge(graphdef, params)(inputs)
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()
        return nll + config.router_aux_loss_coef * out.aux_loss

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # update in place, as a training loop does
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    params, opt_state, loss = train_step(params, opt_state)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = train_step(params, opt_state)
    jax.block_until_ready(loss)
    step_s = (time.perf_counter() - t0) / steps
    return dict(first_step_s=round(compile_s, 2), step_s=step_s, loss=float(loss))


def measure_hf(preset: str, seq_len: int, steps: int, seed: int, remat: str, dtype: str) -> dict:
    import numpy as np
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    from granite_jax import load_preset

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = GraniteMoeHybridConfig(**load_preset(preset).to_hf())
    model = GraniteMoeHybridForCausalLM(config).to(device).train()  # float32 master weights, as ours
    if remat != "none":
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.tensor(np.random.default_rng(seed).integers(0, config.vocab_size, (1, seq_len)), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            # LM loss only: transformers 5.17's training-mode aux-loss path fails (`int.to`); the router's
            # statistics are negligible work next to the experts.
            out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        optimizer.step()
        return float(out.loss)  # synchronises

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    return dict(first_step_s=round(first, 2), step_s=(time.perf_counter() - t0) / steps, loss=loss)


def _worker(args) -> None:
    fn = measure_ours if args.impl == "ours" else measure_hf
    from granite_jax import load_preset
    from granite_jax.model.flops import training_flops_per_token

    result = fn(args.preset, args.seq_len, args.steps, args.seed, args.remat, args.dtype)
    tokens_per_s = args.seq_len / result["step_s"]
    flops = training_flops_per_token(load_preset(args.preset), args.seq_len)
    result.update(impl=args.impl, preset=args.preset, seq_len=args.seq_len, steps=args.steps, remat=args.remat,
                  dtype=args.dtype, tokens_per_s=round(tokens_per_s, 1), step_s=round(result["step_s"], 3),
                  model_tflops_per_s=round(tokens_per_s * flops / 1e12, 3),
                  mfu=round(tokens_per_s * flops / (args.peak_tflops * 1e12), 4),
                  peak_rss_gib=round(_peak_rss_gib(), 3), **_accelerator_memory(args.impl))
    print(json.dumps(result), flush=True)


def _accelerator_memory(impl: str) -> dict:
    """Peak accelerator memory, where there is an accelerator."""
    if impl == "hf":
        import torch

        if torch.cuda.is_available():
            return dict(peak_device_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3))
        return {}
    import jax

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return dict(peak_device_gib=round(stats["peak_bytes_in_use"] / 2**30, 3)) if stats else {}


def _run_worker(impl: str, args, seq_len: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--preset", args.preset,
           "--seq-len", str(seq_len), "--steps", str(args.steps), "--seed", str(args.seed), "--remat", args.remat,
           "--dtype", args.dtype, "--peak-tflops", str(args.peak_tflops)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        error = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        failure = dict(impl=impl, preset=args.preset, seq_len=seq_len, failed=error[:500])
        print(json.dumps(failure), flush=True)
        return failure
    print(lines[-1], flush=True)
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-hybrid-moe")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first (compile/warm-up) step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impls", nargs="+", default=["ours", "hf"], choices=["ours", "hf"])
    parser.add_argument("--remat", default="none", choices=["none", "full", "save_dots"],
                        help="activation checkpointing of each layer (ours: remat_policy; transformers: any value "
                             "other than none turns on gradient_checkpointing)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (parameters stay float32; transformers runs under autocast)")
    parser.add_argument("--peak-tflops", type=float, default=0.080,
                        help="the device's peak matmul TFLOP/s, the MFU denominator (default: 0.080, this CPU's "
                             "measured float32 jnp.dot rate; H100 SXM bf16 dense: 989)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from granite_jax.runtime import configure_process

    configure_process()  # our XLA defaults, before the first JAX computation
    if args.worker:
        return _worker(args)
    print(json.dumps(dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                          python=platform.python_version(), date=time.strftime("%Y-%m-%d"))), flush=True)
    for seq_len in args.seq_lens:
        results = {impl: _run_worker(impl, args, seq_len) for impl in args.impls}
        if len(results) == 2 and not any("failed" in r for r in results.values()):
            ours, hf = results["ours"], results["hf"]
            memory = "peak_device_gib" if "peak_device_gib" in ours else "peak_rss_gib"
            print(json.dumps(dict(seq_len=seq_len, speedup=round(ours["tokens_per_s"] / hf["tokens_per_s"], 2),
                                  memory_ratio=round(ours[memory] / hf[memory], 2), memory=memory)), flush=True)


if __name__ == "__main__":
    main()
