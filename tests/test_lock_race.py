"""The run lock under contention: when several processes take over the same stale lock (one naming a process that
has ended on this host) at the same moment, exactly one of them gets it and the others are refused with its pid,
in every trial."""

import importlib.util
import json
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import time
import types

CONTENDERS = 8
TRIALS = 200
TIMEOUT_S = 60


def _import_run_dir(package_dir: str):
    """granite_jax.run_dir without the package's __init__ (which configures XLA and imports JAX and Flax: seconds per
    process, times eight contenders on a few cores); run_dir needs only granite_jax.storage, also stdlib-only."""
    package = types.ModuleType("granite_jax")
    package.__path__ = [package_dir]
    sys.modules.setdefault("granite_jax", package)
    import granite_jax.run_dir

    return granite_jax.run_dir


def _contend(package_dir, paths, start, looked, results):
    """One contender: for each trial, start together with the others and try the trial's lock. What it takes it
    holds until the test has read every lock file, so a winner holds its lock while the others try."""
    run_dir = _import_run_dir(package_dir)
    held = []
    for trial, path in enumerate(paths):
        start.wait(timeout=TIMEOUT_S)  # all contenders try this trial's lock at the same moment
        try:
            held.append(run_dir.RunLock(path).acquire())
            results.put((trial, os.getpid(), True, ""))
        except run_dir.RunDirError as e:
            results.put((trial, os.getpid(), False, str(e)))
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            results.put((trial, os.getpid(), False, f"unexpected {type(e).__name__}: {e}"))
    looked.wait(timeout=TIMEOUT_S)  # the test has read the lock files
    for lock in held:
        lock.release()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _holder(path: str) -> int | None:
    try:
        with open(path) as f:
            return json.load(f)["pid"]
    except FileNotFoundError:  # a contender removed the lock another had just made
        return None


def _results(processes, results, count: int) -> list:
    """`count` results from the contenders; fails at once if one of them stopped."""
    got, deadline = [], time.monotonic() + 2 * TIMEOUT_S
    while len(got) < count:
        try:
            got.append(results.get(timeout=1))
        except queue.Empty:
            assert all(p.exitcode is None for p in processes) and time.monotonic() < deadline, \
                f"a contender stopped: exit codes {[p.exitcode for p in processes]}, {len(got)} results of {count}"
    return got


def test_exactly_one_of_several_processes_takes_over_a_stale_lock(tmp_path):
    dead, host = _dead_pid(), socket.gethostname()
    paths = [str(tmp_path / f"trial-{t}" / "run.lock") for t in range(TRIALS)]
    for path in paths:
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            json.dump({"pid": dead, "host": host, "since": "2000-01-01T00:00:00+00:00"}, f)

    package_dir = importlib.util.find_spec("granite_jax").submodule_search_locations[0]
    context = multiprocessing.get_context("spawn")
    start, looked, results = context.Barrier(CONTENDERS), context.Event(), context.Queue()
    processes = [context.Process(target=_contend, args=(package_dir, paths, start, looked, results), daemon=True)
                 for _ in range(CONTENDERS)]
    for process in processes:
        process.start()
    try:
        tried = _results(processes, results, CONTENDERS * TRIALS)
        holders = [_holder(path) for path in paths]
    finally:
        start.abort()  # contenders still waiting (this test failed early) stop at once
        looked.set()
        for process in processes:
            process.join(timeout=TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
    assert [p.exitcode for p in processes] == [0] * CONTENDERS

    winners = [[pid for t, pid, acquired, _ in tried if t == trial and acquired] for trial in range(TRIALS)]
    # A trial fails when several contenders took the lock, or one did but another then removed its lock file (the
    # directory unlocked while its holder runs).
    bad = [(trial, winners[trial], holders[trial]) for trial in range(TRIALS)
           if len(winners[trial]) != 1 or holders[trial] != winners[trial][0]]
    assert not bad, (f"{len(bad)} of {TRIALS} trials did not end with exactly one of {CONTENDERS} processes holding "
                     f"the stale lock it took over (trial, winners, pid in the lock file): {bad}")
    for t, _, acquired, message in tried:
        assert acquired or f"in use by process {winners[t][0]} on this host" in message, (t, message)
    left = {trial: os.listdir(os.path.dirname(path)) for trial, path in enumerate(paths)
            if os.listdir(os.path.dirname(path))}
    assert not left, f"left in the run directories after the locks were released: {left}"
