"""Dry-run the released Granite 4.0 models on the pods we recommend for them; write the tables in RESULTS.md.

Each entry is compiled ahead of time for a deviceless topology (`train.py --topology`), one subprocess per
entry (the compiler and the compiled program are released between entries):
- TPU entries by the TPU compiler (needs libtpu: `pip install -r benchmarks/requirements-tpu.txt`);
- GPU entries (8 or 64 H100 / H200) by XLA's GPU compiler through the CUDA plugin (no GPU needed; the GPUs
  are described in granite_jax/parallel/gpu_targets). A GPU entry at rows of 4,096 tokens searches the rows
  per GPU: from its starting value up while the step fits the GPU's memory, or down until it does (1, 2, 4,
  8 rows); every compile is recorded and the report shows the most rows that fit.
Per-device figures are the compiler's: parameters and optimizer state (float32, sharded), temporaries
(activations, gradients, workspace) at full rematerialisation, and the collectives per step. Results go to
benchmarks/results/recommended_meshes.jsonl, one line per compile.

    python benchmarks/recommended_meshes.py                  # every entry (the largest takes ~10 min on 2 cores)
    python benchmarks/recommended_meshes.py --only h-small   # entries whose model name contains "h-small"
    python benchmarks/recommended_meshes.py --seq-len 524288 # the entries with rows of 512K tokens
    python benchmarks/recommended_meshes.py --long           # the long-row entries (context parallelism)
    python benchmarks/recommended_meshes.py --report         # the markdown tables from the JSONL
    python benchmarks/recommended_meshes.py --gpu            # only the GPU entries (--tpu: only the TPU ones)
    python benchmarks/recommended_meshes.py --gpu --only h-tiny --rows 4  # its rows search starting at 4
    python benchmarks/recommended_meshes.py --entries 7 --scan-layers  # the layer stack as a scan (less host
                                                             # memory to compile; recorded in model_overrides)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
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
    topology: str  # TPU topology name (chips), or GPU:GPUS_PER_HOST[xHOSTS] for GPUs
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
    def gpu(self) -> bool:
        return self.topology.partition(":")[0] in GPUS

    @property
    def key(self) -> tuple:
        return self.model, self.topology, self.seq_len


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


# GPUs the CUDA plugin compiles for (granite_jax/parallel/gpu_targets), as a pod names them.
GPUS = {"h100": "H100 80GB", "h200": "H200 141GB"}
ROWS = (1, 2, 4, 8)  # the rows of 4,096 tokens per GPU that the rows search tries


def gpu_pod(topology: str) -> str:
    """What to book for GPU topology `topology`: "h100:8" -> "8 H100 80GB", "h100:8x8" -> "64 H100 80GB, 8 hosts
    × 8"."""
    gpu, _, shape = topology.partition(":")
    per_host, _, hosts = shape.partition("x")
    count = int(per_host) * int(hosts or 1)
    return f"{count} {GPUS[gpu]}" + (f", {hosts} hosts × {per_host}" if hosts else "")


_SCAN = (("scan_layers", "true"),)
# The TPU table's meshes on one host of 8 GPUs and on 8 hosts (`expert` within a host's NVLink, `fsdp` across
# hosts); the starting rows per GPU of the search, a guess from the TPU figures (the search decides).
GPU_ENTRIES = [
    Entry(model, f"{gpu}:{shape}", gpu_pod(f"{gpu}:{shape}"), mesh, rows, 4096, overrides)
    for gpu in GPUS
    for model, meshes, rows, overrides in (
        ("granite-4.0-h-1b", ({"fsdp": 8}, {"fsdp": 64}), 8, ()),
        ("granite-4.0-h-micro", ({"fsdp": 8}, {"fsdp": 64}), 4, ()),
        ("granite-4.0-h-tiny", ({"fsdp": 1, "expert": 8}, {"fsdp": 8, "expert": 8}), 4, _SCAN),
        ("granite-4.0-h-small", ({"fsdp": 1, "expert": 8}, {"fsdp": 8, "expert": 8}), 1, _SCAN))
    for shape, mesh in zip(("8", "8x8"), meshes)
]
# The TPU long rows on GPUs: h-1b on one host, the MoE releases on 8 hosts (`context` across hosts).
GPU_LONG_ENTRIES = [
    Entry(model, topology, gpu_pod(topology), mesh, 1, n, _LONG)
    for gpu in GPUS
    for n in (131072, 524288)
    for model, topology, mesh in (("granite-4.0-h-1b", f"{gpu}:8", {"context": 8}),
                                  ("granite-4.0-h-tiny", f"{gpu}:8x8", {"expert": 8, "context": 8}),
                                  ("granite-4.0-h-small", f"{gpu}:8x8", {"expert": 8, "context": 8}))
]


def train_overrides(entry: Entry) -> list[str]:
    """The `train.py` overrides (on configs/pretrain-tiny.yaml) that describe `entry`'s model, mesh and batch."""
    mesh = "{" + ", ".join(f"{k}: {v}" for k, v in entry.mesh.items()) + "}"
    compute = "{" + ", ".join(f"{k}: {v}" for k, v in (("remat_policy", "full"), *entry.model_overrides)) + "}"
    return [f"model={entry.model}", f"mesh={mesh}", f"data.seq_len={entry.seq_len}",
            f"data.batch_size={entry.batch_size}", "compute_dtype=bfloat16",
            "moe_capacity_factor=1.25", f"model_overrides={compute}"]


ALL = ENTRIES + LONG_ENTRIES + GPU_ENTRIES + GPU_LONG_ENTRIES  # numbered from 1 in this order (--entries)


def scanned(entry: Entry) -> Entry:
    """`entry` with its layer stack compiled as a `lax.scan` over the layer pattern (`scan_layers: true`)."""
    rest = tuple((k, v) for k, v in entry.model_overrides if k != "scan_layers")
    return dataclasses.replace(entry, model_overrides=(*rest, ("scan_layers", "true")))


def prepared(index: int, scan_layers: bool = False, rows: int | None = None) -> Entry:
    """Entry `index` of ALL, its layers scanned if asked, at `rows` rows per device if given."""
    entry = scanned(ALL[index]) if scan_layers else ALL[index]
    return entry if rows is None else dataclasses.replace(entry, rows_per_device=rows)


def _compiler(entry: Entry) -> dict:
    """The versions that compiled a GPU entry (the CUDA plugin is XLA's GPU compiler); nothing for TPU entries,
    whose device string names libtpu's generation."""
    if not entry.gpu:
        return {}
    import jax

    return {"jax": jax.__version__, "cuda_plugin": importlib.metadata.version("jax-cuda13-plugin")}


def run_one(index: int, scan_layers: bool = False, rows: int | None = None) -> dict:
    """Compile entry `index` of ALL in this process and return its figures (called in a subprocess)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from granite_jax.parallel.topology import topology_devices
    from granite_jax.train import load_run_config
    from granite_jax.train.dry_run import dry_run

    entry = prepared(index, scan_layers, rows)
    start = time.time()
    report = dry_run(load_run_config(os.path.join(ROOT, "configs", "pretrain-tiny.yaml"), train_overrides(entry)),
                     topology_devices(entry.topology))
    return {**entry_identity(entry), **_compiler(entry), "tokens_per_device": entry.tokens_per_device,
            "device": report.platform,
            "params_gib": report.params_bytes / GiB, "opt_state_gib": report.opt_state_bytes / GiB,
            "temp_gib": report.temp_bytes / GiB, "total_gib": report.peak_bytes / GiB,
            "device_gib": (report.device_bytes or 0) / GiB, "step_flops": report.step_flops,
            "model_flops": report.model_flops, "matmul_flops": report.matmul_flops,
            "data_dependent_matmul_flops": report.data_dependent_matmul_flops,
            "collectives_gib": {k: v[1] / GiB for k, v in report.collectives.items()},
            "uncounted_loops": report.uncounted_loops,
            "compile_s": round(time.time() - start, 1), "date": time.strftime("%Y-%m-%d")}


def entry_identity(entry: Entry) -> dict:
    """The fields that name `entry` in a results row (model, topology, pod, mesh, rows, sequence length...)."""
    return {"model": entry.model, "topology": entry.topology, "pod": entry.pod, "mesh": entry.mesh,
            "rows_per_device": entry.rows_per_device, "seq_len": entry.seq_len,
            "model_overrides": dict(entry.model_overrides)}


def _flops(value) -> str:
    return "not recounted" if value is None else f"{value:.2e}"


def _key(row: dict) -> tuple:
    """A result's entry (model, topology, sequence length) and rows per device: the newest line per key wins."""
    return row["model"], row["topology"], row.get("seq_len", 4096), row["rows_per_device"]


def _fits(row: dict) -> bool:
    return "error" not in row and row["total_gib"] <= row["device_gib"]


def _mesh(row: dict, scan_note: bool) -> str:
    scan = ", layers scanned" if scan_note and row.get("model_overrides", {}).get("scan_layers") == "true" else ""
    return " × ".join(f"{k} {v}" for k, v in row["mesh"].items()) + scan


def _recorded(entries: list[Entry], latest: dict, scan_note: bool):
    """(newest result, its mesh as text) of every entry that has one at its rows per device, in order."""
    for entry in entries:
        if (row := latest.get((*entry.key, entry.rows_per_device))) is not None:
            yield row, _mesh(row, scan_note)


def _most_rows(entry: Entry, latest: dict) -> tuple[dict, dict | None] | None:
    """A GPU entry's rows search: (the result with the most rows per GPU that fits, else the one with the
    fewest rows; the result with the next rows up, which did not fit, or None); None if nothing was compiled."""
    tried = [latest[key] for rows in ROWS if (key := (*entry.key, rows)) in latest]
    if not tried:
        return None
    fitting = [row for row in tried if _fits(row)]
    best = fitting[-1] if fitting else tried[0]
    above = [row for row in tried if row["rows_per_device"] > best["rows_per_device"]]
    return best, above[0] if above else None


def _where(row: dict) -> str:
    return f"{row['pod']} (`{row['topology']}`)"


def _memory(row: dict) -> str:
    """Parameters + optimizer, temporaries, total of the device's memory: three table cells."""
    return (f"{row['params_gib'] + row['opt_state_gib']:.1f} GiB | {row['temp_gib']:.1f} GiB | "
            f"**{row['total_gib']:.1f}** of {row['device_gib']:.0f} GiB")


def _long_line(row: dict, mesh: str) -> str:
    """A long-row table line (before the GPU tables' compile cell)."""
    if "error" in row:
        return (f"| {row['model']}, {row['seq_len'] // 1024}K | {_where(row)} | {mesh} | error: {row['error']} "
                "| | | | | |")
    traffic = ", ".join(f"{kind} {size:.1f}" for kind, size in sorted(row["collectives_gib"].items()))
    return (f"| {row['model']}, {row['seq_len'] // 1024}K | {_where(row)} | {mesh} | {row['tokens_per_device']:,} | "
            f"{_memory(row)} | {_flops(row['matmul_flops'])} ({row['model_flops']:.2e}) | {traffic} GiB |")


def tpu_report(latest: dict) -> str:
    """The TPU tables: rows of 4,096 tokens; long rows."""
    lines = ["| model | pod (TPU topology) | mesh | tokens / device | params + optimizer | temporaries | total "
             "(of HBM) | collectives / step |", "|---|---|---|---|---|---|---|---|"]
    for row, mesh in _recorded(ENTRIES, latest, scan_note=True):
        if "error" in row:
            lines.append(f"| {row['model']} | {_where(row)} | {mesh} | — | error: {row['error']} | | | |")
            continue
        lines.append(f"| {row['model']} | {_where(row)} | {mesh} | {row['rows_per_device'] * row['seq_len']:,} | "
                     f"{_memory(row)} | {sum(row['collectives_gib'].values()):.1f} GiB |")
    long = ["| model, row | pod (TPU topology) | mesh | tokens / chip | params + optimizer | temporaries | total "
            "(of HBM) | matmul FLOPs / chip (model, one document) | collectives / chip / step |",
            "|---|---|---|---|---|---|---|---|---|"]
    long += [_long_line(row, mesh) for row, mesh in _recorded(LONG_ENTRIES, latest, scan_note=False)]
    return "\n".join(lines) + "\n\nLong rows, split over a `context` axis:\n\n" + "\n".join(long)


def _gpu_line(entry: Entry, best: dict, above: dict | None) -> str:
    """A GPU 4K table line: the most rows per GPU that fit (or the fewest tried, which did not) and the next
    rows up, with its total, that did not fit."""
    mesh = _mesh(best, scan_note=True)
    if "error" in best:
        return (f"| {entry.model} | {_where(best)} | {mesh} | {best['rows_per_device']}: error: {best['error']} "
                "| | | | | | |")
    rows = f"{best['rows_per_device']}" + ("" if _fits(best) else " (**does not fit**)")
    up = "—" if above is None else f"{above['rows_per_device']}: " + (
        f"error: {above['error']}" if "error" in above else f"{above['total_gib']:.1f} GiB")
    return (f"| {entry.model} | {_where(best)} | {mesh} | {rows} | {_memory(best)} | "
            f"{sum(best['collectives_gib'].values()):.1f} GiB | {up} | {best['compile_s']:.0f} s |")


def gpu_report(latest: dict) -> str:
    """The GPU tables (rows of 4,096 tokens: the rows search's outcome; long rows) and the compiler's versions
    and dates of the results they show."""
    found = [(entry, *search) for entry in GPU_ENTRIES if (search := _most_rows(entry, latest))]
    long = list(_recorded(GPU_LONG_ENTRIES, latest, scan_note=False))
    shown = [row for _, best, above in found for row in (best, above) if row] + [row for row, _ in long]
    versions = sorted({(row["jax"], row["cuda_plugin"]) for row in shown if "jax" in row})
    dates = sorted({row["date"] for row in shown if "date" in row})
    lines = ["XLA's GPU compiler (deviceless GPUs): "
             + "; ".join(f"jax {jax}, jax-cuda13-plugin {plugin}" for jax, plugin in versions)
             + f"; compiled {', '.join(dates)}.", "",
             "| model | GPUs (topology) | mesh | rows of 4,096 / GPU (the most of 1, 2, 4, 8 that fit) | params + "
             "optimizer | temporaries | total (of memory) | collectives / step | next rows up: total | compile |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_gpu_line(entry, best, above) for entry, best, above in found]
    table = ["| model, row | GPUs (topology) | mesh | tokens / GPU | params + optimizer | temporaries | total "
             "(of memory) | matmul FLOPs / GPU (model, one document) | collectives / GPU / step | compile |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    table += [_long_line(row, mesh) + (f" {row['compile_s']:.0f} s |" if "error" not in row else " |")
              for row, mesh in long]
    return "\n".join(lines) + "\n\nGPU long rows, split over a `context` axis:\n\n" + "\n".join(table)


def report(tpu: bool = True, gpu: bool = True) -> str:
    """The markdown tables from the newest result of every entry (and, for GPU entries, of every rows tried)."""
    latest = {}
    for line in open(RESULTS):
        row = json.loads(line)
        latest[_key(row)] = row
    return "\n\n".join([tpu_report(latest)] * tpu + [gpu_report(latest)] * gpu)


def compile_entry(index: int, scan_layers: bool = False, rows: int | None = None) -> dict:
    """Compile entry `index` (at `rows` rows per device if given) in a subprocess, append its result to the
    JSONL and return it; a failed compile is recorded with its exit status (-9: killed, host memory?)."""
    entry = prepared(index, scan_layers, rows)
    print(f"[{index + 1}/{len(ALL)}] {entry.model} at {entry.seq_len:,} tokens, {entry.rows_per_device} rows per "
          f"device, on {entry.topology} {entry.mesh} ...", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--one", str(index), *(["--scan-layers"] * scan_layers),
                           *(["--rows", str(rows)] if rows is not None else [])], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        row = {**entry_identity(entry), **({"date": time.strftime("%Y-%m-%d")} if entry.gpu else {}),
               "error": f"exit {proc.returncode}: {error}"}
    else:
        row = json.loads(lines[-1])
    print("   ", {k: row[k] for k in ("total_gib", "device_gib", "temp_gib", "compile_s", "error") if k in row},
          flush=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def search_rows(index: int, scan_layers: bool = False, start: int | None = None) -> None:
    """GPU entry `index`'s rows per GPU: compile at `start` (default: the entry's), then double while the step
    fits the GPU's memory or halve until it does, within ROWS; a failed compile ends the search."""
    rows, tried = start or ALL[index].rows_per_device, set()
    while rows in ROWS and rows not in tried:
        tried.add(rows)
        row = compile_entry(index, scan_layers, rows)
        if "error" in row:
            return
        rows = rows * 2 if _fits(row) else rows // 2


def _selected(args, index: int, entry: Entry) -> bool:
    return not ((args.only and args.only not in entry.model) or (args.seq_len and entry.seq_len != args.seq_len)
                or (args.long and entry not in LONG_ENTRIES + GPU_LONG_ENTRIES)
                or (args.gpu and not entry.gpu) or (args.tpu and entry.gpu)
                or (args.entries and str(index + 1) not in args.entries.split(",")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="entries whose model name contains this")
    parser.add_argument("--seq-len", type=int, default=None, help="entries with rows of this many tokens")
    parser.add_argument("--long", action="store_true", help="only the long-row entries")
    parser.add_argument("--gpu", action="store_true", help="only the GPU entries (XLA's GPU compiler)")
    parser.add_argument("--tpu", action="store_true", help="only the TPU entries (the TPU compiler, libtpu)")
    parser.add_argument("--entries", default=None, help="comma-separated entry numbers (as printed, from 1)")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows per GPU to start the GPU entries' rows search at (one of 1, 2, 4, 8)")
    parser.add_argument("--report", action="store_true", help="print the markdown tables from the results "
                        "(with --gpu or --tpu: only those)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="compile the entries with scan_layers: true (the unrolled h-tiny step with the "
                             "Pallas kernels ran out of a 24 GB host's memory compiling)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one entry, JSON out
    args = parser.parse_args()
    from granite_jax.runtime import configure_process

    configure_process()  # our XLA defaults, before the first JAX computation
    if args.report:
        print(report(tpu=not args.gpu, gpu=not args.tpu))
        return
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.scan_layers, args.rows)))
        return
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    for index, entry in enumerate(ALL):
        if not _selected(args, index, entry):
            continue
        if entry in GPU_ENTRIES:
            search_rows(index, args.scan_layers, args.rows)
        else:
            compile_entry(index, args.scan_layers)
    print(report(tpu=not args.gpu, gpu=not args.tpu))


if __name__ == "__main__":
    main()
