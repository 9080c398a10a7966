"""benchmarks/accelerator_step.py runs: its CPU smoke mode measures every option of its case and appends one
result line per option (the GPU/TPU cases run the same code with other presets and options)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_the_accelerator_benchmark_smoke_mode_measures_every_option(tmp_path):
    out = tmp_path / "results.jsonl"
    command = ["benchmarks/accelerator_step.py", "--smoke", "--steps", "1", "--out", str(out)]  # 1 timed step
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["option"] for r in results] == ["tiled", "xla ragged_dot"], results
    for r in results:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["model_tflop_per_step"] > 0 and 0 < r["mfu"] < 1, r
        assert r["peak_host_rss_gib"] > 0 and r["platform"] == "cpu" and r["jax"], r
    # the same steps on the same batch: the two grouped matmuls give the same loss (bf16 rounding apart)
    assert abs(results[0]["loss"] - results[1]["loss"]) < 2e-3 * abs(results[0]["loss"]), results
    assert "tiny MoE 128: xla ragged_dot / tiled = " in proc.stdout
