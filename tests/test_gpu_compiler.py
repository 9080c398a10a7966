"""NVIDIA GPUs without a GPU: the CUDA plugin's deviceless topologies (granite_jax/parallel/topology.py), the dry
run compiled by XLA's GPU compiler, and CPU runs untouched by the plugin's presence."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_RUN, train_cli

from granite_jax.parallel.topology import (
    TopologyError,
    device_memory,
    gpu_names,
    gpu_target,
    gpu_topology_devices,
    topology_devices,
)


@pytest.mark.parametrize("name", gpu_names())
def test_each_gpu_description_gives_deviceless_gpus(name):
    """Every target description the project ships parses with the pinned jaxlib's CUDA plugin: 8 GPUs on one
    host and 2 hosts of 4, reporting the described name and memory."""
    text = gpu_target(name)
    kind = text.split('device_description_str: "')[1].split('"')[0]
    for topology in (f"{name}:8", f"{name}:4x2"):
        devices = gpu_topology_devices(topology)
        assert len(devices) == 8 and {d.platform for d in devices} == {"gpu"}, devices
        assert {d.device_kind for d in devices} == {kind}
    assert device_memory(devices[0]) == int(text.split("device_memory_size: ")[1].split()[0])
    assert sorted(gpu_names()) == ["h100", "h200"]


def test_the_dry_run_on_h100s_is_the_gpu_compilers():
    """`train.py --dry-run --topology h100:8` (the tiny run on fsdp 8, one attention layer: the Pallas SSD
    kernels' GPU compile is test_gpu_kernels'): the first line names 8 H100s and the GPU compiler, the memory is
    checked against the H100's 79 GiB, and the FLOPs come from the HLO (XLA's cost analysis is not offered
    without a device)."""
    ran = train_cli("--dry-run", "--topology", "h100:8", *TINY_RUN, "data.batch_size=8", "mesh={fsdp: 8}",
                    "model_overrides={num_hidden_layers: 1, layer_types: [attention]}").ok()
    first = ran.stdout.splitlines()[0]
    assert "= 8 devices (NVIDIA H100 80GB HBM3, deviceless topology: the GPU compiler's figures)" in first, first
    assert "(fits in 79 GiB per device)" in ran.stdout
    assert "XLA cost analysis not offered for this target" in ran.stdout
    assert "in matmuls, loop iterations counted" in ran.stdout


@pytest.mark.parametrize("topology, message", [
    ("h999:8", "unknown device 'h999'; expected a TPU slice as GENERATION:SHAPE"),
    ("h100:eight", "expected GPU:GPUS_PER_HOST or GPU:GPUS_PER_HOSTxHOSTS, e.g. h100:8 or h100:8x8"),
    ("h100:0", "expected GPU:GPUS_PER_HOST"),
])
def test_a_topology_that_cannot_be_described_is_one_error_line(topology, message):
    assert message in train_cli("--dry-run", "--topology", topology, *TINY_RUN).error_line()


def test_a_missing_cuda_plugin_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_plugins.xla_cuda13", None)  # import fails as if not installed
    with pytest.raises(TopologyError, match=r'needs the CUDA plugin \(no GPU needed\): pip install '
                                            r'"jax-cuda13-plugin==[\d.]+" "jax-cuda13-pjrt==[\d.]+"'):
        topology_devices("h100:8")


def test_cpu_programs_ignore_the_installed_cuda_plugin():
    """With the CUDA plugin installed (the test requirements install it) and no NVIDIA driver, a program's
    `configure_process()` (train.py, eval.py and the converter call it at their start) leaves JAX on the CPU
    without the plugin's configuration-error traceback, whether jax was imported first or not, and when the
    program set JAX_PLATFORMS after importing jax (train.py --topology)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    configure = "from granite_jax.runtime import configure_process; configure_process(); "
    backend = "print(jax.default_backend())"
    for script in (configure + "import jax; " + backend, "import jax; " + configure + backend,
                   "import jax, os; os.environ['JAX_PLATFORMS'] = 'cpu'; " + configure + backend):
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and done.stdout.split() == ["cpu"], done.stderr
        assert "plugin configuration error" not in done.stderr, done.stderr


def test_the_moe_default_on_gpus_is_not_dense_over_the_experts():
    """`moe_impl: auto` is the Pallas Triton grouped matmul for GPUs: XLA's GPU compiler lowers `ragged_dot` into
    one dense matmul over every expert (64x the routed FLOPs at granite-4.0-h-tiny's 64 experts). The kernels
    compiled for H100s: tests/test_gpu_kernels.py."""
    from granite_jax.model.moe import _resolve_impl

    assert _resolve_impl("auto", "gpu") == "pallas_gpu"
    assert _resolve_impl("auto", "cpu") == "tiled"
    assert _resolve_impl("auto", "tpu") == "megablox"
