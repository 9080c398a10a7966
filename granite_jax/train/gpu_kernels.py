"""The Pallas Triton kernels of a program compiled for NVIDIA GPUs: registers, spills and shared memory.

A kernel that needs more registers per thread than the GPU gives (255 on sm_90) keeps the rest in local memory
("spills": stores and loads through the cache hierarchy, per thread and per loop iteration); one that asks for
more shared memory per block than the opt-in limit (232,448 bytes on an H100) does not launch. Neither shows in
a compile that succeeds, so this module reads them from what XLA's GPU compiler writes when asked to dump
(`xla_dump_to`): each kernel's PTX, which `ptxas` (from `nvidia-cuda-nvcc`) assembles for the target and reports
on (`ptxas -v`), the launch's dynamic shared memory (the thunk sequence) and the target's limit (its target
description). It works without a GPU, on programs compiled for a deviceless topology
(`granite_jax/parallel/topology.py`). Used by `train.py --dry-run --topology h100:8` when the step holds Pallas
Triton kernels (`ssd_impl: pallas`, `attention_impl: pallas_gpu`), by tests/test_gpu_kernels.py and by
benchmarks/gpu_kernels.py.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sysconfig

_TRITON_CALL = re.compile(r'custom_call_target="__gpu\$xla\.gpu\.triton".*?\bname = "([\w.\-]+)"')
_LAUNCH = re.compile(r"\s(\S+) grid: \[[\d, ]+\] threads: \[(\d+), (\d+), (\d+)\]\s+shared_memory: (\d+) bytes")
_ENTRY = re.compile(r"^\.(?:visible\s+)?\.entry\s+([\w.\-$]+)", re.MULTILINE)


class KernelReportError(RuntimeError):
    """The kernels could not be read (ptxas missing, nothing dumped): one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """One kernel as compiled: per thread, its registers, the bytes it spills to local memory and its stack
    frame; per block, its threads and dynamic shared memory, against the target's opt-in limit."""

    name: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    threads: int
    shared_memory_bytes: int
    shared_memory_limit: int

    @property
    def within_limits(self) -> bool:
        return (self.spill_store_bytes == 0 and self.spill_load_bytes == 0
                and self.shared_memory_bytes <= self.shared_memory_limit)

    def render(self) -> str:
        return (f"{self.name}: {self.registers} registers, {self.spill_store_bytes} B spilled per thread, "
                f"{self.shared_memory_bytes:,} B shared memory (limit {self.shared_memory_limit:,}), "
                f"{self.threads} threads")


def ptxas() -> str:
    """The path of `ptxas`: nvidia-cuda-nvcc's (pip), else one on PATH."""
    for candidate in glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu*", "bin", "ptxas")):
        return candidate
    if found := shutil.which("ptxas"):
        return found
    raise KernelReportError("reading the GPU kernels' registers and spills needs ptxas (no GPU needed): "
                            "pip install nvidia-cuda-nvcc")


def _one_file(dump_dir: str, pattern: str) -> str:
    found = sorted(glob.glob(os.path.join(dump_dir, pattern)))
    if not found:
        raise KernelReportError(f"no {pattern} in {dump_dir}: was the program compiled for a GPU with "
                                "compiler_options=compile_options(dump_dir)?")
    return found[-1]


def compile_options(dump_dir: str) -> dict:
    """`Lowered.compile(compiler_options=...)` that make XLA's GPU compiler write what `triton_kernels` reads
    (with the rest of its dump: HLO and LLVM IR, tens of MB for a model's step; use a temporary directory)."""
    return {"xla_dump_to": dump_dir}


def _assemble(ptx_file: str, arch: str) -> dict[str, dict[str, int]]:
    """ptxas -v of one PTX file for `arch`: kernel name -> registers, spill stores/loads, stack frame."""
    done = subprocess.run([ptxas(), "-v", f"--gpu-name={arch}", ptx_file, "-o", os.devnull],
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise KernelReportError(f"ptxas failed on {ptx_file}: {done.stderr.strip().splitlines()[-1:]}")
    kernels, current = {}, None
    for line in done.stderr.splitlines():
        if match := re.search(r"Compiling entry function '([^']+)'", line):
            current = kernels.setdefault(match.group(1), {})
        elif current is not None:
            for key, pattern in (("stack", r"(\d+) bytes stack frame"), ("stores", r"(\d+) bytes spill stores"),
                                 ("loads", r"(\d+) bytes spill loads"), ("registers", r"Used (\d+) registers")):
                if match := re.search(pattern, line):
                    current[key] = int(match.group(1))
    return kernels


def triton_kernels(dump_dir: str, hlo_text: str) -> list[KernelResources]:
    """The Pallas Triton kernels of a GPU program (`hlo_text`: its `Compiled.as_text()`) compiled with
    `compile_options(dump_dir)`, each once, in the program's order."""
    names = list(dict.fromkeys(_TRITON_CALL.findall(hlo_text)))
    if not names:
        return []
    target = open(_one_file(dump_dir, "*gpu_target_config.pbtxt")).read()
    limit = int(re.search(r"shared_memory_per_block_optin: (\d+)", target).group(1))
    capability = re.search(r"cuda_compute_capability \{\s*major: (\d+)(?:\s*minor: (\d+))?", target)
    arch = f"sm_{capability.group(1)}{capability.group(2) or 0}" + ("a" if capability.group(1) == "9" else "")
    launches = {}
    for line in open(_one_file(dump_dir, "*thunk_sequence_after_thunk_passes.txt")):
        if match := _LAUNCH.search(line):
            threads = int(match.group(2)) * int(match.group(3)) * int(match.group(4))
            launches.setdefault(match.group(1), (threads, int(match.group(5))))
    assembled = {}
    for ptx_file in glob.glob(os.path.join(dump_dir, "*.ptx")):
        if set(_ENTRY.findall(open(ptx_file).read())) & set(names):
            assembled.update(_assemble(ptx_file, arch))
    missing = [name for name in names if name not in assembled or name not in launches]
    if missing:
        raise KernelReportError(f"kernels {missing} were compiled but their PTX or launch was not found in "
                                f"{dump_dir}")
    return [KernelResources(name, assembled[name].get("registers", 0), assembled[name].get("stores", 0),
                            assembled[name].get("loads", 0), assembled[name].get("stack", 0), *launches[name],
                            limit) for name in names]
