"""One train step function traced under several sharding plans and meshes in one process: each setting must get
its own program (the plan is part of the model's static structure, the mesh part of jit's key), equal to the
program that setting gets when traced alone."""

import jax

from granite_jax.train.config import RunConfig, apply_overrides
from granite_jax.train.setup import build_run
from granite_jax.train.step import make_train_step
from tests.multidevice import report

# One attention layer and its MoE block: the plan and the mesh reach every weight and the MoE's exchange, and
# each setting is traced twice (a Mamba layer would double the tracing, not the property).
SMALL = {"model_overrides": {"num_hidden_layers": 1, "layer_types": ["attention"]},
         "data": {"seq_len": 64, "batch_size": 8}}
SETTINGS = {
    "dropless on data 2 x expert 4": {"mesh": {"data": 2, "expert": 4}},
    "capacity 0.5 on data 2 x expert 4": {"mesh": {"data": 2, "expert": 4}, "moe_capacity_factor": 0.5},
    "fsdp rules on data 2 x expert 4": {"mesh": {"data": 2, "expert": 4}, "sharding_rules": "fsdp"},
    "dropless on fsdp 8": {"mesh": {"fsdp": 8}},
    "one device": {"mesh": {"data": 1}, "devices": 1},
}


def main():
    runs = {}
    for name, setting in SETTINGS.items():
        setting = dict(setting)
        devices = jax.devices()[:setting.pop("devices", len(jax.devices()))]
        runs[name] = build_run(apply_overrides(RunConfig(), {**SMALL, **setting}), devices, abstract=True)
    first = next(iter(runs.values()))
    shared_step = make_train_step(first.tx, first.objective)
    programs, alone = {}, {}
    for name, run in runs.items():  # all through the same jitted function, one after another
        with run.activate():
            programs[name] = shared_step.lower(run.graphdef, run.state, run.abstract_batch()).as_text()
    for name, run in runs.items():  # each through a function that has seen no other setting
        alone[name] = run.lower_train_step().as_text()
    report({"settings": len(runs), "distinct_programs": len(set(programs.values())),
            "equal_to_traced_alone": [name for name in runs if programs[name] == alone[name]]})
