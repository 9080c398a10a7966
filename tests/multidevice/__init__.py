"""Checks that need several (virtual CPU) devices. XLA's device count is fixed when JAX starts, so they run in a
subprocess with XLA_FLAGS set by the test harness (tests/conftest.py: `run_multidevice`):
`python -m tests.multidevice JOBS` runs several of these modules' `main()` in turn in one process, each job
reporting its result as one JSON line."""

import json

# The job being run by tests/multidevice/__main__.py: (name, JSON argument).
current = {"name": None, "argument": None}


def report(result) -> None:
    print("RESULT " + json.dumps([current["name"], result]), flush=True)


def arguments():
    """The JSON argument the test gave this job (None without one)."""
    return current["argument"]
