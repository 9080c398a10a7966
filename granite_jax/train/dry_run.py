"""`python train.py --dry-run`: compile the train step ahead of time for a target mesh and report what one
device would hold, without allocating the model.

Parameters, optimizer state and the batch are abstract (`jax.ShapeDtypeStruct` with their shardings); the
step is lowered and compiled with `jax.jit(...).lower(...).compile()`. Without the real devices:
- TPU pods (`--topology v5p:4x4x4`): the devices of a deviceless TPU topology (`granite_jax/parallel/
  topology.py`, needs libtpu) and the real TPU compiler: the figures are the TPU's own.
- NVIDIA GPUs (`--topology h100:8`, `h100:8x8`, `h200:8`): deviceless GPUs (the CUDA plugin) and XLA's GPU
  compiler: memory and compilation are the GPU compiler's (it does not autotune without a device). With the
  Pallas Triton kernels (`ssd_impl: pallas`, `attention_impl: pallas_gpu`) each kernel's registers, spills and
  shared memory are read from its PTX (`gpu_kernels.py`).
- anything else (`--simulate-devices N`): N virtual CPU devices. The SPMD partitioning, hence the sharded
  parameter and optimizer bytes and the collectives, is the target's; kernels and fusion are XLA:CPU's, which
  computes bf16 matmuls in float32 and fuses less than a GPU compiler, so temporaries are an upper estimate.

Reported per device: parameter and optimizer-state bytes (from the shardings, exact), the batch, XLA's
temporaries (activations, gradients, workspace), the compiled step's FLOPs (XLA's cost analysis) next to the
model FLOPs of `granite_jax/model/flops.py` and the matmul FLOPs the compiled step executes (loop iterations
counted, which XLA's cost analysis does not), and the collectives in the compiled program with the bytes they
move.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import jax

from granite_jax.hlo import collective_traffic, executed_matmul_flops
from granite_jax.model.quantize import parameter_count, stored_bytes
from granite_jax.parallel.topology import device_memory
from granite_jax.train.config import RunConfig
from granite_jax.train.gpu_kernels import compile_options, triton_kernels
from granite_jax.train.setup import build_run

GiB = 2**30


@dataclasses.dataclass
class DryRunReport:
    model: str
    mesh: dict
    devices: int
    platform: str  # the target devices' kind, and how the figures were obtained
    device_bytes: int | None  # one device's memory, where known
    parameters: int
    params_bytes: int  # per device
    opt_state_bytes: int  # per device
    batch_bytes: int  # per device
    temp_bytes: int  # per device: XLA temporaries (activations, gradients, workspace)
    step_flops: float | None  # per device, XLA cost analysis (every loop body counted once); None: not offered
    model_flops: float  # per device, model/flops.py's count (6N + attention + SSD; LoRA, DPO as they train)
    collectives: dict  # kind -> (executions, bytes) per device per step, loop iterations included
    uncounted_loops: int = 0  # loops whose trip count was not read: their collectives counted once
    compile_seconds: float = 0.0  # lowering + compiling the step on this host
    # per device: matmul FLOPs of the compiled step with loop iterations counted (`executed_matmul_flops`);
    # of them, those in loops whose trip count depends on the data (block-sparse attention), counted once
    matmul_flops: float = 0.0
    data_dependent_matmul_flops: float = 0.0
    # per process (host memory): the rows of each batch the busiest process reads whole (packing needs whole
    # rows), all of the batch's arrays, and how many rows that is
    host_batch_bytes: int = 0
    host_batch_rows: int = 0
    # GPU targets with Pallas Triton kernels: each kernel's registers, spills and shared memory (ptxas)
    kernels: list = dataclasses.field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.params_bytes + self.opt_state_bytes + self.batch_bytes + self.temp_bytes

    def _fit(self) -> str:
        if self.device_bytes is None:
            return ""
        verdict = "fits" if self.peak_bytes <= self.device_bytes else "does NOT fit"
        return f"  ({verdict} in {self.device_bytes / GiB:.0f} GiB per device)"

    def render(self) -> str:
        lines = [f"dry run: {self.model} ({self.parameters:,} parameters) on mesh {self.mesh} = {self.devices} "
                 f"devices ({self.platform})",
                 "per device:",
                 f"  parameters        {self.params_bytes / GiB:9.2f} GiB",
                 f"  optimizer state   {self.opt_state_bytes / GiB:9.2f} GiB",
                 f"  batch             {self.batch_bytes / GiB:9.2f} GiB",
                 f"  temporaries       {self.temp_bytes / GiB:9.2f} GiB  (activations, gradients, workspace)",
                 f"  total             {self.peak_bytes / GiB:9.2f} GiB{self._fit()}",
                 f"  FLOPs per step    {self.model_flops:.3e} model (granite_jax/model/flops.py); compiled: "
                 f"{self.matmul_flops:.3e} in matmuls, loop iterations counted (of which "
                 f"{self.data_dependent_matmul_flops:.3e} in loops of data-dependent length, counted once), "
                 + ("XLA cost analysis not offered for this target" if self.step_flops is None else
                    f"{self.step_flops:.3e} XLA cost analysis (loop bodies once)"),
                 "  collectives per step (every execution, loop iterations included; bytes of their results):"]
        rows = f"{self.host_batch_rows} row" + ("s" if self.host_batch_rows != 1 else "")
        host = (f"per process (host memory): batch {self.host_batch_bytes / 2**20:.1f} MiB ({rows} "
                "read whole, every array of the batch; the pipeline holds it about twice: the batch being built "
                "and the one being copied to the devices, plus one row and one tokenizer piece)")
        lines.insert(1, f"compiled in {self.compile_seconds:.1f} s on this host (lowering + compilation)")
        if not self.collectives:
            lines.append("    none")
        for kind, (count, size) in sorted(self.collectives.items()):
            lines.append(f"    {kind:18s} {count:6d} runs, {size / GiB:9.3f} GiB")
        if self.uncounted_loops:
            lines.append(f"    ({self.uncounted_loops} loops of unknown trip count: their collectives counted once)")
        if self.kernels:
            lines.append("  Pallas Triton kernels (ptxas -v; per thread, per block):")
            lines.extend(f"    {kernel.render()}" + ("" if kernel.within_limits else "  <- SPILLS or over the limit")
                         for kernel in self.kernels)
        return "\n".join([*lines, host])


def _shard_bytes(abstract, shardings) -> int:
    # stored_bytes: a QLoRA base's uint4 (nf4) values take half a byte each on TPU (dtype.itemsize says 1)
    return sum(stored_bytes(s.shard_shape(x.shape), x.dtype)
               for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


def host_batch(run) -> tuple[int, int]:
    """(bytes, rows) of the batch the busiest process reads: the rows any of its devices hold, read whole."""
    rows, _ = run.batch_shape
    by_process: dict[int, set[int]] = {}
    for device, index in run.data_sharding.devices_indices_map(run.batch_shape).items():
        start, stop, _ = index[0].indices(rows)
        by_process.setdefault(device.process_index, set()).update(range(start, stop))
    held = max(len(r) for r in by_process.values())
    row_bytes = sum(x.shape[1] * x.dtype.itemsize for x in run.abstract_batch().values())
    return held * row_bytes, held


def dry_run(config: RunConfig, devices=None) -> DryRunReport:
    """Compile `config`'s train step for its mesh over `devices` (default: this process's JAX devices; a
    deviceless TPU topology's for `--topology`) and report one device's share."""
    run = build_run(config, devices, abstract=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="granite_jax_kernels_") as dump_dir:
        model = run.model_config
        kernels_compiled = (run.mesh.devices.flat[0].platform == "gpu"
                            and (model.ssd_impl == "pallas" or model.attention_impl == "pallas_gpu"))
        compiled = run.lower_train_step().compile(compiler_options=compile_options(dump_dir) if kernels_compiled
                                                  else None)
        compile_seconds = time.perf_counter() - started
        kernels = triton_kernels(dump_dir, compiled.as_text()) if kernels_compiled else []
    memory = compiled.memory_analysis()
    try:
        cost = compiled.cost_analysis()
    except NotImplementedError:  # XLA's GPU compiler without a device: the HLO's own counts below stand in
        cost = None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mesh = run.mesh
    devices = mesh.devices.size
    tokens = config.data.batch_size * config.data.seq_len
    batch = run.abstract_batch()
    hlo = compiled.as_text()
    collectives, uncounted_loops = collective_traffic(hlo)
    matmul, data_dependent = executed_matmul_flops(hlo)
    host_bytes, host_rows = host_batch(run)
    return DryRunReport(
        model=str(config.weight_source), mesh=dict(mesh.shape), devices=devices,
        platform=_describe(mesh.devices.flat[0]),
        device_bytes=device_memory(mesh.devices.flat[0]),
        # With LoRA, the frozen base weights too (no optimizer state; QLoRA: quantised, counted once, scales aside).
        parameters=parameter_count(run.state.params) + (0 if run.frozen is None else parameter_count(run.frozen)),
        # ... and with DPO (full weights), the frozen reference copy of the starting parameters.
        params_bytes=(_shard_bytes(run.state.params, run.state_shardings.params)
                      + (0 if run.frozen is None else _shard_bytes(run.frozen, run.frozen_shardings))
                      + (0 if run.reference is None else _shard_bytes(run.reference, run.state_shardings.params))),
        opt_state_bytes=_shard_bytes(run.state.opt_state, run.state_shardings.opt_state),
        batch_bytes=_shard_bytes(batch, [run.data_sharding] * len(batch)),
        temp_bytes=int(memory.temp_size_in_bytes),
        step_flops=None if cost is None else float(cost.get("flops", 0.0)),
        model_flops=run.flops_per_token() * tokens / devices,
        collectives=collectives, uncounted_loops=uncounted_loops, compile_seconds=compile_seconds,
        matmul_flops=matmul, data_dependent_matmul_flops=data_dependent,
        host_batch_bytes=host_bytes, host_batch_rows=host_rows, kernels=kernels,
    )


def _describe(device) -> str:
    if device.platform == "cpu":
        return f"simulated on {jax.device_count()} virtual CPU devices: XLA:CPU's estimate"
    if device not in jax.devices():
        return f"{device.device_kind}, deviceless topology: the {device.platform.upper()} compiler's figures"
    return f"{device.device_kind}: compiled for these devices"
