"""Train a few steps on each of several meshes: `{"meshes": {name: sizes}, "root": DIR, "overrides": {...}}`."""

from granite_jax.train import train
from granite_jax.train.config import RunConfig, apply_overrides
from tests.multidevice import arguments, report


def main():
    args = arguments()
    losses = {}
    for name, mesh in args["meshes"].items():
        config = RunConfig()
        run_dir = f"{args['root']}/{name.replace(' ', '')}"
        apply_overrides(config, {**args["overrides"], "mesh": mesh, "run_dir": run_dir})
        losses[name] = train(config)
    report(losses)


if __name__ == "__main__":
    main()
