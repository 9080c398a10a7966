"""Train a few steps on each of several meshes: `{"meshes": {name: sizes}, "root": DIR, "overrides": {...}}`;
a mesh's sizes may carry run-config overrides of its own as `{"mesh": sizes, key: value, ...}`."""

from granite_jax.train import train
from granite_jax.train.config import RunConfig, apply_overrides
from tests.multidevice import arguments, report


def main():
    args = arguments()
    losses = {}
    for name, mesh in args["meshes"].items():
        config = RunConfig()
        run_dir = f"{args['root']}/{name.replace(' ', '')}"
        own = dict(mesh) if "mesh" in mesh else {"mesh": mesh}
        apply_overrides(config, {**args["overrides"], **own, "run_dir": run_dir})
        losses[name] = train(config)
    report(losses)
