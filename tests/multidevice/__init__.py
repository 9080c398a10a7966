"""Code that needs several (virtual CPU) devices. XLA's device count is fixed when JAX starts, so each module
runs in its own process, `python -m tests.multidevice.NAME [JSON args]` with XLA_FLAGS set by the test
(tests/test_parallel.py), and prints its result as one JSON line after `RESULT `."""

import json
import sys


def report(result) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def arguments():
    """The JSON argument the test passed (None without one)."""
    return json.loads(sys.argv[1]) if len(sys.argv) > 1 else None
