"""Per-chip memory of full fine-tuning vs LoRA vs QLoRA (int8, nf4), the TPU compiler's dry run.

The recommended-mesh entries of h-tiny and h-small (`benchmarks/recommended_meshes.py`: bf16 compute, float32
parameters and Adam, `remat_policy: full`, capacity 1.25, rows of 4,096, the layer stack scanned), compiled for
their deviceless TPU topology four ways: every weight trained; LoRA rank 8 on the default targets (attention
q/k/v/o, Mamba in_proj/out_proj); and the same with `lora.quantize_base` int8 and nf4. One subprocess per compile;
one JSON line per compile appended to benchmarks/results/qlora_memory.jsonl.

`--one-host` compiles the same variants where adapters are meant to make tuning fit: h-tiny on one v5p chip
(95 GB, one device of a v5p-8's topology) and h-small on one v5p-8 host (4 chips, expert 4), 2 rows of 4,096 per
chip.

    flock /tmp/compile.lock python benchmarks/qlora_memory.py --only h-tiny [--one-host]
    python benchmarks/qlora_memory.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from recommended_meshes import ENTRIES, ROOT, Entry, GiB, entry_identity, scanned, train_overrides

RESULTS = os.path.join(ROOT, "benchmarks", "results", "qlora_memory.jsonl")
LORA = "lora={rank: 8, alpha: 16}"
VARIANTS = {"full": [], "lora": [LORA], "qlora-int8": [LORA, "lora.quantize_base=int8"],
            "qlora-nf4": [LORA, "lora.quantize_base=nf4"]}
MODELS = ("granite-4.0-h-tiny", "granite-4.0-h-small")
ONE_HOST = [Entry("granite-4.0-h-tiny", "v5p:2x2x1", "one v5p chip (95 GB)", {"data": 1}, 2),
            Entry("granite-4.0-h-small", "v5p:2x2x1", "v5p-8, one host (4 chips × 95 GB)", {"fsdp": 1, "expert": 4},
                  2)]


def entry_for(model: str, one_host: bool = False) -> Entry:
    return scanned(next(e for e in (ONE_HOST if one_host else ENTRIES) if e.model == model))


def run_one(model: str, variant: str, one_host: bool = False) -> dict:
    """Compile one (model, variant) in this process and return its figures."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from granite_jax.parallel.topology import tpu_topology_devices
    from granite_jax.train import load_run_config
    from granite_jax.train.dry_run import dry_run

    entry = entry_for(model, one_host)
    overrides = train_overrides(entry) + VARIANTS[variant]
    start = time.time()
    report = dry_run(load_run_config(os.path.join(ROOT, "configs", "pretrain-tiny.yaml"), overrides),
                     tpu_topology_devices(entry.topology)[:entry.devices])  # one chip of a host's topology
    return {**entry_identity(entry), "variant": variant, "overrides": overrides, "device": report.platform,
            "parameters": report.parameters, "params_gib": report.params_bytes / GiB,
            "opt_state_gib": report.opt_state_bytes / GiB, "batch_gib": report.batch_bytes / GiB,
            "temp_gib": report.temp_bytes / GiB, "total_gib": report.peak_bytes / GiB,
            "device_gib": (report.device_bytes or 0) / GiB,
            # the compiled step's matmul FLOPs (loop iterations counted) and the model's, per chip
            "matmul_flops": report.matmul_flops, "model_flops": report.model_flops,
            "collectives_gib": {k: v[1] / GiB for k, v in report.collectives.items()},
            "compile_s": round(time.time() - start, 1), "date": time.strftime("%Y-%m-%d")}


def report() -> str:
    """The markdown table of the latest row of each (model, devices, variant)."""
    latest = {}
    if os.path.exists(RESULTS):
        for line in open(RESULTS):
            row = json.loads(line)
            latest[row["model"], row["pod"], row["variant"]] = row
    lines = ["| model | devices (mesh) | variant | parameters | trainable state | frozen + trained weights | "
             "optimizer | temporaries | total (of HBM) | compile |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for pod in (entry_for(model).pod, entry_for(model, one_host=True).pod):
            for variant in VARIANTS:
                row = latest.get((model, pod, variant))
                if row is not None:
                    lines.append(_report_line(row))
    return "\n".join(lines)


def _report_line(row: dict) -> str:
    mesh = " × ".join(f"{k} {v}" for k, v in row["mesh"].items())
    where = f"{row['pod']} ({mesh})"
    if "error" in row:
        too_big = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", row["error"])
        error = (f"**does not fit**: the TPU compiler stops at {too_big[1]} GiB of temporaries alone, over "
                 f"{too_big[2]} GiB of HBM" if too_big else row["error"])
        return f"| {row['model']} | {where} | {row['variant']} | {error} |||||||"
    return (f"| {row['model']} | {where} | {row['variant']} | {row['parameters']:,} | "
            f"{'all' if row['variant'] == 'full' else 'adapters'} | {row['params_gib']:.2f} GiB | "
            f"{row['opt_state_gib']:.2f} GiB | {row['temp_gib']:.2f} GiB | "
            f"**{row['total_gib']:.2f}** of {row['device_gib']:.0f} GiB | {row['compile_s']:.0f} s"
            f"{' (in recommended_meshes.py)' if 'source' in row else ''} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="models whose name contains this")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--one-host", action="store_true", help="h-tiny on one chip, h-small on one v5p-8 host")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: MODEL VARIANT
    args = parser.parse_args()
    from granite_jax.runtime import configure_process

    configure_process()  # our XLA defaults, before the first JAX computation
    if args.report:
        print(report())
        return
    if args.one is not None:
        print(json.dumps(run_one(*args.one, one_host=args.one_host)))
        return
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    for model in MODELS:
        if args.only and args.only not in model:
            continue
        for variant in args.variants.split(","):
            print(f"{model} {variant} ...", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--one", model, variant,
                                   *(["--one-host"] if args.one_host else [])], capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
                row = {**entry_identity(entry_for(model, args.one_host)), "variant": variant,
                       "error": f"exit {proc.returncode}: {error}"}
            else:
                row = json.loads(lines[-1])
            print("   ", {k: row[k] for k in ("params_gib", "opt_state_gib", "temp_gib", "total_gib", "compile_s",
                                              "error") if k in row}, flush=True)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(report())


if __name__ == "__main__":
    main()
