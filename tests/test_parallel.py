"""Sharding on several devices: parameters and optimizer state placed as the rules say, model/mesh checks,
and the ahead-of-time dry run. Multi-device parts run in subprocesses with virtual CPU devices."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import types

import numpy as np
import pytest
from conftest import (
    LAUNCH_RUN,
    MESHES,
    TINY_LAYERS,
    TINY_MESH_RUN,
    TWO_STREAMS,
    copy_of_run,
    eight_device_job,
    finish,
    launch_processes,
    metrics,
    python_process,
    train_cli,
    virtual_cpu_devices,
)

from granite_jax import load_preset
from granite_jax.parallel.distributed import free_local_port
from granite_jax.parallel.mesh import RULES, MeshError, check_model_fits_mesh
from granite_jax.train.config import RunConfigError
from granite_jax.train.loop import process_streams


def _mesh(**sizes):
    """Stand-in for a Mesh: the checks read only its axis sizes."""
    return types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, "context": 1, **sizes})


@pytest.mark.parametrize("sizes, rules, message", [
    (dict(expert=3), "fsdp_tp", r"num_local_experts=8 is not divisible by the 'expert' mesh axis of size 3"),
    (dict(tensor=3), "fsdp_tp", r"num_attention_heads=4 is not divisible by the 'tensor' mesh axis of size 3"),
    (dict(data=3), "ep_over_data", r"num_local_experts=8 is not divisible by the 'data' mesh axis of size 3"),
    (dict(fsdp=3), "fsdp", r"hidden_size=256 is not divisible by the 'fsdp' mesh axis of size 3"),
])
def test_model_dimensions_must_divide_their_mesh_axes(sizes, rules, message):
    with pytest.raises(MeshError, match=message):
        check_model_fits_mesh(load_preset("tiny-hybrid-moe"), _mesh(**sizes), RULES[rules])
    check_model_fits_mesh(load_preset("tiny-hybrid-moe"), _mesh(fsdp=2, tensor=2, expert=2), RULES["fsdp_tp"])
    check_model_fits_mesh(load_preset("tiny-hybrid-moe"), _mesh(tensor=3), RULES["fsdp"])  # fsdp leaves tensor unused


@eight_device_job("sharded_state")
def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say(eight_devices):
    result = eight_devices("sharded_state")
    out = "\n".join(f"{key} {value}" for key, value in result.items())
    # (experts 8, hidden 256, 2 x intermediate 256) split 2 x 2 x 2.
    # (the context axis, of size 1 here, would split the weights' hidden dimension as fsdp does)
    assert "experts ('expert', ('fsdp', 'context'), 'tensor') (4, 128, 256)" in out
    # non-expert weights: FSDP over fsdp, expert and context
    assert "q_proj (('fsdp', 'expert', 'context'), 'tensor')" in out
    # Adam moments and the accumulated gradients of the experts are sharded like the expert weights.
    assert "moments [('expert', 'tensor', ('fsdp', 'context')), ('expert', ('fsdp', 'context'), 'tensor')]" in out
    assert "scalars {()}" in out


# The tiny run's 2 layers (half the preset's compile time) with a vocabulary of 24576 instead of 4096: 10.45M
# parameters, about the preset's 9.58M, so that the memory figures, printed to 0.01 GiB, still tell Adam's 2x
# apart (the 5.2M of 2 layers at vocabulary 4096 print 0.01 GiB for the parameters and for Adam's state alike).
DRY_RUN_MODEL = "model_overrides=" + json.dumps({**TINY_LAYERS, "vocab_size": 24576})


@pytest.mark.slow
def test_dry_run_reports_per_device_memory_without_training(tmp_path):
    proc = finish(python_process("train.py", "--dry-run", "--simulate-devices", "8",
                                 "mesh={data: 2, fsdp: 2, tensor: 2}", "data.batch_size=8", "data.seq_len=128",
                                 DRY_RUN_MODEL, f"run_dir={tmp_path / 'run'}")).ok()
    out = proc.output
    assert "(10,447,448 parameters) on mesh {'data': 2, 'fsdp': 2, 'tensor': 2, 'expert': 1, 'context': 1} = 8 " \
           "devices" in out
    params = float(re.search(r"parameters\s+([\d.]+) GiB", out).group(1))
    optimizer = float(re.search(r"optimizer state\s+([\d.]+) GiB", out).group(1))
    # 10.45M float32 parameters (0.039 GiB) split 4 ways (fsdp x tensor; the rest replicated): about 0.01 GiB;
    # Adam: 2x.
    assert 0.005 < params < 0.02 and 1.5 * params <= optimizer <= 2.5 * params
    assert re.search(r"all-reduce\s+\d+ runs", out) and "FLOPs per step" in out
    # the host side: one process reads all 8 rows of 128 tokens, 5 arrays of 4-byte values each
    assert "per process (host memory): batch 0.0 MiB (8 rows read whole" in out
    assert not os.path.exists(tmp_path / "run")  # nothing trained, nothing written

    bad = finish(python_process("train.py", "--dry-run", "--simulate-devices", "6", "mesh={tensor: 3, data: 2}"))
    assert "num_attention_heads=4 is not divisible by the 'tensor' mesh axis of size 3" in bad.error_line()


@eight_device_job("loop_collectives")
def test_dry_run_counts_collectives_in_loops_once_per_iteration(eight_devices):
    """A psum inside a 7-step scan runs 7 times: the dry run's traffic counts every run, not the op once."""
    traffic, unknown = eight_devices("loop_collectives")
    runs, size = traffic["all-reduce"]
    assert unknown == 0 and runs == 7 and size == 7 * 256 * 4  # one (256,) float32 sum per iteration


def test_dry_run_counts_matmul_flops_in_loops_once_per_iteration():
    """XLA's cost analysis counts a loop body once; the dry run's executed matmul FLOPs count every iteration:
    a matmul, a 7-step scan of matmuls and a 3x3 convolution are exactly 2 x output x contracted size each
    (the convolution's taps on its "SAME" padding not counted), and a fori_loop whose bound comes from the data
    (like the block-sparse attention's) is reported apart."""
    import jax
    import jax.numpy as jnp

    from granite_jax.hlo import executed_matmul_flops

    def f(x, w, kernel, n):
        y = x @ w
        y = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), y, None, length=7)[0]
        y = jax.lax.fori_loop(0, n, lambda i, c: jnp.sin(c @ w), y)
        image = y[None, None]  # (batch 1, feature 1, 64, 32)
        return jax.lax.conv_general_dilated(image, kernel, (1, 1), "SAME").sum()

    args = (jnp.ones((64, 32)), jnp.ones((32, 32)), jnp.ones((4, 1, 3, 3)), jnp.int32(5))
    total, data_dependent = executed_matmul_flops(jax.jit(f).lower(*args).compile().as_text())
    matmul, convolution = 2 * 64 * 32 * 32, 2 * 4 * (3 * 64 - 2) * (3 * 32 - 2)  # taps on the 64 x 32 input
    assert data_dependent == matmul  # the fori_loop's body, once
    assert total == (1 + 7 + 1) * matmul + convolution


def test_dry_run_counts_only_the_convolution_taps_on_input_elements():
    """The TPU compiler writes some matmuls as convolutions over a size-1 spatial dimension padded to the window
    (`size=32 pad=31_31`): each output position has one tap on the input, 31 on padding. Such a convolution is
    the batched matmul (8, 64) x (64, 16) for each of 32 windows; a base-dilated one counts one tap per window."""
    from granite_jax.hlo import matmul_flops

    shapes = {"x": [8, 64, 1], "w": [32, 16, 64]}
    padded = ("%c = bf16[8,32,16]{2,1,0} convolution(%x, %w), window={size=32 pad=31_31 rhs_reversal=1}, "
              "dim_labels=bf0_0oi->b0f")
    assert matmul_flops(padded, shapes) == 2 * 32 * 8 * 64 * 16
    shapes = {"a": [16, 256, 64], "b": [16, 256, 64]}  # 16 batched (256, 64) x (64, 256), as the TPU writes them
    dilated = ("%d = f32[16,256,256]{2,1,0} convolution(%a, %b), window={size=16 stride=15 lhs_dilate=16}, "
               "dim_labels=0bf_0oi->0bf")
    assert matmul_flops(dilated, shapes) == 2 * 16 * 256 * 256 * 64


def test_dry_run_counts_pallas_tpu_kernels_by_their_cost_estimate():
    """A Pallas TPU kernel is an opaque `tpu_custom_call` to the HLO: the dry run counts the FLOPs of the cost
    estimate it carries (megablox's grouped matmuls: 2·m·k·n), and nothing for other custom calls."""
    from granite_jax.hlo import executed_matmul_flops, matmul_flops

    kernel = ('%gmm = bf16[1024,256]{1,0} custom-call(%a, %b, %c), custom_call_target="tpu_custom_call", '
              'backend_config={"custom_call_config":{"body":"...","cost_estimate":{"flops":"268435456",'
              '"transcendentals":"0","bytes_accessed":"8650752"},"needs_layout_passes":true}}')
    other = '%t = token[] custom-call(%p), custom_call_target="PrepareAsyncCallDone", backend_config={}'
    assert matmul_flops(kernel, {}) == 268435456 and matmul_flops(other, {}) == 0
    # A kernel's backend config may span lines (splash attention's does), one of them starting with "}":
    # it is part of the instruction, not the end of the computation (the dot after it still counts).
    module = "\n".join([
        "HloModule m", "",
        "ENTRY %main (a: f32[8,16], b: f32[16,4]) -> f32[8,4] {",
        "  %a = f32[8,16]{1,0} parameter(0)",
        '  %k = f32[8,16]{1,0} custom-call(%a), custom_call_target="tpu_custom_call", backend_config={"x":"y',
        '}}, metadata={op_name="kernel"}, "cost_estimate":{"flops":"1000"}}',
        "  %b = f32[16,4]{1,0} parameter(1)",
        "  ROOT %d = f32[8,4]{1,0} dot(%k, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
        "}", ""])
    assert executed_matmul_flops(module) == (1000 + 2 * 8 * 4 * 16, 0)


def test_dry_run_reads_a_loop_counter_that_steps_by_two():
    """The TPU compiler's windowed einsums (a matmul by a weight sharded over the devices, multiplied shard by
    shard as the shards arrive from both neighbours) are loops whose counter starts at 0 and steps by 2 up to
    `i < 4` on 8 devices: 2 iterations, not 4 (counting 4 charged h-tiny's dense projections twice)."""
    from granite_jax.hlo import executed_matmul_flops

    def module(start: int, step: int) -> str:
        return "\n".join([
            "HloModule m", "",
            "%body (p: (u32[], f32[8,16], f32[16,4])) -> (u32[], f32[8,16], f32[16,4]) {",
            "  %p = (u32[], f32[8,16]{1,0}, f32[16,4]{1,0}) parameter(0)",
            "  %i = u32[] get-tuple-element(%p), index=0",
            "  %copy.1 = u32[] copy(%i)",
            "  %a = f32[8,16]{1,0} get-tuple-element(%p), index=1",
            "  %b = f32[16,4]{1,0} get-tuple-element(%p), index=2",
            "  %d = f32[8,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
            f"  %step..sunk.1 = u32[] constant({step})",
            "  %next = u32[] add(%copy.1, %step..sunk.1)",
            "  ROOT %t = (u32[], f32[8,16]{1,0}, f32[16,4]{1,0}) tuple(%next, /*index=1*/%a, %b)",
            "}", "",
            "%cond (q: (u32[], f32[8,16], f32[16,4])) -> pred[] {",
            "  %q = (u32[], f32[8,16]{1,0}, f32[16,4]{1,0}) parameter(0)",
            "  %j = u32[] get-tuple-element(%q), index=0",
            "  %n = u32[] constant(4)",
            "  ROOT %lt = pred[] compare(%j, %n), direction=LT",
            "}", "",
            "ENTRY %main (a: f32[8,16], b: f32[16,4]) -> f32[8,16] {",
            "  %a = f32[8,16]{1,0} parameter(0)",
            "  %b = f32[16,4]{1,0} parameter(1)",
            f"  %zero = u32[] constant({start})",
            "  %init = (u32[], f32[8,16]{1,0}, f32[16,4]{1,0}) tuple(%zero, %a, %b)",
            "  %w = (u32[], f32[8,16]{1,0}, f32[16,4]{1,0}) while(%init), condition=%cond, body=%body",
            "  ROOT %r = f32[8,16]{1,0} get-tuple-element(%w), index=1",
            "}", ""])

    dot = 2 * 8 * 4 * 16
    assert executed_matmul_flops(module(0, 1)) == (4 * dot, 0)
    assert executed_matmul_flops(module(0, 2)) == (2 * dot, 0)
    assert executed_matmul_flops(module(1, 1)) == (3 * dot, 0)


@pytest.mark.slow
@eight_device_job("splash_mesh")
def test_splash_attention_on_a_mesh_equals_blockwise_attention(eight_devices):
    """On data 2 x fsdp 2 x tensor 2 the splash kernel runs under shard_map (rows and heads split): logits and
    every gradient equal the blockwise attention's."""
    result = eight_devices("splash_mesh")
    assert result["logits"] < 1e-5 and result["gradients"] < 1e-4, result


@pytest.mark.slow
@eight_device_job("pallas_ssd_mesh")
def test_pallas_ssd_on_meshes_equals_the_xla_ssd(eight_devices):
    """`ssd_impl: pallas` under shard_map (rows over data x fsdp, heads over tensor) and inside the
    context-parallel SSD (context 4): logits and every gradient equal the XLA SSD's on the same mesh."""
    result = eight_devices("pallas_ssd_mesh")
    for mesh, errors in result.items():
        assert errors["logits"] < 1e-5 and errors["gradients"] < 1e-4, (mesh, errors)


@eight_device_job("loss_chunks")
def test_loss_chunks_do_not_multiply_the_collectives(eight_devices):
    """The output head is gathered, and its gradient reduced, once per step however many chunks the loss takes
    (each device keeps its own head copy): 64 chunks per device move the same bytes as one chunk."""
    moved = {int(chunk): size for chunk, size in eight_devices("loss_chunks").items()}
    assert moved[8] < 1.1 * moved[512], moved


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -r benchmarks/requirements-tpu.txt); not a test dependency")
def test_dry_run_compiles_for_a_tpu_topology_with_the_ragged_exchange():
    """`--topology`: the TPU compiler, no TPU. The `ragged` exchange lowers to ragged-all-to-all there."""
    proc = finish(python_process("train.py", "--topology", "v5p:2x2x1", "model=tiny-hybrid-moe", "mesh={expert: 4}",
                                 "data.batch_size=8", "data.seq_len=256", "compute_dtype=bfloat16",
                                 "moe_exchange=ragged")).ok()
    assert "= 4 devices (TPU v5, deviceless topology: the TPU compiler's figures)" in proc.output
    assert "fits in 95 GiB per device" in proc.output
    assert re.search(r"ragged-all-to-all\s+16 runs", proc.output)  # 4 MoE layers x 2 exchanges x (fwd + bwd)
    # megablox and splash compiled as Mosaic kernels, not interpreted (Pallas' interpret mode lowers megablox to
    # XLA loops of data-dependent length, which the FLOP count would report here)
    assert "(of which 0.000e+00 in loops of data-dependent length" in proc.output


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_topology_without_libtpu_says_what_to_install():
    proc = train_cli("--topology", "v5p:4x4x4")
    assert "--topology v5p:4x4x4 compiles with the TPU compiler, which needs libtpu: pip install 'libtpu" in \
        proc.error_line()


@eight_device_job("train meshes")
def test_meshes_give_the_one_device_losses(eight_devices, reference_train):
    """data x fsdp and fsdp x expert x tensor on 8 virtual devices: the losses of a few steps of the small hybrid
    MoE equal the 1-device run's."""
    reference, reference_dir = reference_train(TINY_MESH_RUN)
    sharded = eight_devices("train meshes")
    assert len(reference) == 2 and set(sharded) == set(MESHES)
    # Adam hides a gradient scaled by a constant (a sum over a mesh axis done twice): compare the norms too.
    reference_norms = metrics(reference_dir, "grad_norm")
    for name, losses in sharded.items():
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(metrics(eight_devices.root("train meshes") / name.replace(" ", ""), "grad_norm"),
                                   reference_norms, rtol=1e-4, err_msg=name)


def _resumable_copy(run_dir, into, step: int):
    """A copy of a finished run directory as it was at checkpoint `step`: later checkpoints and metrics gone."""
    copy_of_run(run_dir, into)
    for later in (s for s in os.listdir(into / "checkpoints") if s.isdigit() and int(s) > step):
        shutil.rmtree(into / "checkpoints" / later)
    lines = (into / "metrics.jsonl").read_text().splitlines()
    (into / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= step))
    return into


@pytest.mark.slow
def test_a_one_device_checkpoint_resumes_on_an_expert_mesh(tmp_path, reference_losses):
    """A run checkpointed at step 2 on one device resumes on 4 devices as `{fsdp: 2, expert: 2}`: the losses of
    steps 3 and 4 equal the uninterrupted one-device run's."""
    one, reference_dir = reference_losses("steps=4", *TWO_STREAMS, *LAUNCH_RUN)
    run_dir = _resumable_copy(reference_dir, tmp_path / "run", step=2)
    assert len(metrics(run_dir)) == 2
    launch_processes(run_dir, steps=4, processes=1, settings=[*TWO_STREAMS, "mesh={fsdp: 2, expert: 2}"], devices=4)
    resumed = metrics(run_dir)
    assert len(one) == 4 and len(resumed) == 4
    np.testing.assert_allclose(resumed, one, rtol=2e-5)


def test_a_resume_that_would_change_the_data_order_is_refused(tmp_path, reference_losses):
    """The checkpoint's 2 streams must be kept: another data.streams is refused naming the value that works, and
    nothing in the run directory changes."""
    _, reference_dir = reference_losses("steps=4", *TWO_STREAMS, *LAUNCH_RUN)
    run_dir = _resumable_copy(reference_dir, tmp_path / "run", step=2)
    files = lambda: {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    refused = train_cli(f"run_dir={run_dir}", "steps=4", *TWO_STREAMS[1:], "data.streams=1", *LAUNCH_RUN)
    assert refused.error_line() == (
        "error: data.streams=1, but the checkpoint's data position has 2 streams: resume with data.streams=2 "
        "(or null)")
    assert files() == before


@pytest.mark.parametrize("rows, streams, expected", [
    (slice(0, 8), 2, range(0, 2)), (slice(4, 8), 2, range(1, 2)), (slice(2, 4), 4, range(1, 2)),
    (slice(0, 4), 1, "Resume on a number of processes (or of groups of processes sharing rows along context) "
                     "that divides 1: [1]"),
    (slice(6, 8), 2, "that divides 2: [1, 2]")])
def test_each_process_reads_whole_saved_streams_or_the_resume_is_refused(rows, streams, expected):
    """Which of a checkpoint's streams a process reads from its rows of each batch of 8; a share that is not
    whole streams (1 stream on 2 processes, 2 streams on 4) is refused with the process counts that work."""
    if isinstance(expected, range):
        assert process_streams(rows, 8, streams, saved=True) == expected
    else:
        with pytest.raises(RunConfigError, match=re.escape(expected)):
            process_streams(rows, 8, streams, saved=True)


@eight_device_job("expert_parallel")
def test_expert_parallel_moe_equals_the_unsharded_moe(eight_devices):
    """The shard_map MoE (all-to-all over the expert axis) against the plain MoE on the same inputs: dropless
    is equal to float tolerance, forward and backward; with capacity factor 1 the dropped copies are exactly those
    past capacity in
    (token, slot) order per device and destination, the tokens that lost none are unchanged, and the router
    statistics (hence the aux loss) are the unsharded ones."""
    result = eight_devices("expert_parallel")
    assert result["dropless_error"] < 1e-5 and result["dropless_dropped"] == 0
    assert result["grad_error"] < 1e-5  # gradients of the input and of every weight
    assert result["capped_dropped"] == result["expected_dropped"] > 0
    assert result["untouched_error"] < 1e-5 and result["touched_changed"]
    assert result["stats_error"] < 1e-4


@eight_device_job("ragged_exchange")
def test_ragged_exchange_equals_the_unsharded_moe(eight_devices):
    """The `ragged` exchange (jax.lax.ragged_all_to_all, which XLA:CPU lacks) with the collective emulated from
    all_gather by its documented semantics: dropless equals the plain MoE forward and backward; with capacity
    factor 0.5 the dropped copies are exactly those the documented rule drops (each receiver fills its buffer
    by source device, each source's copies sorted by expert)."""
    result = eight_devices("ragged_exchange")
    assert result["dropless_error"] < 1e-5 and result["dropless_dropped"] == 0
    assert result["grad_error"] < 1e-5
    assert result["capped_dropped"] == result["expected_dropped"] > 0
    assert result["untouched_error"] < 1e-5 and result["touched_changed"]


@eight_device_job("tensor_parallel_mamba")
def test_tensor_parallel_mamba_layer_normalises_over_the_full_width(eight_devices):
    """A Mamba layer whose inner width is split over 4 tensor shards (out_proj rows, gated-norm weight): the
    norm's RMS must be taken over all shards (one group), so the output equals the unsharded layer's; the
    same with two groups. XLA splits the fused in_proj's output columns and the SSD over the shards: each does
    about a quarter of the layer's FLOPs."""
    errors = eight_devices("tensor_parallel_mamba")
    assert errors["1"] < 1e-5 and errors["2"] < 1e-5
    # the work is split, not repeated: each of the 4 tensor shards does about a quarter of the layer's FLOPs
    assert errors["flops_share_1"] < 0.3 and errors["flops_share_2"] < 0.3, errors


@eight_device_job("two_plans")
def test_one_train_step_traced_under_two_plans_gives_two_programs(eight_devices):
    """The sharding plan is part of the model (static) and the mesh is set with jax.set_mesh (part of jit's key):
    the same jitted train step traced under five settings in one process gives five programs, each the one
    that setting gets alone. (With the plan in hidden state read while tracing, the second setting would have
    been handed the first one's program.)"""
    result = eight_devices("two_plans")
    assert result["distinct_programs"] == result["settings"] == 5, result
    assert len(result["equal_to_traced_alone"]) == 5, result


@eight_device_job("sharded_hf_load")
def test_sharded_hf_load_reads_only_each_devices_slices(eight_devices):
    """`load_hf_checkpoint(shardings=...)` on 8 devices equals the plain load for every parameter, places each
    as the rules say, and the bytes a device's slices take are about 1/8 of the checkpoint under fsdp=8. The
    same checkpoint imported as a run (`convert import`) and restored onto the mesh by `RunDirectory.load`
    (`init_from=run:`) is equal and placed alike."""
    result = eight_devices("sharded_hf_load")
    for name in ("fsdp8", "fsdp2_tensor2_expert2"):
        got = result[name]
        assert got["mismatched"] == [] and got["misplaced"] == [], got
        assert got["run"] == {"mismatched": [], "misplaced": [], "split": got["split"]}, got
        assert got["split"] > 0, got
        assert got["bytes_read"] == got["checkpoint_bytes"]  # one process: every slice once, nothing twice
        # only the small vectors (norms, biases, Mamba constants) are whole on every device: measured 0.137
        # (fsdp8) and 0.162 (fsdp2 x tensor2 x expert2) of the checkpoint per device, against 1/8 = 0.125
        assert got["max_device_fraction"] < 1.5 / 8, got


@pytest.mark.slow
def test_two_processes_each_read_about_half_of_an_hf_checkpoint(hf_checkpoint):
    """2 processes x 4 devices, fsdp=8 across both: each process's shards equal the plain load's, and each
    reads from disk about half the checkpoint (only the small vectors are read by both)."""
    directory, _ = hf_checkpoint(tie_word_embeddings=False)
    port = free_local_port()
    procs = [python_process("-m", "tests.multidevice", json.dumps({f"process {i}": [
        "sharded_hf_load_processes", {"directory": directory, "coordinator": f"127.0.0.1:{port}", "process": i}]}),
        env=virtual_cpu_devices(4)) for i in range(2)]
    results = []
    for proc in procs:
        out = finish(proc, timeout=600).ok().stdout
        results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0])[1])
    for result in results:
        assert result["mismatched"] == [], result
        assert result["bytes_read"] < 0.6 * result["checkpoint_bytes"], result  # measured: 0.505
