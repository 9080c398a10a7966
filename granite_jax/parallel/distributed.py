"""Joining a multi-process job: JAX's own runtime (`jax.distributed`), no home-made process management.

`initialize()` is called once, before any computation, by `train.py`:
- explicit coordinator address / process count / process id (flags): e.g. two processes on one machine;
- launched by a cluster launcher that JAX detects itself (TPU pod slices, Slurm with several tasks, Open MPI):
  `jax.distributed.initialize()` with no arguments;
- otherwise nothing: a single process.
On CPU the processes exchange collectives through gloo.
"""

from __future__ import annotations

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
