"""benchmarks/flops_breakdown.py: the compiled step's matmul FLOPs split by the model's named scopes, next to
`training_flops_by_component`."""

import importlib.util
import os
import sys

import pytest
from conftest import ROOT

from granite_jax import load_preset
from granite_jax.model.flops import training_flops_by_component, training_flops_per_token


@pytest.mark.parametrize("preset", ["granite-4.0-h-tiny", "granite-4.0-h-small", "granite-4.0-350m",
                                    "tiny-hybrid-moe"])
def test_flops_by_component_add_up_to_the_model_count(preset):
    config = load_preset(preset)
    for seq_len in (4096, 131072):
        parts = training_flops_by_component(config, seq_len)
        assert sum(parts.values()) == pytest.approx(training_flops_per_token(config, seq_len), rel=1e-12)


@pytest.mark.slow
def test_breakdown_of_the_tiny_models_step_adds_up_and_finds_the_projections():
    """On XLA:CPU (no libtpu needed): every executed matmul is charged to one component, the components add up
    to the dry run's `executed_matmul_flops`, and with full rematerialisation each projection outside the
    experts costs 4/3 of its model count (forward, recomputation, two gradients)."""
    spec = importlib.util.spec_from_file_location("flops_breakdown", os.path.join(ROOT, "benchmarks",
                                                                                  "flops_breakdown.py"))
    breakdown = importlib.util.module_from_spec(spec)
    sys.modules["flops_breakdown"] = breakdown
    spec.loader.exec_module(breakdown)
    from granite_jax.hlo import executed_matmul_flops
    from granite_jax.train import load_run_config
    from granite_jax.train.setup import build_run

    config = load_run_config(os.path.join(ROOT, "configs", "pretrain-tiny.yaml"), [
        "model_overrides={num_hidden_layers: 2, layer_types: [mamba, attention], remat_policy: full}",
        "data.batch_size=1", "data.seq_len=64"])
    run = build_run(config, abstract=True)
    hlo = run.lower_train_step().compile().as_text()
    tokens = config.data.batch_size * config.data.seq_len / run.mesh.devices.size
    model = {k: v * tokens for k, v in training_flops_by_component(run.model_config, 64).items()}
    records = breakdown.breakdown(hlo)
    summary = breakdown.summarize(records, model)
    total = summary.pop("total")
    assert total["compiled"] == pytest.approx(executed_matmul_flops(hlo)[0], rel=1e-12)
    assert sum(row.get("compiled", 0.0) for row in summary.values()) == pytest.approx(total["compiled"], rel=1e-12)
    assert total["model"] == pytest.approx(training_flops_per_token(run.model_config, 64) * tokens, rel=1e-12)
    for name in ("mamba in_proj", "mamba out_proj", "attention q/k/v/o"):
        assert summary[name]["compiled"] == pytest.approx(4 / 3 * summary[name]["model"], rel=1e-9), name
    assert breakdown.component("jit(train_step)/transpose(jvp(mamba))/ssd/dot_general") == "mamba SSD"
    assert breakdown.phase("jit(train_step)/jvp(mamba)/in_proj/dot_general") == "forward"
