"""Joining a multi-process job: JAX's own runtime (`jax.distributed`), no home-made process management.

`initialize()` is called once, before any computation, by `train.py`:
- explicit coordinator address / process count / process id (flags): e.g. two processes on one machine;
- launched by a cluster launcher that JAX detects itself (TPU pod slices, Slurm with several tasks, Open MPI):
  `jax.distributed.initialize()` with no arguments;
- otherwise nothing: a single process.
On CPU the processes exchange collectives through gloo.
"""

from __future__ import annotations

import math
import os

import jax


def launched_by_cluster() -> bool:
    """Whether a launcher that `jax.distributed.initialize()` understands started several processes."""
    return (int(os.environ.get("SLURM_NTASKS", "1")) > 1
            or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("--coordinator-address, --num-processes and --process-id go together "
                         f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id={process_id} must be in [0, {num_processes})")
    if coordinator_address is None and not launched_by_cluster():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by the CPU backend
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def process_block(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The block of a global array of `shape` that this process's devices hold: one slice per dimension.

    A batch (rows, positions) sharded over (data x fsdp x expert, context): when the context axis lies within
    each process, a process holds whole rows, its share of the batch; when it spans processes, the process
    holds its slice of the positions of the rows its context group shares, and supplies only that slice.
    A mesh that gives a process a set of indices that is not one block (devices of a process scattered over
    the mesh) is an error: no pipeline could feed it a contiguous array.
    """
    held = {tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape))
            for index in sharding.addressable_devices_indices_map(shape).values()}
    block = tuple(slice(min(h[d][0] for h in held), max(h[d][1] for h in held)) for d in range(len(shape)))
    area = 1
    for s in block:
        area *= s.stop - s.start
    held_area = sum(math.prod(stop - start for start, stop in h) for h in held)
    if held_area != area:
        raise ValueError(f"process {jax.process_index()} holds parts of the batch (shape {shape}) that are not one "
                         "block: order the mesh so that each process's devices are neighbours along its axes")
    return block
