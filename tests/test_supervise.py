"""A multi-process job's process under train.py's parent (`parallel/supervise.py`): JAX's abort when a peer is
lost becomes one line and exit 75, signals reach the child once, the child dies with the parent. The children
here are small Python scripts that behave as the aborted or signalled trainer does; the two-process jobs that
lose a process for real are in test_launch.py."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import finish, python_process

from granite_jax.parallel import supervise
from granite_jax.parallel.supervise import PEER_LOST_EXIT, job_of_several, lost_peer_line
from granite_jax.train.hooks import StopSignal

# What JAX 0.10.2's runtime writes before it aborts a survivor (abridged from real runs, test_launch.py).
HEARTBEAT_ABORT = """F1206 21:42:17.146939   22448 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. This most likely indicates that another task died; see the other task logs for more \
details. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error."""
COORDINATOR_ABORT = """F1206 21:42:37.143546   22607 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the \
leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues."""


@pytest.mark.parametrize("stderr, expected", [
    (HEARTBEAT_ABORT, "error: process 1 of the job sent no heartbeat for --peer-timeout, so this process stopped"),
    (COORDINATOR_ABORT, "error: process 0 of the job (the coordinator) stopped answering, so this process stopped"),
    ("F1206 client.h:80] Terminating process because the JAX distributed service detected fatal errors. x",
     "error: another process of the job failed, so this process stopped"),
    ("F1206 some_pass.cc:12] Check failed: shape", None)])
def test_the_lost_peer_line_names_the_lost_process(stderr, expected):
    line = lost_peer_line(stderr)
    assert line == expected if expected is None else line.startswith(expected)
    if expected:
        assert line.endswith("Re-submit the whole job: it resumes from its newest complete checkpoint")


def test_a_job_of_several_is_told_from_flags_and_launcher_variables():
    assert job_of_several(True, {})
    assert job_of_several(False, {"GRANITE_JAX_COORDINATOR": "h:1"})
    assert job_of_several(False, {"SLURM_NTASKS": "2"}) and not job_of_several(False, {"SLURM_NTASKS": "1"})
    assert job_of_several(False, {"OMPI_COMM_WORLD_SIZE": "4"}) and not job_of_several(False, {})


def _supervise(child: str):
    """A parent (`run_supervised`, as train.py runs it) of `python -c CHILD`. The parent loads supervise.py by its
    path (it needs only the standard library): importing it as granite_jax.parallel.supervise would import the
    whole package (JAX included) first, some 4 s per parent on the 2-core machine."""
    parent = ("import importlib.util, sys; "
              f"spec = importlib.util.spec_from_file_location('supervise', {supervise.__file__!r}); "
              "supervise = importlib.util.module_from_spec(spec); spec.loader.exec_module(supervise); "
              f"sys.exit(supervise.run_supervised([sys.executable, '-c', {child!r}]))")
    return python_process("-c", parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _child_pid(parent) -> int:
    return int(parent.stdout.readline().split()[1])  # the child's first line: "child PID"


def test_a_child_aborted_by_jax_for_a_lost_peer_ends_with_one_line_and_exit_75():
    child = (f"import os, sys; sys.stderr.write({HEARTBEAT_ABORT!r} + '\\n'); sys.stderr.flush(); os.abort()")
    done = finish(_supervise(child), timeout=120)
    assert done.returncode == PEER_LOST_EXIT, done.stderr
    assert HEARTBEAT_ABORT.splitlines()[-1] in done.stderr  # JAX's own lines pass through
    assert done.stderr.strip().splitlines()[-1].startswith("error: process 1 of the job sent no heartbeat")


def test_other_ends_keep_their_exit_codes():
    assert finish(_supervise("import sys; sys.exit(2)"), timeout=120).returncode == 2
    aborted = finish(_supervise("import os; os.abort()"), timeout=120)  # not JAX's lost-peer abort: no line
    assert aborted.returncode == 128 + signal.SIGABRT and "error:" not in aborted.stderr


def test_a_signal_to_the_parent_reaches_the_child_once():
    child = ("import os, signal, sys, time; seen = []; signal.signal(signal.SIGTERM, lambda *a: seen.append(1)); "
             "print('child', os.getpid(), flush=True); time.sleep(3); print('signals', len(seen)); sys.exit(143)")
    parent = _supervise(child)
    _child_pid(parent)
    parent.send_signal(signal.SIGTERM)
    done = finish(parent, timeout=120)
    assert done.returncode == 143 and "signals 1" in done.stdout, done.output


def test_the_child_dies_with_the_parent():
    parent = _supervise("import os, time; print('child', os.getpid(), flush=True); time.sleep(120)")
    child = _child_pid(parent)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its parent")


def test_the_same_signal_twice_at_once_is_one_request(monkeypatch):
    """Slurm signals every process of a job step: a supervised trainer gets SIGTERM directly and from its parent.
    It stops after the step (saving), as for one signal; a later second signal would stop it at once."""
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and exits == []
        stop._own_at -= 2.0  # as if the first came two seconds ago
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [128 + signal.SIGTERM]
