"""The XLA flags a granite_jax program adds before JAX starts (granite_jax/runtime.py), and a library import
that adds none."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from granite_jax.runtime import configure_xla_flags


@pytest.mark.parametrize("flags, expected, absent", [
    ("", ["--xla_cpu_enable_concurrency_optimized_scheduler=false",
          "--xla_cpu_collective_call_terminate_timeout_seconds=1800"], ["ynn_fusion_type"]),
    ("--xla_force_host_platform_device_count=8", ["--xla_cpu_experimental_ynn_fusion_type= ",
                                                  "--xla_force_host_platform_device_count=8"], []),
    ("--xla_force_host_platform_device_count=1", [], ["ynn_fusion_type"]),
    ("--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=60",
     ["terminate_timeout_seconds=60"], ["terminate_timeout_seconds=1800"]),
])
def test_cpu_defaults_are_added_unless_set(monkeypatch, flags, expected, absent):
    """The CPU defaults join the user's XLA_FLAGS; a flag the user set keeps the user's value; YNNPACK fusions go
    off only when the process simulates several devices."""
    monkeypatch.setenv("XLA_FLAGS", flags)
    configure_xla_flags()
    added = os.environ["XLA_FLAGS"] + " "
    for piece in expected:
        assert piece in added, added
    for piece in absent:
        assert piece not in added, added



# Every module of the package, imported after the libraries it uses (jax, orbax and lm_eval set variables of
# their own).
_IMPORT_EVERYTHING = """
import os, pkgutil, importlib, json
import jax, flax, optax, orbax.checkpoint, grain, lm_eval
before = dict(os.environ)
import granite_jax
for module in pkgutil.walk_packages(granite_jax.__path__, "granite_jax."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)
from jax._src import xla_bridge
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps([changed, sorted(xla_bridge._backends)]))
"""


def test_importing_granite_jax_changes_no_environment_variable_and_starts_no_backend():
    """A library import leaves the process's settings alone: no environment variable changes, and no JAX backend
    starts (so a program's `configure_process()` at its start still takes effect after its imports)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    changed, backends = json.loads(done.stdout.splitlines()[-1])
    assert changed == [] and backends == [], (changed, backends)
