"""Joining a multi-process job: JAX's own runtime (`jax.distributed`), no home-made process management.

`initialize()` is called once, before any computation, by `train.py`. It decides, in this order:
1. flags: `--coordinator-address HOST:PORT --num-processes N --process-id I` (e.g. two processes on one machine);
2. our environment spec, for launchers JAX cannot read without extra services (a Kubernetes indexed Job):
   `GRANITE_JAX_COORDINATOR=HOST:PORT`, `GRANITE_JAX_NUM_PROCESSES=N` and the process id from
   `GRANITE_JAX_PROCESS_ID` or, in an indexed Job, Kubernetes' own `JOB_COMPLETION_INDEX`;
3. a launcher that JAX's auto-detection (`jax/_src/clusters/`) reads, when it started several processes:
   Slurm `srun` (SLURM_NTASKS > 1), Open MPI `mpirun` (OMPI_COMM_WORLD_SIZE > 1), a Cloud TPU VM (TPU slice
   workers, GKE TPU pods): `jax.distributed.initialize()` with no arguments;
4. otherwise nothing: a single process.
A launcher whose variables are incomplete or inconsistent is an error naming the variable, not a hang.
On CPU the processes exchange collectives through gloo.

Failures are bounded in time. Joining waits at most `join_timeout_s` for the coordinator and every process
(then one error line naming the address). Once joined, every process sends heartbeats to the coordinator (a
background thread, independent of the work): a process that sends none for `peer_timeout_s` — killed,
evicted, its host gone — is declared dead, and JAX's distributed runtime then terminates every other process
(SIGABRT, exit 134, its log saying "Terminating process because the JAX distributed service detected fatal
errors ... another task died"), so no survivor waits in a collective. Re-submitting the job resumes it from
its last complete checkpoint (docs/training.md, "When a job fails").
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)

COORDINATOR = "GRANITE_JAX_COORDINATOR"
NUM_PROCESSES = "GRANITE_JAX_NUM_PROCESSES"
PROCESS_ID = "GRANITE_JAX_PROCESS_ID"
JOB_INDEX = "JOB_COMPLETION_INDEX"  # set by Kubernetes in every pod of a Job with completionMode: Indexed
# What JAX's SlurmCluster.is_env_present() requires besides SLURM_NTASKS (jax/_src/clusters/slurm_cluster.py);
# the SLURM_STEP_* variables exist only inside a job step, i.e. under `srun`.
SLURM_NEEDS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
# What JAX's OmpiCluster reads (jax/_src/clusters/ompi_cluster.py): the URI only Open MPI's ORTE mpirun sets.
OMPI_NEEDS = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")


def _env_int(name: str, environ: Mapping[str, str]) -> int | None:
    """The integer value of environment variable `name`, None when unset; an error naming it when not a number."""
    value = environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _check_rank(id_name: str, process_id: int, count_name: str, count: int) -> None:
    """A process id must lie in [0, count): otherwise the job would wait for a process that never comes."""
    if count < 1:
        raise ValueError(f"{count_name}={count} must be at least 1")
    if not 0 <= process_id < count:
        raise ValueError(f"{id_name}={process_id} must be in [0, {count_name}={count})")


def env_spec(environ: Mapping[str, str] = os.environ) -> tuple[str, int, int] | None:
    """(coordinator address, number of processes, process id) from our GRANITE_JAX_* variables, or None.

    For a Kubernetes indexed Job: Kubernetes sets JOB_COMPLETION_INDEX in each pod, and the manifest sets the
    coordinator (pod 0's stable DNS name through the headless service) and the count. JAX's own Kubernetes
    detection would need the `kubernetes` package and a service account allowed to read pods and jobs.
    """
    coordinator, count = environ.get(COORDINATOR), _env_int(NUM_PROCESSES, environ)
    if coordinator is None and count is None:
        return None
    if coordinator is None or count is None:
        missing, given = (COORDINATOR, NUM_PROCESSES) if coordinator is None else (NUM_PROCESSES, COORDINATOR)
        raise ValueError(f"{given}={environ[given]!r} is set but {missing} is not: they go together")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{COORDINATOR}={coordinator!r} must be HOST:PORT, e.g. granite-0.granite:8476")
    ids = {name: _env_int(name, environ) for name in (PROCESS_ID, JOB_INDEX) if name in environ}
    if not ids:
        raise ValueError(f"{COORDINATOR} is set but neither {PROCESS_ID} nor {JOB_INDEX} (set by Kubernetes in "
                         "an indexed Job) says which process this is")
    if len(set(ids.values())) > 1:
        raise ValueError(f"{PROCESS_ID}={ids[PROCESS_ID]} and {JOB_INDEX}={ids[JOB_INDEX]} disagree")
    id_name, process_id = next(iter(ids.items()))
    _check_rank(id_name, process_id, NUM_PROCESSES, count)
    return coordinator, count, process_id


def _on_cloud_tpu_vm(environ: Mapping[str, str]) -> bool:
    """Whether JAX found TPU chips and libtpu at import: the condition of its TPU detection (GCE TPU VMs read
    the worker list from the metadata server, GKE TPU pods from TPU_WORKER_HOSTNAMES and TPU_WORKER_ID).
    The flag is private to JAX (jax/_src/cloud_tpu_init.py), hence read defensively. A run kept off the TPU
    (JAX_PLATFORMS=cpu: `--topology` / `--simulate-devices` dry runs) is no part of the slice's job."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms:
        return False
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def cluster_launcher(environ: Mapping[str, str] = os.environ) -> str | None:
    """The launcher, detected by JAX itself, that started this process among several: "slurm", "ompi" or
    "tpu"; None for none. An error names the variable that JAX would miss or that contradicts the others."""
    ntasks = _env_int("SLURM_NTASKS", environ)
    if ntasks is not None and ntasks > 1:
        _require("SLURM_NTASKS", ntasks, SLURM_NEEDS, environ,
                 "start train.py with srun (srun --ntasks=1 for one process)")
        _check_rank("SLURM_PROCID", _env_int("SLURM_PROCID", environ), "SLURM_NTASKS", ntasks)
        _env_int("SLURM_JOB_ID", environ)  # JAX derives the coordinator's port from it
        return "slurm"
    size = _env_int("OMPI_COMM_WORLD_SIZE", environ)
    if size is not None and size > 1:
        _require("OMPI_COMM_WORLD_SIZE", size, OMPI_NEEDS, environ,
                 f"JAX reads it from Open MPI's mpirun (ORTE); otherwise set {COORDINATOR} and {NUM_PROCESSES}")
        _check_rank("OMPI_COMM_WORLD_RANK", _env_int("OMPI_COMM_WORLD_RANK", environ), "OMPI_COMM_WORLD_SIZE",
                    size)
        return "ompi"
    return "tpu" if _on_cloud_tpu_vm(environ) else None


def _require(count_name: str, count: int, names: tuple[str, ...], environ: Mapping[str, str], hint: str) -> None:
    """Every variable of `names` is set: a launcher that says several processes but lacks one is an error."""
    missing = [name for name in names if name not in environ]
    if missing:
        raise ValueError(f"{count_name}={count} says this is one of several processes, but {missing[0]} is not "
                         f"set: {hint}")


PEER_TIMEOUT_S = 60  # no heartbeat for this long: the process is dead (JAX's own default: 100)
JOIN_TIMEOUT_S = 300  # JAX's default: how long to wait for the coordinator and every process to join


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Wait until `address` (HOST:PORT) accepts connections, up to `timeout_s`: JAX's own join would abort the
    process from C++ with a message blaming "another task" when the coordinator never answers."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"could not reach the coordinator at {address} within {timeout_s} s "
                                   f"(--join-timeout; {e.strerror or e}): is process 0 running, and is its address "
                                   "reachable from this host?") from None
            time.sleep(0.5)


def _join(coordinator_address, timeouts: dict, process_id: int | None = None, **kwargs) -> None:
    """`jax.distributed.initialize`, a failure to join as one error line naming the coordinator."""
    if coordinator_address is not None and process_id not in (None, 0):  # process 0 serves the address
        _wait_for_coordinator(coordinator_address, timeouts["join"])
    if process_id is not None:
        kwargs["process_id"] = process_id
    try:
        jax.distributed.initialize(coordinator_address, **kwargs, initialization_timeout=timeouts["join"],
                                   heartbeat_timeout_seconds=timeouts["peer"])
    except jax.errors.JaxRuntimeError as e:
        where = coordinator_address or "the launcher's coordinator"
        reason = str(e).strip().splitlines()[0][:200]
        raise RuntimeError(f"could not join the job through {where} within {timeouts['join']} s "
                           f"(--join-timeout): is process 0 running and its address reachable from this host? "
                           f"({reason})") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, peer_timeout_s: int = PEER_TIMEOUT_S,
               join_timeout_s: int = JOIN_TIMEOUT_S) -> str | None:
    """Join the job this process is part of (see the module's docstring for the order); returns how it joined
    ("flags", the name of the variable spec or launcher) or None for a single process."""
    for name, value in (("--peer-timeout", peer_timeout_s), ("--join-timeout", join_timeout_s)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r}: expected a whole number of seconds >= 1")
    timeouts = {"peer": peer_timeout_s, "join": join_timeout_s}
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("--coordinator-address, --num-processes and --process-id go together "
                         f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    how = "flags"
    if coordinator_address is None:
        spec = env_spec()
        if spec is not None:
            (coordinator_address, num_processes, process_id), how = spec, COORDINATOR
    if coordinator_address is not None:
        _check_rank("--process-id", process_id, "--num-processes", num_processes)
        _use_gloo_on_cpu()
        # explicit values are used as given: JAX's detection would still restrict GPUs to SLURM_LOCALID's
        _join(coordinator_address, timeouts, num_processes=num_processes, process_id=process_id,
              cluster_detection_method="deactivate")
        return how
    launcher = cluster_launcher()
    if launcher is None:
        if JOB_INDEX in os.environ:
            log.warning("%s=%s is set but %s is not: running as a single process (an indexed Job of several "
                        "workers sets %s and %s)", JOB_INDEX, os.environ[JOB_INDEX], COORDINATOR, COORDINATOR,
                        NUM_PROCESSES)
        return None
    _use_gloo_on_cpu()
    _join(None, timeouts)
    return launcher


def _use_gloo_on_cpu() -> None:
    """CPU collectives across processes go through gloo (the setting is read only by the CPU backend)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


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


def allgather_json(value) -> list:
    """`value` (JSON-serialisable) of every process, in process order: a collective, every process must call it."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int64(raw.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n])) for row, n in zip(gathered, lengths)]


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that is free now: the coordinator port of processes launched on one host (tests,
    benchmarks). Another program may take it before the coordinator binds it; one host's launches are short."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
