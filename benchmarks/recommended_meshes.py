"""Dry-run the released Granite 4.0 models on the pods we recommend for them; write the table in RESULTS.md.

Each entry is compiled ahead of time by the TPU compiler for a deviceless TPU topology (`train.py --topology`,
needs libtpu: `pip install -r benchmarks/requirements-tpu.txt`), one subprocess per entry (libtpu and the
compiled program are released between entries). Per-device figures are the TPU compiler's: parameters and
optimizer state (float32, sharded), temporaries (activations, gradients, workspace) at full rematerialisation,
and the collectives per step. Results go to benchmarks/results/recommended_meshes.jsonl, one line per entry.

    python benchmarks/recommended_meshes.py                  # every entry (the largest takes ~10 min on 2 cores)
    python benchmarks/recommended_meshes.py --only h-small   # entries whose model name contains "h-small"
    python benchmarks/recommended_meshes.py --seq-len 524288 # the entries with rows of 512K tokens
    python benchmarks/recommended_meshes.py --long           # the long-row entries (context parallelism)
    python benchmarks/recommended_meshes.py --report         # the markdown table from the JSONL
    python benchmarks/recommended_meshes.py --entries 7 --scan-layers  # the layer stack as a scan (less host
                                                             # memory to compile; recorded in model_overrides)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "recommended_meshes.jsonl")
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Entry:
    model: str
    topology: str  # TPU topology name (chips)
    pod: str  # what to book
    mesh: dict
    rows_per_device: int  # sequences of seq_len per batch shard (devices / context) per step
    seq_len: int = 4096
    model_overrides: tuple = ()  # extra (key, value) compute settings, e.g. sub-pieces for long rows

    @property
    def devices(self) -> int:
        n = 1
        for size in self.mesh.values():
            n *= size
        return n

    @property
    def batch_size(self) -> int:
        """Rows per step: a row is split over the `context` devices, so devices / context rows hold one each."""
        return self.rows_per_device * self.devices // self.mesh.get("context", 1)

    @property
    def tokens_per_device(self) -> int:
        return self.batch_size * self.seq_len // self.devices

    @property
    def key(self) -> tuple:
        return self.model, self.seq_len


ENTRIES = [
    Entry("granite-4.0-350m", "v5e:2x4", "v5litepod-8 (8 × 16 GB)", {"fsdp": 8}, 2),
    Entry("granite-4.0-h-350m", "v5e:2x4", "v5litepod-8 (8 × 16 GB)", {"fsdp": 8}, 2),
    Entry("granite-4.0-1b", "v5e:2x4", "v5litepod-8 (8 × 16 GB)", {"fsdp": 8}, 1),
    Entry("granite-4.0-h-1b", "v5e:2x4", "v5litepod-8 (8 × 16 GB)", {"fsdp": 8}, 1),
    Entry("granite-4.0-micro", "v5p:2x2x2", "v5p-16 (8 chips × 95 GB)", {"fsdp": 8}, 2),
    Entry("granite-4.0-h-micro", "v5p:2x2x2", "v5p-16 (8 chips × 95 GB)", {"fsdp": 8}, 2),
    Entry("granite-4.0-h-tiny", "v5p:2x2x2", "v5p-16 (8 chips × 95 GB)", {"fsdp": 1, "expert": 8}, 2),
    Entry("granite-4.0-h-small", "v5p:4x4x4", "v5p-128 (64 chips × 95 GB)", {"fsdp": 8, "expert": 8}, 1),
]
# Long rows: one row split over a `context` axis, the layers in sub-pieces of 8,192 tokens per
# device. Plus h-tiny at 8K, so that its figures per token can be compared across lengths.
_LONG = (("subpiece_tokens", 8192), ("scan_layers", "true"))
LONG_ENTRIES = [
    Entry("granite-4.0-h-tiny", "v5p:2x2x2", "v5p-16 (8 chips × 95 GB)", {"expert": 8}, 1, 8192,
          (("scan_layers", "true"),)),
    *(Entry("granite-4.0-h-1b", "v5p:2x2x2", "v5p-16 (8 chips × 95 GB)", {"context": 8}, 1, n, _LONG)
      for n in (131072, 524288)),
    *(Entry("granite-4.0-h-tiny", "v5p:4x4x4", "v5p-128 (64 chips × 95 GB)", {"expert": 8, "context": 8}, 1, n,
            _LONG) for n in (131072, 524288)),
    *(Entry("granite-4.0-h-small", "v5p:4x4x8", "v5p-256 (128 chips × 95 GB)",
            {"fsdp": 2, "expert": 8, "context": 8}, 1, n, _LONG) for n in (131072, 524288)),
]


def _overrides(entry: Entry) -> list[str]:
    mesh = "{" + ", ".join(f"{k}: {v}" for k, v in entry.mesh.items()) + "}"
    compute = "{" + ", ".join(f"{k}: {v}" for k, v in (("remat_policy", "full"), *entry.model_overrides)) + "}"
    return [f"model={entry.model}", f"mesh={mesh}", f"data.seq_len={entry.seq_len}",
            f"data.batch_size={entry.batch_size}", "compute_dtype=bfloat16",
            "moe_capacity_factor=1.25", f"model_overrides={compute}"]


ALL = ENTRIES + LONG_ENTRIES


def scanned(entry: Entry) -> Entry:
    """`entry` with its layer stack compiled as a `lax.scan` over the layer pattern (`scan_layers: true`)."""
    rest = tuple((k, v) for k, v in entry.model_overrides if k != "scan_layers")
    return dataclasses.replace(entry, model_overrides=(*rest, ("scan_layers", "true")))


def run_one(index: int, scan_layers: bool = False) -> dict:
    """Compile entry `index` of ALL in this process and return its figures (called in a subprocess)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    sys.path.insert(0, ROOT)
    from granite_jax.parallel.topology import tpu_topology_devices
    from granite_jax.train import load_run_config
    from granite_jax.train.dry_run import dry_run

    entry = scanned(ALL[index]) if scan_layers else ALL[index]
    start = time.time()
    report = dry_run(load_run_config(os.path.join(ROOT, "configs", "pretrain-tiny.yaml"), _overrides(entry)),
                     tpu_topology_devices(entry.topology))
    return {**_identity(entry), "tokens_per_device": entry.tokens_per_device, "device": report.platform,
            "params_gib": report.params_bytes / GiB, "opt_state_gib": report.opt_state_bytes / GiB,
            "temp_gib": report.temp_bytes / GiB, "total_gib": report.peak_bytes / GiB,
            "device_gib": (report.device_bytes or 0) / GiB, "step_flops": report.step_flops,
            "model_flops": report.model_flops, "matmul_flops": report.matmul_flops,
            "data_dependent_matmul_flops": report.data_dependent_matmul_flops,
            "collectives_gib": {k: v[1] / GiB for k, v in report.collectives.items()},
            "uncounted_loops": report.uncounted_loops,
            "compile_s": round(time.time() - start, 1), "date": time.strftime("%Y-%m-%d")}


def _identity(entry: Entry) -> dict:
    return {"model": entry.model, "topology": entry.topology, "pod": entry.pod, "mesh": entry.mesh,
            "rows_per_device": entry.rows_per_device, "seq_len": entry.seq_len,
            "model_overrides": dict(entry.model_overrides)}


def _flops(value) -> str:
    return "not recounted" if value is None else f"{value:.2e}"


def _key(row: dict) -> tuple:
    return row["model"], row.get("seq_len", 4096)


def _recorded(entries: list[Entry], latest: dict):
    """(newest result, its mesh as text) of every entry that has one, in the entries' order."""
    for entry in entries:
        if (row := latest.get(entry.key)) is not None:
            scan = ", layers scanned" if row.get("model_overrides", {}).get("scan_layers") == "true" else ""
        yield row, " × ".join(f"{k} {v}" for k, v in row["mesh"].items()) + (scan if entry in ENTRIES else "")


def report() -> str:
    """The markdown tables (rows of 4,096 tokens; long rows) from the newest result of every entry."""
    latest = {}
    for line in open(RESULTS):  # the newest line per (model, sequence length) wins
        row = json.loads(line)
        latest[_key(row)] = row
    lines = ["| model | pod (TPU topology) | mesh | tokens / device | params + optimizer | temporaries | total "
             "(of HBM) | collectives / step |", "|---|---|---|---|---|---|---|---|"]
    for row, mesh in _recorded(ENTRIES, latest):
        if "error" in row:
            lines.append(f"| {row['model']} | {row['pod']} (`{row['topology']}`) | {mesh} | — | error: "
                         f"{row['error']} | | | |")
            continue
        lines.append(f"| {row['model']} | {row['pod']} (`{row['topology']}`) | {mesh} | "
                     f"{row['rows_per_device'] * row['seq_len']:,} | {row['params_gib'] + row['opt_state_gib']:.1f} "
                     f"GiB | {row['temp_gib']:.1f} GiB | **{row['total_gib']:.1f}** of {row['device_gib']:.0f} GiB | "
                     f"{sum(row['collectives_gib'].values()):.1f} GiB |")
    long = ["| model, row | pod (TPU topology) | mesh | tokens / chip | params + optimizer | temporaries | total "
            "(of HBM) | matmul FLOPs / chip (model, one document) | collectives / chip / step |",
            "|---|---|---|---|---|---|---|---|---|"]
    for row, mesh in _recorded(LONG_ENTRIES, latest):
        if "error" in row:
            long.append(f"| {row['model']}, {row['seq_len'] // 1024}K | {row['pod']} | {mesh} | error: "
                        f"{row['error']} | | | | | |")
            continue
        traffic = ", ".join(f"{kind} {size:.1f}" for kind, size in sorted(row["collectives_gib"].items()))
        long.append(f"| {row['model']}, {row['seq_len'] // 1024}K | {row['pod']} (`{row['topology']}`) | {mesh} | "
                    f"{row['tokens_per_device']:,} | {row['params_gib'] + row['opt_state_gib']:.1f} GiB | "
                    f"{row['temp_gib']:.1f} GiB | **{row['total_gib']:.1f}** of {row['device_gib']:.0f} GiB | "
                    f"{_flops(row['matmul_flops'])} ({row['model_flops']:.2e}) | {traffic} GiB |")
    return "\n".join(lines) + "\n\nLong rows, split over a `context` axis:\n\n" + "\n".join(long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="entries whose model name contains this")
    parser.add_argument("--seq-len", type=int, default=None, help="entries with rows of this many tokens")
    parser.add_argument("--long", action="store_true", help="only the long-row entries")
    parser.add_argument("--entries", default=None, help="comma-separated entry numbers (as printed, from 1)")
    parser.add_argument("--report", action="store_true", help="print the markdown tables from the results")
    parser.add_argument("--scan-layers", action="store_true",
                        help="compile the entries with scan_layers: true (the unrolled h-tiny step with the "
                             "Pallas kernels ran out of a 24 GB host's memory compiling)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one entry, JSON out
    args = parser.parse_args()
    if args.report:
        print(report())
        return
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.scan_layers)))
        return
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    for index, entry in enumerate(ALL):
        entry = scanned(entry) if args.scan_layers else entry
        if ((args.only and args.only not in entry.model) or (args.seq_len and entry.seq_len != args.seq_len)
                or (args.long and ALL[index] not in LONG_ENTRIES)
                or (args.entries and str(index + 1) not in args.entries.split(","))):
            continue
        print(f"[{index + 1}/{len(ALL)}] {entry.model} at {entry.seq_len:,} tokens on {entry.topology} {entry.mesh} "
              "...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", str(index), *(["--scan-layers"] * args.scan_layers)],
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
            row = {**_identity(entry), "error": f"exit {proc.returncode}: {error}"}  # -9: killed (host memory?)
        else:
            row = json.loads(lines[-1])
        print("   ", {k: row[k] for k in ("total_gib", "temp_gib", "compile_s", "error") if k in row}, flush=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(report())


if __name__ == "__main__":
    main()
