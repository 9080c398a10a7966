"""Every Pallas Triton kernel option compiled by XLA's GPU compiler for 8 deviceless H100s (sm_90), forward and
backward, over packed rows, at Granite 4.0's head shapes: `ssd_impl: pallas` (Mamba heads of 64 channels, state
128), `attention_impl: pallas_gpu` (heads of 128 and, granite-4.0-h-micro's, 64) and the experts' grouped matmul
(`moe_impl: auto` on GPUs: `pallas_gpu`, at granite-4.0-h-tiny's expert sizes). Each kernel's registers and
spills (ptxas -v on the PTX the compiler wrote) and its shared memory against the H100's opt-in limit: none may
spill or exceed it. (Before the SSD kernels split a head's channels into blocks of 16 and chunked by 16 tokens,
the backward spilled 3,084 bytes per thread; JAX's attention forward at 4 warps spilled 72 with heads of 64.)"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from granite_jax.model.moe import grouped_matmul, grouped_swiglu
from granite_jax.model.pallas_attention import pallas_attention
from granite_jax.model.pallas_ssd import ssd_pallas_on_mesh
from granite_jax.parallel.mesh import make_mesh
from granite_jax.parallel.plan import ShardingPlan
from granite_jax.parallel.topology import gpu_topology_devices
from granite_jax.train.gpu_kernels import KernelReportError, compile_options, ptxas, triton_kernels

ROWS, T = 8, 512  # one packed row per GPU
MAMBA_HEADS, CHANNELS, STATE = 8, 64, 128
QUERY_HEADS, KV_HEADS = 8, 2


def _compiled_kernels(tmp_path, loss, shapes, grad_argnums=None):
    """Compile loss's gradient (forward and backward; with respect to every argument but the last, the segment
    ids, unless `grad_argnums`) for 8 H100s, rows split over `fsdp`; its Triton kernels."""
    mesh = make_mesh({"fsdp": 8}, gpu_topology_devices("h100:8"))
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("fsdp") if len(shape) > 1 else P()))
            for shape, dtype in shapes]
    with jax.set_mesh(mesh):
        argnums = grad_argnums or tuple(range(len(args) - 1))
        lowered = jax.jit(jax.grad(loss, argnums=argnums)).lower(*args)
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


def test_the_experts_kernels_are_the_gpu_default_and_fit_the_h100(tmp_path):
    """The routed experts' SwiGLU with `moe_impl: auto`, each GPU's rows through 8 of h-tiny's 64 experts (hidden
    1,536, expert width 512): the Pallas Triton grouped matmul, forward, input and weight gradients, and no
    dense matmul over the experts (XLA's lowering of `ragged_dot` on GPUs) left in the program."""
    experts, hidden, width, rows = 8, 1536, 512, 1024

    def loss(rows, w_in, w_out, sizes, cotangent):
        out = grouped_swiglu(rows, sizes, w_in, w_out, grouped_matmul=functools.partial(grouped_matmul, impl="auto"))
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    bf16 = jnp.bfloat16
    kernels = _compiled_kernels(tmp_path, jax.shard_map(
        loss, in_specs=(P("fsdp"), P(), P(), P(), P("fsdp")), out_specs=P(), check_vma=False), [
        ((8 * rows, hidden), bf16), ((experts, hidden, 2 * width), bf16), ((experts, width, hidden), bf16),
        ((experts,), jnp.int32), ((8 * rows, hidden), jnp.float32)], grad_argnums=(0, 1, 2))
    assert sorted(kernels) == ["grouped_matmul", "grouped_matmul_input_grad", "grouped_matmul_weight_grad"]
    _within_limits(kernels)


def test_a_missing_ptxas_says_what_to_install(monkeypatch):
    monkeypatch.setattr("glob.glob", lambda pattern: [])
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(KernelReportError, match="pip install nvidia-cuda-nvcc"):
        ptxas()
