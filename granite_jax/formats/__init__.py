"""Weight formats on disk, read and written: Hugging Face safetensors directories (`hf`), PEFT adapter
directories (`peft`), and the OpenSSF model signature over such a directory (`signing`)."""

from granite_jax.formats.hf import CheckpointError, hf_tensor_name, load_hf_checkpoint, save_hf_checkpoint

__all__ = ["CheckpointError", "hf_tensor_name", "load_hf_checkpoint", "save_hf_checkpoint"]
