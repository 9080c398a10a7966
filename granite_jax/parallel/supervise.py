"""One process of a multi-process job, run under a small parent that says in one line why the job ended.

When a process of a job dies (killed, evicted, its host gone), JAX's distributed runtime ends every other
process from C++: SIGABRT once the dead process has sent no heartbeat for `--peer-timeout`, at once when the
dead one is process 0 (the coordinator), with a multi-line log of its own ("Terminating process because the JAX
distributed service detected fatal errors ..."). No Python code of the aborted process runs any more, so
`train.py`, in a job of several processes, does its work in a child process and waits for it:

- the child's stderr passes through the parent unchanged (its stdout is the parent's own);
- when the child is ended that way, the parent prints one `error:` line naming the lost process and saying
  what to do (re-submit the job: it resumes from its newest complete checkpoint) and exits PEER_LOST_EXIT;
- otherwise the parent exits with the child's code (128 + N when signal N ended it);
- SIGTERM, SIGINT and SIGHUP sent to the parent are passed on to the child, which checkpoints and stops. The
  child runs in its own process group, so a terminal's Ctrl-C reaches it once, through the parent; a launcher
  that signals every process of the job reaches it twice at once, which it counts as one signal;
- the child dies with the parent (Linux: PR_SET_PDEATHSIG), so killing the process a launcher started kills
  the work too, and no orphan keeps the run directory locked.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

SUPERVISED = "GRANITE_JAX_SUPERVISED"  # set in the child: it does the work itself
PEER_LOST_EXIT = 75  # EX_TEMPFAIL: the job can be re-submitted as it is
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
JAX_ABORT = "Terminating process because the JAX distributed service detected fatal errors"
_TAIL = 1 << 16  # bytes of the child's stderr kept to read JAX's reason from


def job_of_several(flags: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is one of a job of several, as far as it can be told without JAX: the
    --coordinator-address flags, our GRANITE_JAX_* variables, Slurm's srun or Open MPI's mpirun with more than
    one task. (A Cloud TPU slice is found by JAX itself, which would have to be imported: its processes run
    unsupervised, and JAX's own message stands when one of them dies.)"""
    if flags or environ.get("GRANITE_JAX_COORDINATOR"):
        return True
    for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        value = environ.get(count, "")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def supervised() -> bool:
    return os.environ.get(SUPERVISED) == "1"


def lost_peer_line(stderr_tail: str) -> str | None:
    """Our one line for a child that JAX's runtime ended because another process of the job died (None when its
    stderr does not show that)."""
    if JAX_ABORT not in stderr_tail:
        return None
    unhealthy = re.search(r"stopped sending heartbeats\):\s*((?:\d+[\s,]*)+)", stderr_tail)
    if unhealthy:
        ids = ", ".join(re.findall(r"\d+", unhealthy.group(1)))
        lost = f"process {ids} of the job sent no heartbeat for --peer-timeout"
    elif "leader task" in stderr_tail or "Failed to send RPC to coordination service" in stderr_tail:
        lost = "process 0 of the job (the coordinator) stopped answering"
    else:
        lost = "another process of the job failed"
    return (f"error: {lost}, so this process stopped too (JAX's distributed runtime ends the job when one "
            "process is lost). Re-submit the whole job: it resumes from its newest complete checkpoint")


def _die_with_parent() -> None:
    """In the child, before it runs: SIGKILL when the parent dies (Linux; elsewhere nothing)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_supervised(command: Sequence[str]) -> int:
    """Run `command` (this script again) as the child described above; returns the exit code to leave with."""
    child = subprocess.Popen(command, env={**os.environ, SUPERVISED: "1"}, stderr=subprocess.PIPE,
                             process_group=0, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    previous = {sig: signal.signal(sig, lambda signum, _frame: child.send_signal(signum)) for sig in FORWARDED}
    tail = b""
    try:
        while chunk := os.read(child.stderr.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail = (tail + chunk)[-_TAIL:]
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == -signal.SIGABRT and (line := lost_peer_line(tail.decode(errors="replace"))):
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
        return PEER_LOST_EXIT
    return 128 - code if code < 0 else code
