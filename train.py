"""Train a Granite 4.0 model. With no arguments: a tiny hybrid MoE on the bundled King James Bible, on CPU.

    python train.py                                           # configs/pretrain-tiny.yaml
    python train.py --config configs/pretrain-tiny.yaml steps=400 optimizer.lr=1e-3
    python train.py init_from=hf:path/to/granite-4.0-h-tiny    # continued pretraining from HF weights

Any `key=value` overrides a field of the run config (nested with dots). Re-running with the same run_dir
resumes from its newest checkpoint.
"""

import argparse
import logging
import sys

import granite_jax  # noqa: F401  (sets XLA flags before JAX starts)
from granite_jax.train import load_run_config, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain-tiny.yaml", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 optimizer.lr=1e-3")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_run_config(args.config, args.overrides)
        train(config)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
