"""Devices of a pod that is not here: TPU and GPU topologies compiled for ahead of time from any host.

`jax.experimental.topologies` describes devices without their hardware; a mesh of them lets
`jax.jit(...).lower(...).compile()` run the target's real compiler on a CPU machine, so the dry run reports
the target's own memory figures (native bf16, its fusions and kernels) rather than XLA:CPU's.

- TPU slices (`v5p:4x4x4` = 64 v5p chips = "v5p-128"): need `libtpu` (the version jax pins:
  `pip install "libtpu==<jax's pin>"`, or `pip install "jax[tpu]"`).
- NVIDIA GPUs (`h100:8` = one host of 8, `h100:8x8` = 8 hosts of 8; `h200`): need the CUDA plugin of jaxlib's
  version (`pip install "jax-cuda13-plugin==<jaxlib>" "jax-cuda13-pjrt==<jaxlib>"`), no GPU and no CUDA
  driver. The GPU is described by a `GpuTargetConfigProto` (`gpu_targets/NAME.txtpb`). Without a device
  XLA does not autotune, so its kernel choices can differ from a real GPU's; memory and "does it compile"
  are the compiler's own.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from pathlib import Path

from granite_jax.runtime import cuda_plugin_installed

GiB = 2**30
# High-bandwidth memory per device (one JAX device per chip on these generations), for "does it fit".
HBM_BYTES = {"TPU v4": 32 * GiB, "TPU v5": 95 * GiB, "TPU v5 lite": 16 * GiB, "TPU v6 lite": 32 * GiB}


GPU_TARGETS = Path(__file__).parent / "gpu_targets"


class TopologyError(RuntimeError):
    """A topology that cannot be described here (no libtpu or CUDA plugin, or a name they do not know)."""


def gpu_names() -> list[str]:
    """The GPUs `--topology NAME:...` can describe (one target description each)."""
    return sorted(path.stem for path in GPU_TARGETS.glob("*.txtpb"))


def gpu_target(name: str) -> str:
    """The `GpuTargetConfigProto` text of GPU `name` (e.g. "h100")."""
    path = GPU_TARGETS / f"{name}.txtpb"
    if not path.is_file():
        raise TopologyError(f"no GPU named {name!r}; known: {', '.join(gpu_names())}")
    return path.read_text()


@functools.cache
def _gpu_memory() -> dict[str, int]:
    """Device memory in bytes of each described GPU, by its device kind (the description string)."""
    memory = {}
    for name in gpu_names():
        text = gpu_target(name)
        kind = re.search(r'device_description_str:\s*"([^"]+)"', text).group(1)
        memory[kind] = int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))
    return memory


def _cuda_plugin_pin() -> str:
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        version = "<jaxlib's version>"
    return f'"jax-cuda13-plugin=={version}" "jax-cuda13-pjrt=={version}"'


def gpu_topology_devices(name: str) -> list:
    """The devices of GPU topology `name`, GPU:GPUS_PER_HOST[xHOSTS], e.g. "h100:8" (8 GPUs on one host) or
    "h100:8x8" (8 hosts of 8), without the hardware."""
    gpu, _, shape = name.partition(":")
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", shape)
    if not match or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
        raise TopologyError(f"--topology {name!r}: expected GPU:GPUS_PER_HOST or GPU:GPUS_PER_HOSTxHOSTS, "
                            f"e.g. {gpu or 'h100'}:8 or {gpu or 'h100'}:8x8")
    target = gpu_target(gpu.lower())
    per_host, hosts = int(match.group(1)), int(match.group(2) or 1)
    if not cuda_plugin_installed():
        raise TopologyError(f"--topology {name} compiles with the GPU compiler, which needs the CUDA plugin "
                            f"(no GPU needed): pip install {_cuda_plugin_pin()}")
    from jax.experimental import topologies

    try:
        # "partitions x hosts per partition x devices per host"
        return list(topologies.get_topology_desc(platform="cuda", target_config=target,
                                                 topology=f"1x{hosts}x{per_host}").devices)
    except Exception as e:  # the plugin's own error (e.g. a target description it cannot parse)
        raise TopologyError(f"--topology {name!r}: the CUDA plugin cannot describe it "
                            f"({str(e).splitlines()[0]})") from None


def topology_devices(name: str) -> list:
    """The devices of TPU or GPU topology `name`: a known GPU's name before the colon means GPUs, a TPU
    generation (v4, v5e, v5p, v6e, ...) a TPU slice."""
    kind = name.partition(":")[0].lower()
    if kind in gpu_names():
        return gpu_topology_devices(name)
    if re.fullmatch(r"v\d+\w*", kind):
        return tpu_topology_devices(name)
    raise TopologyError(f"--topology {name!r}: unknown device {kind!r}; expected a TPU slice as "
                        f"GENERATION:SHAPE (e.g. v5p:4x4x4, v5e:8x8) or GPUs as GPU:GPUS_PER_HOST[xHOSTS] with GPU "
                        f"one of {', '.join(gpu_names())} (e.g. h100:8, h100:8x8)")


def _libtpu_pin() -> str:
    try:
        pins = [r for r in importlib.metadata.requires("jax") or [] if r.startswith("libtpu") and "tpu" in r]
        return pins[0].split(";")[0].replace(" ", "") if pins else "libtpu"
    except importlib.metadata.PackageNotFoundError:
        return "libtpu"


def tpu_topology_devices(name: str) -> list:
    """The devices of TPU topology `name` (e.g. "v5p:4x4x4", "v5e:8x8", "v6e:16x16"), without the hardware."""
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TopologyError(f"--topology {name} compiles with the TPU compiler, which needs libtpu: "
                            f"pip install '{_libtpu_pin()}' (the version this jax pins)") from None
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # libtpu's own error for an unknown name, shape or generation
        raise TopologyError(f"--topology {name!r}: libtpu cannot describe it ({str(e).splitlines()[0]}); "
                            "expected GENERATION:SHAPE, e.g. v5p:4x4x4, v5e:8x8, v6e:16x16, or a GPU "
                            f"({', '.join(gpu_names())}) as h100:8") from None


def device_memory(device) -> int | None:
    """Bytes of memory of one device, where the device reports it (real accelerators) or its kind is known
    (TPU generations, described GPUs); None for CPU devices."""
    try:
        stats = device.memory_stats()
        if stats and stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:  # deviceless topologies and CPU devices have no memory_stats
        pass
    kind = getattr(device, "device_kind", "")
    return HBM_BYTES.get(kind, _gpu_memory().get(kind))
