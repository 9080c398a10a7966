"""The XLA flags importing granite_jax adds before JAX starts (granite_jax/runtime.py)."""

import os

import pytest

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

