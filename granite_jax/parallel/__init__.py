"""Parallelism: logical axis names on parameters (here) and, later, meshes and the rules mapping them."""

from granite_jax.parallel.logical import LOGICAL_AXES, logical_param, partitioned

__all__ = ["LOGICAL_AXES", "logical_param", "partitioned"]
