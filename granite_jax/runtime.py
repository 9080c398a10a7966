"""Process-wide XLA settings that must be in place before JAX initialises its backends.

A program sets them at its start with `configure_process()` (train.py, eval.py, `python -m granite_jax.convert`,
the benchmarks, the test harness), before its first JAX computation; importing granite_jax changes no environment
variable, so a program that imports it as a library keeps the settings it chose.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

# XLA:CPU's default scheduler optimises for concurrency: it starts rematerialised forward computations as
# early as possible, so activation checkpointing saves no memory and peak memory is the sum over layers
# (measured on the benchmark model at 2K tokens: 1.88 GiB of temporaries with remat, 0.35 GiB with this
# scheduler off, and the step is faster too). Affects only the CPU backend.
#
# Virtual CPU devices (`--xla_force_host_platform_device_count`) share the machine's cores, so one device's thread
# can reach a collective minutes after the others; XLA:CPU's default then aborts the process after 40 s
# ("Termination timeout for `all gather RendezvousKey...`") and warns after 20 s. Measured: the 512K config's
# step at 128K tokens on 8 devices and 2 cores aborted so; with these waits it completes. They bound only the
# rendezvous between one process's own devices (a lost peer process is the distributed service's business).
_CPU_FLAGS = {
    "xla_cpu_enable_concurrency_optimized_scheduler": "false",
    "xla_cpu_collective_call_terminate_timeout_seconds": "1800",
    "xla_cpu_collective_call_warn_stuck_timeout_seconds": "600",
}

# With several virtual devices, XLA:CPU's YNNPACK dot fusions cost each device scratch memory outside the
# compiled program's buffers, and their threads contend for the cores: the 512K config (8 devices, 2 cores)
# peaked at 16.1 GB resident with them and 11.7 GB without, and its step ran at 1,139 vs 1,349 tokens/s
# (benchmarks/RESULTS.md, "512K on one host"). On one device they are faster (the default run: 2,435 vs
# 2,226 tokens/s), so they stay on there.
_VIRTUAL_DEVICES_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _virtual_device_count(flags: str) -> int:
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    return int(match.group(1)) if match else 1


def configure_xla_flags() -> None:
    """Add our CPU defaults to XLA_FLAGS unless the user set those flags. No effect once JAX has a backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    defaults = dict(_CPU_FLAGS)
    if _virtual_device_count(flags) > 1:
        defaults.update(_VIRTUAL_DEVICES_FLAGS)
    extra = [f"--{name}={value}" for name, value in defaults.items() if name not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()



# The CUDA plugin (installed for the GPU compiler's dry runs: parallel/topology.py) initialises when JAX starts
# and, on a machine without an NVIDIA driver, prints a "Jax plugin configuration error" traceback before
# falling back to the CPU. Where the plugin is installed and there is no driver, JAX is told to use the CPU,
# which the deviceless GPU topologies work with.
_NVIDIA_DRIVER = Path("/dev/nvidiactl")


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (jax-cuda13-plugin) is installed: found without importing it."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
    except ModuleNotFoundError:
        return False


def use_cpu_without_gpu_driver() -> None:
    """JAX_PLATFORMS=cpu when the CUDA plugin is installed, no NVIDIA driver is present and the user chose no
    platform; JAX's config follows JAX_PLATFORMS if jax was imported before it was set. No effect once JAX has a
    backend."""
    if "JAX_PLATFORMS" not in os.environ and not _NVIDIA_DRIVER.exists() and cuda_plugin_installed():
        os.environ["JAX_PLATFORMS"] = "cpu"
    # JAX reads JAX_PLATFORMS when it is imported: a program that imported it before it chose (train.py imports
    # granite_jax, hence jax, before `--topology` sets JAX_PLATFORMS=cpu) tells JAX's config too.
    if "JAX_PLATFORMS" in os.environ and "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def configure_process() -> None:
    """The settings of a granite_jax program: our CPU defaults in XLA_FLAGS (`configure_xla_flags`) and the CPU
    platform where the CUDA plugin is installed without a driver (`use_cpu_without_gpu_driver`). Call it before
    the program's first JAX computation (importing jax first is fine: JAX reads them when its backends start)."""
    configure_xla_flags()
    use_cpu_without_gpu_driver()
