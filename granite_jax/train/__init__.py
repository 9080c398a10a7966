"""Pretraining: run configuration, optimizer, train step, checkpoints and the loop."""

from granite_jax.train.config import RunConfig, RunConfigError, load_run_config
from granite_jax.train.loop import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "RunConfig", "RunConfigError", "load_run_config", "train"]
