"""Devices of a pod that is not here: TPU topologies compiled for ahead of time from any host.

With `libtpu` installed (the version jax pins: `pip install "libtpu==<jax's pin>"`, or `pip install
"jax[tpu]"`), `jax.experimental.topologies` describes a TPU slice (`v5p:4x4x4` = 64 v5p chips = "v5p-128")
without its hardware; a mesh of those devices lets `jax.jit(...).lower(...).compile()` run the real TPU
compiler on a CPU machine, so the dry run reports the TPU's own memory figures (native bf16, TPU fusion)
rather than XLA:CPU's. GPUs have no such deviceless path: for them the dry run simulates the mesh on
virtual CPU devices (`--simulate-devices`), an estimate.
"""

from __future__ import annotations

import importlib.metadata

GiB = 2**30
# High-bandwidth memory per device (one JAX device per chip on these generations), for "does it fit".
HBM_BYTES = {"TPU v4": 32 * GiB, "TPU v5": 95 * GiB, "TPU v5 lite": 16 * GiB, "TPU v6 lite": 32 * GiB}


class TopologyError(RuntimeError):
    """A topology that cannot be described here (no libtpu, or a name libtpu does not know)."""


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
                            "expected GENERATION:SHAPE, e.g. v5p:4x4x4, v5e:8x8, v6e:16x16") from None


def device_memory(device) -> int | None:
    """Bytes of memory of one device, where the device reports it (real accelerators) or its kind is known
    (TPU generations); None for CPU devices."""
    try:
        stats = device.memory_stats()
        if stats and stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:  # deviceless topologies and CPU devices have no memory_stats
        pass
    return HBM_BYTES.get(getattr(device, "device_kind", ""))
