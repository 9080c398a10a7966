"""Checkpoint conversion: Hugging Face safetensors ⇄ granite_jax parameters."""

from granite_jax.convert.hf import CheckpointError, hf_tensor_name, load_hf_checkpoint, save_hf_checkpoint

__all__ = ["CheckpointError", "hf_tensor_name", "load_hf_checkpoint", "save_hf_checkpoint"]
