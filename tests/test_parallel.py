"""Sharding on several devices: parameters and optimizer state placed as the rules say, model/mesh checks,
and the ahead-of-time dry run. Multi-device parts run in subprocesses with virtual CPU devices."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from granite_jax import load_preset
from granite_jax.parallel.distributed import free_local_port
from granite_jax.parallel.mesh import RULES, MeshError, check_model_fits_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def virtual_cpu_devices(devices: int) -> dict:
    """The environment of a subprocess whose JAX sees `devices` CPU devices. Their collectives wait for each other
    up to 10 minutes: XLA:CPU's default (40 s) aborts the process when a busy 2-core machine runs one device's
    thread that much later than the others (seen with the Pallas SSD in interpret mode on 8 devices)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"
                         " --xla_cpu_collective_call_terminate_timeout_seconds=600"
                         " --xla_cpu_collective_timeout_seconds=600"}


def _run_module(name: str, argument=None, devices: int = 8):
    """Run `python -m tests.multidevice.NAME` on `devices` virtual CPU devices; returns what it reported."""
    command = [sys.executable, "-m", f"tests.multidevice.{name}"] + ([] if argument is None else [json.dumps(argument)])
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env=virtual_cpu_devices(devices))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])


def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say():
    result = _run_module("sharded_state")
    out = "\n".join(f"{key} {value}" for key, value in result.items())
    # (experts 8, hidden 256, 2 x intermediate 256) split 2 x 2 x 2.
    # (the context axis, of size 1 here, would split the weights' hidden dimension as fsdp does)
    assert "experts ('expert', ('fsdp', 'context'), 'tensor') (4, 128, 256)" in out
    # non-expert weights: FSDP over fsdp, expert and context
    assert "q_proj (('fsdp', 'expert', 'context'), 'tensor')" in out
    # Adam moments and the accumulated gradients of the experts are sharded like the expert weights.
    assert "moments [('expert', 'tensor', ('fsdp', 'context')), ('expert', ('fsdp', 'context'), 'tensor')]" in out
    assert "scalars {()}" in out


def test_dry_run_reports_per_device_memory_without_training(tmp_path):
    cmd = [sys.executable, "train.py", "--dry-run", "--simulate-devices", "8", "mesh={data: 2, fsdp: 2, tensor: 2}",
           "data.batch_size=8", "data.seq_len=128", f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "on mesh {'data': 2, 'fsdp': 2, 'tensor': 2, 'expert': 1, 'context': 1} = 8 devices" in out
    params = float(re.search(r"parameters\s+([\d.]+) GiB", out).group(1))
    optimizer = float(re.search(r"optimizer state\s+([\d.]+) GiB", out).group(1))
    # 9.58M float32 parameters split 4 ways (fsdp x tensor; the rest replicated): about 0.01 GiB; Adam: 2x.
    assert 0.005 < params < 0.02 and 1.5 * params <= optimizer <= 2.5 * params
    assert re.search(r"all-reduce\s+\d+ runs", out) and "FLOPs per step" in out
    assert not os.path.exists(tmp_path / "run")  # nothing trained, nothing written

    bad = subprocess.run([sys.executable, "train.py", "--dry-run", "--simulate-devices", "6",
                          "mesh={tensor: 3, data: 2}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert "num_attention_heads=4 is not divisible by the 'tensor' mesh axis of size 3" in bad.stderr


def test_dry_run_counts_collectives_in_loops_once_per_iteration():
    """A psum inside a 7-step scan runs 7 times: the dry run's traffic counts every run, not the op once."""
    traffic, unknown = _run_module("loop_collectives")
    runs, size = traffic["all-reduce"]
    assert unknown == 0 and runs == 7 and size == 7 * 256 * 4  # one (256,) float32 sum per iteration


def test_dry_run_counts_matmul_flops_in_loops_once_per_iteration():
    """XLA's cost analysis counts a loop body once; the dry run's executed matmul FLOPs count every iteration:
    a matmul, a 7-step scan of matmuls and a 3x3 convolution are exactly 2 x output x contracted size each
    (the convolution's taps on its "SAME" padding not counted), and a fori_loop whose bound comes from the data
    (like the block-sparse attention's) is reported apart."""
    import jax
    import jax.numpy as jnp

    from granite_jax.train.dry_run import executed_matmul_flops

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
    from granite_jax.train.dry_run import matmul_flops

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
    from granite_jax.train.dry_run import executed_matmul_flops, matmul_flops

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
    from granite_jax.train.dry_run import executed_matmul_flops

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


def test_splash_attention_on_a_mesh_equals_blockwise_attention():
    """On data 2 x fsdp 2 x tensor 2 the splash kernel runs under shard_map (rows and heads split): logits and
    every gradient equal the blockwise attention's."""
    result = _run_module("splash_mesh")
    assert result["logits"] < 1e-5 and result["gradients"] < 1e-4, result


def test_pallas_ssd_on_meshes_equals_the_xla_ssd():
    """`ssd_impl: pallas` under shard_map (rows over data x fsdp, heads over tensor) and inside the
    context-parallel SSD (context 4): logits and every gradient equal the XLA SSD's on the same mesh."""
    result = _run_module("pallas_ssd_mesh")
    for mesh, errors in result.items():
        assert errors["logits"] < 1e-5 and errors["gradients"] < 1e-4, (mesh, errors)


def test_loss_chunks_do_not_multiply_the_collectives():
    """The output head is gathered, and its gradient reduced, once per step however many chunks the loss takes
    (each device keeps its own head copy): 64 chunks per device move the same bytes as one chunk."""
    moved = {int(chunk): size for chunk, size in _run_module("loss_chunks").items()}
    assert moved[8] < 1.1 * moved[512], moved


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -r benchmarks/requirements-tpu.txt); not a test dependency")
def test_dry_run_compiles_for_a_tpu_topology_with_the_ragged_exchange():
    """`--topology`: the TPU compiler, no TPU. The `ragged` exchange lowers to ragged-all-to-all there."""
    cmd = [sys.executable, "train.py", "--topology", "v5p:2x2x1", "model=tiny-hybrid-moe", "mesh={expert: 4}",
           "data.batch_size=8", "data.seq_len=256", "compute_dtype=bfloat16", "moe_exchange=ragged"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "= 4 devices (TPU v5, deviceless topology: the TPU compiler's figures)" in proc.stdout
    assert "fits in 95 GiB per device" in proc.stdout
    assert re.search(r"ragged-all-to-all\s+16 runs", proc.stdout)  # 4 MoE layers x 2 exchanges x (fwd + bwd)
    # megablox and splash compiled as Mosaic kernels, not interpreted (Pallas' interpret mode lowers megablox to
    # XLA loops of data-dependent length, which the FLOP count would report here)
    assert "(of which 0.000e+00 in loops of data-dependent length" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_topology_without_libtpu_says_what_to_install():
    proc = subprocess.run([sys.executable, "train.py", "--topology", "v5p:4x4x4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2
    assert "--topology v5p:4x4x4 compiles with the TPU compiler, which needs libtpu: pip install 'libtpu" in proc.stderr


MESHES = {"data x fsdp": {"data": 2, "fsdp": 4}, "fsdp x tensor": {"fsdp": 4, "tensor": 2},
          "data x expert": {"data": 2, "expert": 4}, "fsdp x expert x tensor": {"fsdp": 2, "expert": 2, "tensor": 2}}
TRAIN = dict(model_overrides={"num_hidden_layers": 2, "layer_types": ["mamba", "attention"], "mamba_chunk_size": 32},
             steps=3, log_every=1, eval_every=1000, data={"seq_len": 64, "batch_size": 8, "validation": []},
             optimizer={"warmup_steps": 1}, checkpoint={"every_steps": 100})


def _train_losses(tmp_path, meshes: dict, devices: int) -> dict:
    return _run_module("train_meshes", {"meshes": meshes, "root": str(tmp_path), "overrides": TRAIN}, devices)


def test_meshes_give_the_one_device_losses(tmp_path):
    """data x fsdp, fsdp x tensor, data x expert, fsdp x expert x tensor on 8 virtual devices: the losses of
    a few steps of the small hybrid MoE equal the 1-device run's."""
    reference = _train_losses(tmp_path, {"one device": {"data": 1}}, devices=1)["one device"]
    sharded = _train_losses(tmp_path, MESHES, devices=8)
    assert len(reference) == 3 and set(sharded) == set(MESHES)
    # Adam hides a gradient scaled by a constant (a sum over a mesh axis done twice): compare the norms too.
    reference_norms = _metrics(tmp_path / "onedevice", "grad_norm")
    for name, losses in sharded.items():
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(_metrics(tmp_path / name.replace(" ", ""), "grad_norm"), reference_norms,
                                   rtol=1e-4, err_msg=name)


TWO_STREAMS = ["data.streams=2", "mesh={data: 2, fsdp: 4}", "data.batch_size=8", "data.seq_len=64",
               "model_overrides={num_hidden_layers: 2, layer_types: [mamba, attention], mamba_chunk_size: 32}"]


def _launch(run_dir, steps: int, processes: int, settings=TWO_STREAMS, devices: int = 8,
            launcher=None) -> list[str]:
    """`train.py` as `processes` processes sharing `devices` virtual CPU devices. They join with the
    --coordinator-address flags, or, with `launcher` (process index -> environment variables), with no flags
    and the variables a cluster launcher would set (tests/test_launch.py). Returns each process's output."""
    args = ["train.py", f"run_dir={run_dir}", f"steps={steps}", *settings, "data.validation=[]", "log_every=1",
            "eval_every=1000", "optimizer.warmup_steps=1", "checkpoint.every_steps=2", "checkpoint.async_save=false"]
    env = virtual_cpu_devices(devices // processes)
    port = free_local_port()
    distributed = (lambda i: [f"--coordinator-address=127.0.0.1:{port}", f"--num-processes={processes}",
                              f"--process-id={i}"]) if processes > 1 and launcher is None else (lambda i: [])
    launcher = launcher or (lambda i: {})
    procs = [subprocess.Popen([sys.executable, *args[:1], *distributed(i), *args[1:]], cwd=ROOT,
                              env={**env, **launcher(i)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    if processes > 1:  # only process 0 logs
        assert "| loss " in outputs[0] and "| loss " not in outputs[1]
    return outputs


def _metrics(run_dir, name: str = "loss") -> list[float]:
    """One metric of a run's metrics.jsonl, by step (a resumed run's repeated steps: the latest)."""
    values = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if name in record:
                values[record["step"]] = record[name]
    return [values[s] for s in sorted(values)]


def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path):
    """2 processes x 4 CPU devices (gloo) train 2 steps, checkpoint, are restarted and resume to step 4: the
    losses equal one process with 8 devices, and each process checkpointed its own data position."""
    _launch(tmp_path / "one", steps=4, processes=1)
    _launch(tmp_path / "two", steps=2, processes=2)
    _launch(tmp_path / "two", steps=4, processes=2)  # resumes from the step-2 checkpoint
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(one) == 4 and len(two) == 4
    np.testing.assert_allclose(two, one, rtol=2e-5)
    data_files = sorted(f for f in os.listdir(tmp_path / "two" / "checkpoints" / "2" / "data") if f.endswith(".json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]


def test_context_axis_across_two_processes_trains_and_resumes_like_one(tmp_path):
    """2 processes x 2 CPU devices with `context: 4` (zigzag) spanning both: every row is split over the
    processes, each process reads the same rows and keeps its slice of the positions. Trained 2 steps,
    restarted and resumed to step 4, the losses equal one process holding all 4 devices."""
    settings = ["mesh={context: 4}", "context_layout=zigzag", "data.batch_size=2", "data.seq_len=128",
                "model_overrides={num_hidden_layers: 2, layer_types: [mamba, attention], mamba_chunk_size: 16}"]
    _launch(tmp_path / "one", steps=4, processes=1, settings=settings, devices=4)
    _launch(tmp_path / "two", steps=2, processes=2, settings=settings, devices=4)
    _launch(tmp_path / "two", steps=4, processes=2, settings=settings, devices=4)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(one) == 4 and len(two) == 4
    np.testing.assert_allclose(two, one, rtol=2e-5)
    data_files = sorted(f for f in os.listdir(tmp_path / "two" / "checkpoints" / "2" / "data") if f.endswith(".json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]


def test_expert_parallel_moe_equals_the_unsharded_moe():
    """The shard_map MoE (all-to-all over the expert axis) against the plain MoE on the same inputs: dropless
    is equal to float tolerance, forward and backward; with capacity factor 1 the dropped copies are exactly those
    past capacity in
    (token, slot) order per device and destination, the tokens that lost none are unchanged, and the router
    statistics (hence the aux loss) are the unsharded ones."""
    result = _run_module("expert_parallel")
    assert result["dropless_error"] < 1e-5 and result["dropless_dropped"] == 0
    assert result["grad_error"] < 1e-5  # gradients of the input and of every weight
    assert result["capped_dropped"] == result["expected_dropped"] > 0
    assert result["untouched_error"] < 1e-5 and result["touched_changed"]
    assert result["stats_error"] < 1e-4


def test_ragged_exchange_equals_the_unsharded_moe():
    """The `ragged` exchange (jax.lax.ragged_all_to_all, which XLA:CPU lacks) with the collective emulated from
    all_gather by its documented semantics: dropless equals the plain MoE forward and backward; with capacity
    factor 0.5 the dropped copies are exactly those the documented rule drops (each receiver fills its buffer
    by source device, each source's copies sorted by expert)."""
    result = _run_module("ragged_exchange")
    assert result["dropless_error"] < 1e-5 and result["dropless_dropped"] == 0
    assert result["grad_error"] < 1e-5
    assert result["capped_dropped"] == result["expected_dropped"] > 0
    assert result["untouched_error"] < 1e-5 and result["touched_changed"]


def test_tensor_parallel_mamba_layer_normalises_over_the_full_width():
    """A Mamba layer whose inner width is split over 4 tensor shards (out_proj rows, gated-norm weight): the
    norm's RMS must be taken over all shards (one group), so the output equals the unsharded layer's; the
    same with two groups. XLA splits the fused in_proj's output columns and the SSD over the shards: each does
    about a quarter of the layer's FLOPs."""
    errors = _run_module("tensor_parallel_mamba")
    assert errors["1"] < 1e-5 and errors["2"] < 1e-5
    # the work is split, not repeated: each of the 4 tensor shards does about a quarter of the layer's FLOPs
    assert errors["flops_share_1"] < 0.3 and errors["flops_share_2"] < 0.3, errors


def test_one_train_step_traced_under_two_plans_gives_two_programs():
    """The sharding plan is part of the model (static) and the mesh is set with jax.set_mesh (part of jit's key):
    the same jitted train step traced under five settings in one process gives five programs, each the one
    that setting gets alone. (With the plan in hidden state read while tracing, the second setting would have
    been handed the first one's program.)"""
    result = _run_module("two_plans")
    assert result["distinct_programs"] == result["settings"] == 5, result
    assert len(result["equal_to_traced_alone"]) == 5, result


def test_sharded_hf_load_reads_only_each_devices_slices(hf_checkpoint, tmp_path):
    """`load_hf_checkpoint(shardings=...)` on 8 devices equals the plain load for every parameter, places each
    as the rules say, and the bytes a device's slices take are about 1/8 of the checkpoint under fsdp=8. The
    same checkpoint imported as a run (`convert import`) and restored onto the mesh by `load_run_model`
    (`init_from=run:`) is equal and placed alike."""
    from granite_jax.convert.__main__ import import_checkpoint

    directory, _ = hf_checkpoint(tie_word_embeddings=False, mamba_proj_bias=True)
    run_dir = str(tmp_path / "imported")
    import_checkpoint(directory, run_dir)
    result = _run_module("sharded_hf_load", {"directory": directory, "run_dir": run_dir, "meshes": {
        "fsdp8": [{"fsdp": 8}, "fsdp"], "fsdp2_tensor2_expert2": [{"fsdp": 2, "tensor": 2, "expert": 2}, "fsdp_tp"]}})
    for name in ("fsdp8", "fsdp2_tensor2_expert2"):
        got = result[name]
        assert got["mismatched"] == [] and got["misplaced"] == [], got
        assert got["run"] == {"mismatched": [], "misplaced": [], "split": got["split"]}, got
        assert got["split"] > 0, got
        assert got["bytes_read"] == got["checkpoint_bytes"]  # one process: every slice once, nothing twice
        # only the small vectors (norms, biases, Mamba constants) are whole on every device: measured 0.137
        # (fsdp8) and 0.162 (fsdp2 x tensor2 x expert2) of the checkpoint per device, against 1/8 = 0.125
        assert got["max_device_fraction"] < 1.5 / 8, got


def test_two_processes_each_read_about_half_of_an_hf_checkpoint(hf_checkpoint):
    """2 processes x 4 devices, fsdp=8 across both: each process's shards equal the plain load's, and each
    reads from disk about half the checkpoint (only the small vectors are read by both)."""
    directory, _ = hf_checkpoint(tie_word_embeddings=False)
    port = free_local_port()
    env = virtual_cpu_devices(4)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multidevice.sharded_hf_load_processes", json.dumps(
        {"directory": directory, "coordinator": f"127.0.0.1:{port}", "process": i})], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    results = []
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
    for result in results:
        assert result["mismatched"] == [], result
        assert result["bytes_read"] < 0.6 * result["checkpoint_bytes"], result  # measured: 0.505
