"""A training run's directory: the one place that knows its layout.

    RUN_DIR/config.yaml           the resolved run configuration (written when the run starts)
    RUN_DIR/checkpoints/STEP/     Orbax: state (params, optimizer state, step), data (per-process positions), meta
    RUN_DIR/metrics.jsonl         every step's metrics (process 0)
    RUN_DIR/tensorboard/          TensorBoard event files (process 0)
    RUN_DIR/tokenizer/            the run's own copy of its tokenizer files (what export copies)
"""

from __future__ import annotations

import dataclasses
import os

import yaml


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: str

    @property
    def checkpoints(self) -> str:
        return os.path.abspath(os.path.join(self.path, "checkpoints"))

    @property
    def config_file(self) -> str:
        return os.path.join(self.path, "config.yaml")

    @property
    def metrics_file(self) -> str:
        return os.path.join(self.path, "metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.path, "tensorboard")

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.path, "tokenizer")

    def has_checkpoints(self) -> bool:
        return os.path.isdir(self.checkpoints)

    def saved_config(self) -> dict:
        """The run configuration written when the run started (a dict of the YAML)."""
        with open(self.config_file) as f:
            return yaml.safe_load(f)

    def save_config(self, config: dict) -> str:
        os.makedirs(self.path, exist_ok=True)
        with open(self.config_file, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        return self.config_file

    def tokenizer(self, run_config: dict | None = None) -> str | None:
        """The run's tokenizer: `data.tokenizer` of `run_config` (e.g. a checkpoint's saved copy), else of
        config.yaml; None when neither names one."""
        tokenizer = (run_config or {}).get("data", {}).get("tokenizer")
        if tokenizer is None and os.path.isfile(self.config_file):
            tokenizer = self.saved_config()["data"]["tokenizer"]
        return tokenizer
