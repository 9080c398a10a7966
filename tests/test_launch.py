"""Joining a job the way cluster launchers start one: no --coordinator-address flags, only the environment
variables that Slurm's `srun` or a Kubernetes indexed Job sets (two local processes x 2 virtual CPU devices,
whose losses must be those of one process training the same rows); inconsistent variables; and what a job does
when its coordinator cannot be reached or one of its processes is lost."""

from __future__ import annotations

import os
import random
import socket
import time

import numpy as np
import pytest
from conftest import (
    LAUNCH_RUN,
    ROOT,
    SIGKILL,
    TINY_MODEL,
    TINY_RUN,
    TWO_STREAMS,
    checkpoint_steps,
    data_position,
    finish,
    launch_processes,
    metrics,
    python_process,
    virtual_cpu_devices,
)

from granite_jax.parallel.distributed import cluster_launcher, env_spec, free_local_port
from granite_jax.parallel.supervise import PEER_LOST_EXIT, SUPERVISED

ROWS = ["data.streams=2", "data.batch_size=4", "data.seq_len=64", TINY_MODEL]
SETTINGS = [*ROWS, "mesh={data: 2, fsdp: 2}"]
LAUNCHER_VARIABLES = ("SLURM_", "OMPI_", "GRANITE_JAX_", "JOB_COMPLETION_INDEX", "JAX_COORDINATOR", "TPU_WORKER")
# A train.py of several processes runs as a parent and its child (`parallel/supervise.py`): 2 Python processes
# importing granite_jax. Where no check reads what the parent adds (the srun test's survivor: exit 75 and its
# line; exit codes and stderr passing through: test_supervise.py), train.py starts as the child would, with this
# variable set: one process, some 4 s less each on the 2-core machine.
UNSUPERVISED = {SUPERVISED: "1"}


@pytest.fixture(autouse=True)
def _no_outer_launcher(monkeypatch):
    """The launchers' variables of the shell running the tests (e.g. a Slurm job) must not leak in."""
    for name in list(os.environ):
        if name.startswith(LAUNCHER_VARIABLES):
            monkeypatch.delenv(name)


def _free_slurm_port() -> int:
    """A free port in the range JAX's Slurm detection derives from the job id: 61440 + SLURM_JOB_ID % 4096."""
    for port in random.sample(range(65535 - 2**12 + 1, 65536), 200):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 61440..65535")


def srun_variables(tasks: int):
    """Process index -> what `srun --ntasks=TASKS` on one node sets, as JAX's SlurmCluster reads it
    (jax/_src/clusters/slurm_cluster.py): the coordinator is the first host of SLURM_STEP_NODELIST, its port
    61440 + the job id mod 4096 (no JAX_COORDINATOR_PORT here: the job id is chosen to land on a free port)."""
    job_id = 7 * 2**12 + _free_slurm_port() - (65535 - 2**12 + 1)
    return lambda i: {"SLURM_JOB_ID": str(job_id), "SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(i),
                      "SLURM_LOCALID": str(i), "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "localhost",
                      "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1"}


@pytest.mark.slow
def test_a_kubernetes_indexed_job_joins_with_a_context_axis_across_its_processes(tmp_path, reference_losses):
    """An indexed Job's pods join with the variables the manifest and Kubernetes set (JOB_COMPLETION_INDEX, the
    coordinator and the count: scripts/launch/k8s-indexed-job.yaml; nothing asks the Kubernetes API), as 2
    processes x 2 CPU devices with `context: 4` (zigzag) spanning both: every row is split over the processes,
    each process reads the same rows (one stream) and keeps its slice of the positions; the losses equal one
    process training the unsplit rows, and the checkpoint holds the one stream's position."""
    rows = ["data.batch_size=2", "data.seq_len=128",
            "model_overrides={num_hidden_layers: 2, layer_types: [mamba, attention], mamba_chunk_size: 16}"]
    one, _ = reference_losses("steps=2", *rows, *LAUNCH_RUN)
    port = free_local_port()

    def indexed_job(i):
        return {"JOB_COMPLETION_INDEX": str(i), "GRANITE_JAX_COORDINATOR": f"localhost:{port}",
                "GRANITE_JAX_NUM_PROCESSES": "2", **UNSUPERVISED}

    outputs = launch_processes(tmp_path, steps=2, processes=2, settings=[*rows, "mesh={context: 4}",
                                                                        "context_layout=zigzag"],
                               devices=4, launcher=indexed_job)
    assert "joined 2 processes (GRANITE_JAX_COORDINATOR): 4 devices, 2 per process" in outputs[0]
    two = metrics(tmp_path)
    assert len(one) == 2 and len(two) == 2
    np.testing.assert_allclose(two, one, rtol=2e-5)
    assert list(data_position(tmp_path, 2)["streams"]) == ["0"]  # both processes read the one stream


SRUN = {"SLURM_JOB_ID": "12", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "node[001-002]"}


@pytest.mark.parametrize("environ, message", [
    ({**SRUN, "SLURM_STEP_NODELIST": None}, "SLURM_NTASKS=2 says this is one of several processes, but "
                                            "SLURM_STEP_NODELIST is not set: start train.py with srun"),
    ({**SRUN, "SLURM_PROCID": "2"}, r"SLURM_PROCID=2 must be in \[0, SLURM_NTASKS=2\)"),
    ({**SRUN, "SLURM_NTASKS": "two"}, "environment variable SLURM_NTASKS='two' is not an integer"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"},
     "OMPI_COMM_WORLD_SIZE=4 says .* but OMPI_MCA_orte_hnp_uri is not set"),
    ({"GRANITE_JAX_COORDINATOR": "job-0.job:8476"}, "GRANITE_JAX_COORDINATOR='job-0.job:8476' is set but "
                                                    "GRANITE_JAX_NUM_PROCESSES is not"),
    ({"GRANITE_JAX_COORDINATOR": "job-0.job", "GRANITE_JAX_NUM_PROCESSES": "2", "JOB_COMPLETION_INDEX": "0"},
     "GRANITE_JAX_COORDINATOR='job-0.job' must be HOST:PORT"),
    ({"GRANITE_JAX_COORDINATOR": "job-0.job:8476", "GRANITE_JAX_NUM_PROCESSES": "2"},
     "neither GRANITE_JAX_PROCESS_ID nor JOB_COMPLETION_INDEX"),
    ({"GRANITE_JAX_COORDINATOR": "job-0.job:8476", "GRANITE_JAX_NUM_PROCESSES": "2", "JOB_COMPLETION_INDEX": "2"},
     r"JOB_COMPLETION_INDEX=2 must be in \[0, GRANITE_JAX_NUM_PROCESSES=2\)"),
    ({"GRANITE_JAX_COORDINATOR": "job-0.job:8476", "GRANITE_JAX_NUM_PROCESSES": "2", "JOB_COMPLETION_INDEX": "1",
      "GRANITE_JAX_PROCESS_ID": "0"}, "GRANITE_JAX_PROCESS_ID=0 and JOB_COMPLETION_INDEX=1 disagree"),
])
def test_inconsistent_launcher_variables_are_errors_naming_them(environ, message):
    environ = {k: v for k, v in environ.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        env_spec(environ)
        cluster_launcher(environ)


def test_launcher_detection_without_a_job():
    """One task, a single-pod Job or no launcher at all: a single process; srun with 2 tasks: Slurm."""
    assert cluster_launcher({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert env_spec({"JOB_COMPLETION_INDEX": "0"}) is None and cluster_launcher({"JOB_COMPLETION_INDEX": "0"}) is None
    assert cluster_launcher(SRUN) == "slurm"
    assert env_spec({"GRANITE_JAX_COORDINATOR": "j-0.j:1", "GRANITE_JAX_NUM_PROCESSES": "3",
                     "GRANITE_JAX_PROCESS_ID": "2"}) == ("j-0.j:1", 3, 2)


# ----------------------------------------------------------------------------- failures: bounded, clearly said
def _train_process(i: int, port: int, run_dir, *flags):
    return python_process(ROOT / "train.py", f"--coordinator-address=127.0.0.1:{port}", "--num-processes=2",
                          f"--process-id={i}", *flags, f"run_dir={run_dir}", *TINY_RUN, *SETTINGS, "steps=400",
                          "log_every=1", env={**virtual_cpu_devices(2), "PYTHONUNBUFFERED": "1", **UNSUPERVISED})


def test_an_unreachable_coordinator_is_one_error_line_within_the_join_timeout(tmp_path):
    started = time.monotonic()
    done = finish(_train_process(1, free_local_port(), tmp_path / "run", "--join-timeout=3"), timeout=120)
    assert done.returncode == 2 and time.monotonic() - started < 60, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: could not reach the coordinator at 127.0.0.1:")
    assert "within 3 s (--join-timeout" in done.stderr and "Traceback" not in done.stderr


# `python -c` code that runs the script of its argv (train.py) and SIGKILLs itself as soon as a file matching PATTERN
# exists (the temporary directory of a checkpoint being saved).
_DIE_WHEN = """
import glob, os, runpy, signal, sys, threading, time
def die_when_it_exists():
    while not glob.glob({pattern!r}):
        time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGKILL)
threading.Thread(target=die_when_it_exists, daemon=True).start()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_an_srun_job_that_loses_a_process_while_saving_ends_and_resumes_on_another_mesh(tmp_path, reference_losses):
    """2 processes x 2 CPU devices (`{fsdp: 4}`, one data stream per process by default) join with only the
    variables `srun --ntasks=2` sets (`srun_variables`: no --coordinator-address flags) and train; process 1 is
    SIGKILLed as the save of step 4 begins. Process 0 does not wait in a collective: it exits 75 within
    --peer-timeout (5 s here) plus the time to notice, its last line naming the lost process and saying what to
    do (JAX's runtime aborts it; train.py's parent says why, `parallel/supervise.py`). The half-saved step 4 is
    not a checkpoint. Re-submitted as one process on 2 devices (`{fsdp: 2}`), the job resumes from step 2:
    parameters and optimizer state restore onto the new shardings and both streams go on where they stopped
    (positions are saved per stream, not per process), so the losses equal one process reading the two
    streams straight through (on its one device; meshes give the one-device losses)."""
    one, _ = reference_losses("steps=4", *TWO_STREAMS, *LAUNCH_RUN)
    rows = [r for r in TWO_STREAMS if not r.startswith("data.streams")]  # the default: one stream per process
    run_dir, srun = tmp_path / "run", srun_variables(tasks=2)
    flags = ["--peer-timeout=5", f"run_dir={run_dir}", "steps=6", *rows, "mesh={fsdp: 4}", *LAUNCH_RUN]
    env = lambda i: {**virtual_cpu_devices(2), "PYTHONUNBUFFERED": "1", **srun(i)}  # noqa: E731
    survivor = python_process(ROOT / "train.py", *flags, env=env(0))
    # The lost process needs no parent: it is killed (its own parent's line is not what is checked here).
    victim = python_process("-c", _DIE_WHEN.format(pattern=f"{run_dir}/checkpoints/4.orbax-checkpoint-tmp*"),
                            ROOT / "train.py", *flags, env={**env(1), **UNSUPERVISED})
    assert finish(victim, timeout=600).returncode == -SIGKILL
    died = time.monotonic()
    done = finish(survivor, timeout=300)
    assert done.returncode == PEER_LOST_EXIT and time.monotonic() - died < 60, (done.returncode, done.stderr[-3000:])
    assert "joined 2 processes (slurm): 4 devices, 2 per process" in done.output
    assert done.stderr.strip().splitlines()[-1] == (
        "error: process 1 of the job sent no heartbeat for --peer-timeout, so this process stopped too (JAX's "
        "distributed runtime ends the job when one process is lost). Re-submit the whole job: it resumes from its "
        "newest complete checkpoint")
    assert checkpoint_steps(run_dir) == [2]
    assert any(name.startswith("4.orbax-checkpoint-tmp") for name in os.listdir(run_dir / "checkpoints"))
    position = data_position(run_dir, 2)  # both processes' streams, saved by process 0
    assert position["count"] == 2 and sorted(position["streams"]) == ["0", "1"]
    assert not (run_dir / "checkpoints" / "2" / "data").exists()  # no per-process files
    output = launch_processes(run_dir, steps=4, processes=1, settings=[*rows, "mesh={fsdp: 2}"], devices=2)[0]
    assert f"resumed from {run_dir}/checkpoints/2" in output
    np.testing.assert_allclose(metrics(run_dir), one, rtol=2e-5)
