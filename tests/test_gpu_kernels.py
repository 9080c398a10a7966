"""Every Pallas Triton kernel option compiled by XLA's GPU compiler for 8 deviceless H100s (sm_90), forward and
backward, over packed rows, at Granite 4.0's head shapes: `ssd_impl: pallas` (Mamba heads of 64 channels, state
128) and `attention_impl: pallas_gpu` (heads of 128 and, granite-4.0-h-micro's, 64). Each kernel's registers and
spills (ptxas -v on the PTX the compiler wrote) and its shared memory against the H100's opt-in limit: none may
spill or exceed it. (Before the SSD kernels split a head's channels into blocks of 16 and chunked by 16 tokens,
the backward spilled 3,084 bytes per thread; JAX's attention forward at 4 warps spilled 72 with heads of 64.)"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from granite_jax.model.pallas_attention import pallas_attention
from granite_jax.model.pallas_ssd import ssd_pallas_on_mesh
from granite_jax.parallel.mesh import make_mesh
from granite_jax.parallel.plan import ShardingPlan
from granite_jax.parallel.topology import gpu_topology_devices
from granite_jax.train.gpu_kernels import KernelReportError, compile_options, ptxas, triton_kernels

ROWS, T = 8, 512  # one packed row per GPU
MAMBA_HEADS, CHANNELS, STATE = 8, 64, 128
QUERY_HEADS, KV_HEADS = 8, 2


def _compiled_kernels(tmp_path, loss, shapes):
    """Compile loss's gradient (forward and backward) for 8 H100s, rows split over `fsdp`; its Triton kernels."""
    mesh = make_mesh({"fsdp": 8}, gpu_topology_devices("h100:8"))
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("fsdp") if len(shape) > 1 else P()))
            for shape, dtype in shapes]
    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=tuple(range(len(args) - 1)))).lower(*args)
        compiled = lowered.compile(compiler_options=compile_options(str(tmp_path)))
    return {kernel.name: kernel for kernel in triton_kernels(str(tmp_path), compiled.as_text())}


def _within_limits(kernels: dict):
    for kernel in kernels.values():
        assert kernel.registers <= 255 and kernel.within_limits, kernel.render()
        assert kernel.stack_bytes == 0, kernel.render()  # no local memory at all


def test_the_ssd_kernels_fit_the_h100(tmp_path):
    plan = ShardingPlan()

    def loss(x, dt, A, B, C, segment_ids):
        y, final = ssd_pallas_on_mesh(x, dt, A, B, C, plan=plan, segment_ids=segment_ids)
        return jnp.sum(y) + jnp.sum(final)

    bf16, f32 = jnp.bfloat16, jnp.float32
    kernels = _compiled_kernels(tmp_path, loss, [
        ((ROWS, T, MAMBA_HEADS, CHANNELS), bf16), ((ROWS, T, MAMBA_HEADS), f32), ((MAMBA_HEADS,), f32),
        ((ROWS, T, 1, STATE), bf16), ((ROWS, T, 1, STATE), bf16), ((ROWS, T), jnp.int32)])
    assert sorted(kernels) == ["ssd_backward", "ssd_forward"]
    _within_limits(kernels)


@pytest.mark.parametrize("head_dim", [128, 64])
def test_the_attention_kernels_fit_the_h100(tmp_path, head_dim):
    def loss(q, k, v, runs):
        return jnp.sum(pallas_attention(q, k, v, runs, impl="pallas_gpu", scale=head_dim**-0.5, plan=ShardingPlan())
                       .astype(jnp.float32))

    bf16 = jnp.bfloat16
    kernels = _compiled_kernels(tmp_path, loss, [
        ((ROWS, T, QUERY_HEADS, head_dim), bf16), ((ROWS, T, KV_HEADS, head_dim), bf16),
        ((ROWS, T, KV_HEADS, head_dim), bf16), ((ROWS, T), jnp.int32)])
    assert sorted(kernels) == ["mha_backward", "mha_forward", "mha_preprocess_backward"]
    _within_limits(kernels)
    assert kernels["mha_forward"].shared_memory_bytes > 48 * 1024  # above the default: the opt-in limit applies


def test_a_missing_ptxas_says_what_to_install(monkeypatch):
    monkeypatch.setattr("glob.glob", lambda pattern: [])
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(KernelReportError, match="pip install nvidia-cuda-nvcc"):
        ptxas()
