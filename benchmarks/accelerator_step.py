"""The train step on one accelerator: tokens/s, MFU and peak device memory of each kernel option against
the platform's defaults, in one run.

    python benchmarks/accelerator_step.py            # GPU or TPU: every case and option (sized for < 8 min on one H100)
    python benchmarks/accelerator_step.py --smoke    # CPU: the tiny model, two options (the test suite runs this)

What is timed is the step `train.py` runs (`train/setup.py: build_run`, forward + backward + AdamW), on one
device, bf16 compute with float32 weights and moments, no rematerialisation, 32,768 tokens per step of packed
documents (lengths drawn uniformly from 256..2,048 tokens, fixed seed) so that attention sees what training
sees. Cases: granite-4.0-h-1b at 4K (8 rows) and 32K (1 row); an h-tiny-shaped MoE (granite-4.0-h-tiny cut to
one group of 10 layers: 9 Mamba-2 + 1 attention) at 4K (8 rows).

Options, the platform's defaults first; each other option changes one thing, or all of them; MoE options run
only for the MoE case:
  GPU  defaults (moe_impl=pallas_gpu: the Pallas Triton grouped matmul; blockwise attention; the XLA SSD);
       moe_impl=tiled (one matmul per tile in a loop); attention_impl=pallas_gpu (JAX's Pallas Triton
       attention kernel); ssd_impl=pallas (our Pallas SSD kernels, model/pallas_ssd.py); loss_impl=fused (the
       head loss's gradient in the forward pass); all of them. Not offered: moe_impl=ragged_dot (XLA's GPU
       compiler makes it one dense matmul over every expert: for this case ~100 GiB of temporaries) and JAX's
       Pallas/Triton lowering of ragged_dot (`jax_ragged_dot_use_gpu_pallas_triton_lowering` fails to lower in
       jax 0.10.2: `ModuleNotFoundError: jax._src.lax.pallas_lowerings`).
  TPU  moe_impl=megablox (Pallas gmm/tgmm); attention_impl=splash; loss_impl=fused; megablox and splash (the
       TPU defaults)
  CPU  moe_impl=tiled (the CPU default) and ragged_dot, on the tiny model (--smoke)

MFU = model FLOPs / step time / peak: `granite_jax/model/flops.py` counts 6·N_active per token (matmul weights,
routed experts at k/E, output head), the SSD's chunk matmuls and causal attention over each token's own
document (`mean_keys_per_query` of the batch); no rematerialisation. Peak: `PEAK_TFLOPS` there (dense bf16).
Each (case, option) runs in its own subprocess, so its peak memory (the device's `peak_bytes_in_use`; on CPU
the process's maximum RSS) and its compile are its own. Results are printed and appended to
benchmarks/results/accelerator_step.jsonl with the date, device and versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "accelerator_step.jsonl")
TOKENS_PER_STEP = 32768
H_TINY_GROUP = ("{num_hidden_layers: 10, layer_types: [mamba, mamba, mamba, mamba, mamba, attention, mamba, mamba, "
                "mamba, mamba]}")  # granite-4.0-h-tiny's first group


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: str
    seq_len: int
    rows: int
    model_overrides: str = "{}"
    moe: bool = False


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    moe_impl: str
    attention_impl: str = "blockwise"
    ssd_impl: str = "xla"
    loss_impl: str = "recompute"
    moe_only: bool = False


CASES = {
    "accelerator": [Case("h-1b 4K", "granite-4.0-h-1b", 4096, 8),
                    Case("h-1b 32K", "granite-4.0-h-1b", 32768, 1),
                    Case("h-tiny group 4K", "granite-4.0-h-tiny", 4096, 8, H_TINY_GROUP, moe=True)],
    "smoke": [Case("tiny MoE 128", "tiny-hybrid-moe", 128, 2, "{num_hidden_layers: 1, layer_types: [mamba]}",
                   moe=True)],
}
OPTIONS = {
    "gpu": [Option("defaults", "auto"),
            Option("tiled MoE", "tiled", moe_only=True),
            Option("pallas_gpu attention", "auto", "pallas_gpu"),
            Option("pallas ssd", "auto", ssd_impl="pallas"),
            Option("fused loss", "auto", loss_impl="fused"),
            Option("all kernels", "auto", "pallas_gpu", "pallas", "fused")],
    "tpu": [Option("xla", "ragged_dot"), Option("megablox", "megablox", moe_only=True),
            Option("splash attention", "ragged_dot", "splash"), Option("fused loss", "ragged_dot", loss_impl="fused"),
            Option("both", "megablox", "splash", moe_only=True)],
    "cpu": [Option("tiled", "tiled"), Option("xla ragged_dot", "ragged_dot", moe_only=True)],
}


def document_segments(rows: int, seq_len: int, seed: int = 0):
    """(segment ids, positions) of rows packed with documents of 256..2,048 tokens (the last one cut)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    segments, positions = np.zeros((rows, seq_len), np.int32), np.zeros((rows, seq_len), np.int32)
    for row in range(rows):
        start, doc = 0, 1
        while start < seq_len:
            length = min(int(rng.integers(256, 2049)), seq_len - start)
            segments[row, start:start + length] = doc
            positions[row, start:start + length] = np.arange(length)
            start, doc = start + length, doc + 1
    return segments, positions


def measure(case: Case, option: Option, steps: int) -> dict:
    """Build the run, time `steps` train steps after two warm-up steps (the first compiles); one device."""
    import jax
    import numpy as np

    from granite_jax.model.flops import mean_keys_per_query, peak_tflops, training_flops_per_token
    from granite_jax.train import load_run_config
    from granite_jax.train.setup import BATCH_FIELDS, build_run

    overrides = case.model_overrides.rstrip("}").strip("{").strip()
    compute = "{" + ", ".join(filter(None, [overrides, f"moe_impl: {option.moe_impl}",
                                            f"attention_impl: {option.attention_impl}",
                                            f"ssd_impl: {option.ssd_impl}", "remat_policy: none"])) + "}"
    config = load_run_config(None, [f"model={case.model}", f"data.seq_len={case.seq_len}",
                                    f"data.batch_size={case.rows}", "compute_dtype=bfloat16", "mesh={data: 1}",
                                    f"loss_impl={option.loss_impl}",
                                    f"model_overrides={compute}"])
    run = build_run(config, jax.devices()[:1])
    segments, positions = document_segments(case.rows, case.seq_len)
    ids = np.random.default_rng(1).integers(0, run.model_config.vocab_size, (case.rows, case.seq_len + 1))
    last = np.append(segments[:, 1:] != segments[:, :-1], np.ones((case.rows, 1), bool), axis=1)
    batch = {"input_ids": ids[:, :-1], "segment_ids": segments, "positions": positions, "targets": ids[:, 1:],
             "loss_weights": np.where(last, 0.0, 1.0)}  # no target across a document's end
    batch = {name: jax.device_put(np.asarray(batch[name], dtype), run.data_sharding) for name, dtype in BATCH_FIELDS}
    state = run.state
    with run.activate():
        started = time.perf_counter()
        for _ in range(2):
            state, metrics = run.train_step(state, batch)
            float(metrics["loss"])
        warmup_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(steps):
            state, metrics = run.train_step(state, batch)
        loss = float(metrics["loss"])
        elapsed = time.perf_counter() - started
    device = jax.devices()[0]
    tokens = case.rows * case.seq_len
    flops = tokens * training_flops_per_token(run.model_config, case.seq_len, mean_keys_per_query(segments))
    peak = peak_tflops(device)
    stats = device.memory_stats() or {}
    return {"case": case.name, "option": option.name, "tokens_per_s": steps * tokens / elapsed,
            "step_s": elapsed / steps, "mfu": flops * steps / elapsed / (peak * 1e12) if peak else None,
            "model_tflop_per_step": flops / 1e12, "peak_tflops": peak, "loss": loss,
            "peak_device_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
            "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "warmup_s": warmup_s, "device": getattr(device, "device_kind", device.platform)}


def _run_one(case: Case, option: Option, steps: int, timeout: float) -> dict:
    spec = json.dumps({"case": dataclasses.asdict(case), "option": dataclasses.asdict(option), "steps": steps})
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", spec], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"case": case.name, "option": option.name, "error": f"did not finish within {timeout:g} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "RESOURCE_EXHAUSTED" in line or "Error" in line),
                  lines[-1] if lines else f"exit code {proc.returncode}")
    return {"case": case.name, "option": option.name, "error": reason[:300]}


def _versions() -> dict:
    import jax
    import jaxlib

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "commit": commit.stdout.strip() or None}


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['case']:<16} {r['option']:<26} {r['error']}"
    mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "   n/a"
    memory = r["peak_device_gib"] if r.get("peak_device_gib") else r["peak_host_rss_gib"]
    return (f"{r['case']:<16} {r['option']:<26} {r['tokens_per_s']:>11,.0f} tok/s  MFU {mfu}  "
            f"peak {memory:6.2f} GiB  (step {r['step_s']:.3f} s, compile+2 steps {r['warmup_s']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny CPU case (what the test suite runs)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per option (default 10; smoke 2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per (case, option)")
    parser.add_argument("--out", default=RESULTS, help="JSONL file the results are appended to")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, in this process
    args = parser.parse_args()
    from granite_jax.runtime import configure_process

    configure_process()  # our XLA defaults, before the first JAX computation
    if args.one:
        spec = json.loads(args.one)
        case, option = Case(**spec["case"]), Option(**spec["option"])
        print("RESULT " + json.dumps(measure(case, option, spec["steps"])), flush=True)
        return

    import jax

    platform = jax.default_backend()
    if args.smoke:
        platform = "cpu"
    elif platform == "cpu":
        parser.error("no GPU or TPU here: run with --smoke for the CPU check")
    steps = args.steps or (2 if args.smoke else 10)
    stamp = {"date": datetime.date.today().isoformat(), "platform": platform, **_versions()}
    print(f"{platform}: {jax.devices()[0]}; {stamp}", flush=True)
    results = []
    for case in CASES["smoke" if args.smoke else "accelerator"]:
        for option in OPTIONS[platform]:
            if option.moe_only and not case.moe:
                continue
            result = {**stamp, **_run_one(case, option, steps, args.timeout)}
            print(_row(result), flush=True)
            results.append(result)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
    baseline = {r["case"]: r for r in results if r["option"] == OPTIONS[platform][0].name and "error" not in r}
    for r in results:
        if r["case"] in baseline and r["option"] != OPTIONS[platform][0].name and "error" not in r:
            print(f"{r['case']}: {r['option']} / {OPTIONS[platform][0].name} = "
                  f"{r['tokens_per_s'] / baseline[r['case']]['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
