"""The compiled train step of a Mamba-only tiny model with its rows split over 8 context devices: the
collectives it runs and their shapes, and its temporaries next to the same row on one device."""

import re

import jax

from granite_jax.hlo import COLLECTIVES
from granite_jax.train.config import RunConfig, apply_overrides
from granite_jax.train.setup import build_run
from tests.multidevice import arguments, report

_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def compile_step(seq_len: int, mesh: dict, devices):
    overrides = {"model_overrides": {"num_hidden_layers": 2, "layer_types": ["mamba", "mamba"],
                                     "remat_policy": "full"},
                 "data": {"seq_len": seq_len, "batch_size": 1}, "mesh": mesh, "loss_chunk_tokens": 1024}
    run = build_run(apply_overrides(RunConfig(), overrides), devices, abstract=True)
    return run, run.lower_train_step().compile()


def collectives(hlo: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """(kind, [(dtype, shape), ...]) of every collective in a compiled module."""
    found = []
    for line in hlo.splitlines():
        if match := _COLLECTIVE.search(line):
            shapes = [(dtype, tuple(int(d) for d in dims.split(",") if d))
                      for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))]
            found.append((match.group(2), shapes))
    return found


def main():
    """One compile of the step at `seq_len` on context 8 gives its collectives and its temporaries; the same row
    on one device, its temporaries."""
    seq_len = arguments()["seq_len"]
    run, compiled = compile_step(seq_len, {"context": 8}, jax.devices())
    config = run.model_config
    found = collectives(compiled.as_text())
    full_length = [(kind, shapes) for kind, shapes in found
                   if any(dtype.startswith(("f", "bf")) and seq_len in shape for dtype, shape in shapes)]
    summary = (8, 1, 1, config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state)  # shards, pieces, rows
    one_device = compile_step(seq_len, {"data": 1}, jax.devices()[:1])[1]
    report({"collectives": len(found), "full_length_float_collectives": [str(c) for c in full_length],
            "summary_all_gathers": sum(kind == "all-gather" and any(shape == summary for _, shape in shapes)
                                       for kind, shapes in found),
            "temp_context_8": compiled.memory_analysis().temp_size_in_bytes,
            "temp_context_1": one_device.memory_analysis().temp_size_in_bytes})
