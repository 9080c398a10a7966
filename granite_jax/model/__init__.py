"""Flax NNX modules of the Granite 4.0 hybrid Mamba-2 / attention / MoE model."""

from granite_jax.model.granite import CausalLMOutput, DecoderLayer, GraniteForCausalLM, GraniteModel

__all__ = ["CausalLMOutput", "DecoderLayer", "GraniteForCausalLM", "GraniteModel"]
