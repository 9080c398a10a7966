"""Training: run configuration (typed `init_from`), the one run setup (`setup.py`), optimizer, train step, Orbax
checkpoints, the loop and the ahead-of-time dry run."""

from granite_jax.train.config import RunConfig, RunConfigError, load_run_config
from granite_jax.train.hooks import TrainingStopped
from granite_jax.train.loop import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "TrainingStopped", "RunConfig", "RunConfigError", "load_run_config", "train"]
