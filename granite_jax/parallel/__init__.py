"""Parallelism: the sharding plan (logical axis names, the rules mapping them to mesh axes, the plan a model is
given), device meshes and placements, expert parallelism, multi-process start-up and TPU topologies."""

from granite_jax.parallel.plan import LOGICAL_AXES, RULES, ShardingPlan, constrain, logical_param, partitioned

__all__ = ["LOGICAL_AXES", "RULES", "ShardingPlan", "constrain", "logical_param", "partitioned"]
