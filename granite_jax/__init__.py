"""granite_jax: train, tune, evaluate and convert IBM Granite 4.0 models in JAX/Flax."""

from granite_jax.runtime import configure_xla_flags, use_cpu_without_gpu_driver

configure_xla_flags()  # before anything below imports jax
use_cpu_without_gpu_driver()


from granite_jax.config import ConfigError, ModelConfig, load_preset
from granite_jax.formats import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from granite_jax.model import CausalLMOutput, GraniteForCausalLM

__all__ = [
    "CausalLMOutput", "CheckpointError", "ConfigError", "GraniteForCausalLM", "ModelConfig",
    "load_hf_checkpoint", "load_preset", "save_hf_checkpoint",
]
