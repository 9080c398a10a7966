"""Data: tokenizers, document sources and the Grain input pipeline."""
