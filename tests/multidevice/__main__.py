"""`python -m tests.multidevice '{"job name": ["module", argument], ...}'`: run each job's
`tests.multidevice.MODULE.main()` in turn in this one process (sharing its devices, imports and compiled
programs), printing `RESULT [name, result]` per job, or `FAILED [name, traceback]` and going on to the next."""

import importlib
import json
import sys
import time
import traceback

from granite_jax.runtime import configure_process
from tests import multidevice


def main() -> int:
    configure_process()  # what train.py does at its start: our CPU defaults, before JAX starts
    jobs = json.loads(sys.argv[1])
    failed = 0
    for name, (module, argument) in jobs.items():
        multidevice.current.update(name=name, argument=argument)
        started = time.monotonic()
        try:
            importlib.import_module(f"tests.multidevice.{module}").main()
        except BaseException:  # noqa: B036 - one job's failure (even a SystemExit) must not hide the others'
            failed += 1
            print("FAILED " + json.dumps([name, traceback.format_exc()]), flush=True)
        print(f"job {name}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
