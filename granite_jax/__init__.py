"""granite_jax: train, tune, evaluate and convert IBM Granite 4.0 models in JAX/Flax.

Importing it changes no environment variable; a program calls `granite_jax.runtime.configure_process()` at its
start for our XLA defaults (train.py, eval.py and the converter do)."""

from granite_jax.config import ConfigError, ModelConfig, load_preset
from granite_jax.formats import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from granite_jax.model import CausalLMOutput, GraniteForCausalLM

__all__ = [
    "CausalLMOutput", "CheckpointError", "ConfigError", "GraniteForCausalLM", "ModelConfig",
    "load_hf_checkpoint", "load_preset", "save_hf_checkpoint",
]
