"""A LoRA run of the tiny hybrid MoE built on an fsdp 2 x expert 2 x tensor 2 mesh (`build_run`, as `train.py`
builds it): the partition specs of every adapter factor, of the kernel it adapts (by the adapted module's path)
and of the factor's AdamW moments."""

import jax

from granite_jax.train.config import RunConfig, apply_overrides
from granite_jax.train.setup import build_run
from granite_jax.tree import path_names
from tests.multidevice import arguments, report


def _specs(tree) -> dict[str, tuple]:
    """{dotted path: partition spec, one entry per dimension} of every array in `tree`."""
    return {".".join(path_names(path)): (*leaf.sharding.spec, *[None] * (leaf.ndim - len(leaf.sharding.spec)))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def main():
    config = apply_overrides(RunConfig(), arguments())
    run = build_run(config, jax.devices())
    adapters = _specs(run.state.params)  # the train state holds the adapters alone
    kernels = {name.split(".kernel")[0]: spec for name, spec in _specs(run.frozen).items()
               if name.endswith((".kernel", ".kernel.value"))}
    mu = {name: spec for name, spec in _specs(run.state.opt_state).items() if ".mu." in f".{name}."}
    report({"adapters": adapters, "kernels": kernels, "mu": mu, "mesh": dict(run.mesh.shape)})
