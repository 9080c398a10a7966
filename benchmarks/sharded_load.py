"""Bytes read and host memory per process when 2 processes load an HF checkpoint onto one mesh:
sharded (`load_hf_checkpoint(shardings=...)`: each process reads only the slices its devices hold) vs today's
unsharded load (every process reads every full tensor, then `jax.device_put` places them on the mesh).

A random bfloat16 HF checkpoint of a released config (default granite-4.0-h-1b) is written once, cached under
--workdir, by our own writer (`save_hf_checkpoint`) one safetensors shard at a time: its parameters are
stand-ins that make their random values only when the writer asks for them. Then, per mode, 2 local processes
× 4 virtual CPU devices join over localhost (`jax.distributed`, as tests/multidevice/sharded_hf_load_processes.py)
and load it, parameters in bfloat16, onto an fsdp=8 mesh spanning both (`initial_shardings`, rules "fsdp").
Each process reports the bytes it read, its RSS just before loading, its peak RSS (ru_maxrss) and the load's
wall time. The peak RSS includes the pages of the memory-mapped safetensors files that the process touched, so
the peaks of its anonymous memory (its own arrays) and of those file pages are sampled too (every 10 ms). A
mode whose processes together hold more anonymous memory than --max-memory-gib is stopped and reported so.

    python benchmarks/sharded_load.py                                   # h-1b: 1.46B parameters, 2.92 GB
    python benchmarks/sharded_load.py --preset granite-4.0-h-350m       # 340M parameters: a quick check

Prints a table; appends one JSON line per (mode, process) to benchmarks/results/sharded_load.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from granite_jax import GraniteForCausalLM, load_hf_checkpoint, load_preset, save_hf_checkpoint  # noqa: E402
from granite_jax.formats.hf import ReadStats, safetensors_files  # noqa: E402
from granite_jax.parallel.distributed import free_local_port, initialize  # noqa: E402
from granite_jax.parallel.mesh import make_mesh  # noqa: E402
from granite_jax.train.config import RunConfig  # noqa: E402
from granite_jax.train.setup import initial_shardings, resolve_model_config  # noqa: E402
from tests.multidevice import report  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "sharded_load.jsonl")
MODES = ("sharded", "unsharded")
PROCESSES, DEVICES_PER_PROCESS = 2, 4
GIB = 2**30


class RandomTensor:
    """A parameter's stand-in for the writer: random bfloat16 values of its shape, made when the writer reads it
    (`np.asarray(variable[...])`), so the whole checkpoint is never in memory at once."""

    dtype = np.dtype(ml_dtypes.bfloat16)

    def __init__(self, shape, seed: int):
        self.shape, self.seed = tuple(shape), seed

    def __getitem__(self, index):
        return self

    def __array__(self, dtype=None, copy=None):
        values = np.random.default_rng(self.seed).standard_normal(self.shape, np.float32) * 0.02
        return values.astype(dtype or self.dtype)


def build_checkpoint(preset: str, directory: str) -> None:
    """A random bfloat16 HF checkpoint of `preset` in `directory`, unless one is there already."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return
    start = time.perf_counter()
    model = nnx.eval_shape(lambda: GraniteForCausalLM(load_preset(preset, param_dtype="bfloat16"),
                                                      rngs=nnx.Rngs(0)))
    for seed, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        variable.set_value(RandomTensor(variable.shape, seed))
    partial = directory + ".partial"
    save_hf_checkpoint(model, partial, dtype="bfloat16", max_shard_size="1GB")  # config.json is written last
    os.replace(partial, directory)
    print(f"wrote {directory} in {time.perf_counter() - start:.0f} s", flush=True)


def checkpoint_facts(directory: str) -> dict:
    """The bytes of its tensors (from the safetensors headers: 8-byte length, JSON with each tensor's offsets)
    and of its files."""
    tensor_bytes = 0
    for file in safetensors_files(directory):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        tensor_bytes += sum(end - start for start, end in (t["data_offsets"] for t in header.values()))
    files = [os.path.join(directory, n) for n in os.listdir(directory)]
    return {"checkpoint_tensor_bytes": tensor_bytes, "checkpoint_file_bytes": sum(map(os.path.getsize, files))}


def memory(pid="self") -> dict:
    """A process's resident memory now, in bytes: all, anonymous (its own arrays) and mapped file pages."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {name: int(fields.get(name, "0").split()[0]) * 1024 for name in ("VmRSS", "RssAnon", "RssFile")}


class PeakSampler(threading.Thread):
    """Samples `memory()` every 10 ms until stopped; `peak` holds each field's highest value."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = memory(), threading.Event()

    def run(self):
        while not self.stop.wait(0.01):
            self.peak = {k: max(v, self.peak[k]) for k, v in memory().items()}


def worker(directory: str, mode: str, coordinator: str, process: int) -> None:
    """One of the processes: load `directory` onto the fsdp=8 mesh in `mode`; report what it cost."""
    initialize(coordinator, PROCESSES, process)
    config = RunConfig(init_from=f"hf:{directory}", mesh={"fsdp": PROCESSES * DEVICES_PER_PROCESS},
                       sharding_rules="fsdp", model_overrides={"param_dtype": "bfloat16"})
    shardings = initial_shardings(config, resolve_model_config(config), make_mesh(config.mesh))
    before, sampler = memory(), PeakSampler()
    sampler.start()
    start = time.perf_counter()
    if mode == "sharded":
        stats = ReadStats()
        params = nnx.state(load_hf_checkpoint(directory, param_dtype="bfloat16", shardings=shardings,
                                              stats=stats), nnx.Param)
        bytes_read, read_s, read_anon = stats.bytes_read, time.perf_counter() - start, memory()["RssAnon"]
    else:
        params = nnx.state(load_hf_checkpoint(directory, param_dtype="bfloat16"), nnx.Param)
        bytes_read = sum(x.nbytes for x in jax.tree.leaves(params))  # every tensor whole, bfloat16 as on disk
        read_s, read_anon = time.perf_counter() - start, memory()["RssAnon"]
        params = jax.device_put(params, shardings)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    report({"mode": mode, "process": process, "bytes_read": bytes_read, "rss_before_bytes": before["VmRSS"],
            "peak_rss_bytes": peak, "load_rss_increment_bytes": peak - before["VmRSS"],
            "anon_increment_after_read_bytes": read_anon - before["RssAnon"],
            "peak_anon_increment_bytes": sampler.peak["RssAnon"] - before["RssAnon"],
            "peak_file_pages_bytes": sampler.peak["RssFile"] - before["RssFile"],
            "read_s": round(read_s, 2), "load_s": round(seconds, 2)})


def launch(directory: str, mode: str, limit: float) -> list[dict]:
    """Run `mode`'s 2 processes × 4 CPU devices: their reports, or, when their anonymous memory together passes
    `limit` bytes, stop them and say when (one row; this machine is shared)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
           "JAX_PLATFORMS": "cpu"}
    coordinator, start = f"127.0.0.1:{free_local_port()}", time.perf_counter()
    logs = [tempfile.TemporaryFile("w+") for _ in range(PROCESSES)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps([directory, mode, coordinator, i])],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
             for i, log in enumerate(logs)]
    while any(p.poll() is None for p in procs):
        anon = sum(memory(p.pid)["RssAnon"] for p in procs if p.poll() is None)
        if anon > limit:
            for p in procs:
                p.kill()
                p.wait()
            return [{"mode": mode, "stopped_after_s": round(time.perf_counter() - start, 1), "anon_bytes": anon}]
        time.sleep(0.05)
    outputs = []
    for p, log in zip(procs, logs):
        log.seek(0)
        outputs.append(log.read())
        if p.returncode != 0:
            raise RuntimeError(f"{mode} process failed (exit {p.returncode}):\n{outputs[-1][-3000:]}")
    return [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out in outputs]


def table_row(row: dict, total: int) -> str:
    if "stopped_after_s" in row:
        return (f"| {row['mode']} | both | stopped after {row['stopped_after_s']} s: {row['anon_bytes'] / GIB:.2f} GiB "
                "of anonymous memory together, over --max-memory-gib |")
    gib = {k: f"{v / GIB:.2f} GiB" for k, v in row.items() if "bytes" in k}
    return (f"| {row['mode']} | {row['process']} | {gib['bytes_read']} | {row['bytes_read'] / total:.3f} | "
            f"{gib['rss_before_bytes']} | {gib['peak_rss_bytes']} | {gib['load_rss_increment_bytes']} | "
            f"{gib['peak_anon_increment_bytes']} | {gib['anon_increment_after_read_bytes']} | "
            f"{gib['peak_file_pages_bytes']} | {row['read_s']} | {row['load_s']} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="granite-4.0-h-1b")
    parser.add_argument("--workdir", default="/tmp/granite_sharded_load")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--max-memory-gib", type=float, default=9.0,
                        help="stop a mode whose 2 processes hold more anonymous memory than this together")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # [directory, mode, coordinator, process]
    args = parser.parse_args()
    from granite_jax.runtime import configure_process

    configure_process()  # our XLA defaults, before the first JAX computation
    if args.worker:
        return worker(*json.loads(args.worker))

    directory = os.path.join(args.workdir, args.preset)
    build_checkpoint(args.preset, directory)
    config = load_preset(args.preset)
    abstract = nnx.eval_shape(lambda: GraniteForCausalLM(config, rngs=nnx.Rngs(0)))
    parameters = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    facts = {"preset": args.preset, "parameters": int(parameters), **checkpoint_facts(directory)}
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB, "
               f"{PROCESSES} processes x {DEVICES_PER_PROCESS} CPU devices (fsdp=8), jax {jax.__version__}")
    rows = [row for mode in args.modes for row in launch(directory, mode, args.max_memory_gib * GIB)]

    total = facts["checkpoint_tensor_bytes"]
    print(f"\n{args.preset}: {parameters:,} parameters, {total / GIB:.2f} GiB of bfloat16 tensors; {machine}")
    print("| mode | process | bytes read | of checkpoint | RSS before | peak RSS | load's RSS increment | "
          "of which anonymous (peak) | anonymous after reading | mapped file pages (peak) | read s | load s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    date = time.strftime("%Y-%m-%d")
    with open(RESULTS, "a") as f:
        for row in rows:
            print(table_row(row, total))
            f.write(json.dumps({**row, **facts, "date": date, "machine": machine}) + "\n")


if __name__ == "__main__":
    main()
