"""A batch in the context layout: the token order in which rows split over the `context` mesh axis are held
(`parallel/sequence.py`: contiguous pieces, or zigzag pairs that balance causal attention)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from granite_jax.model.documents import document_runs, positions_within_documents
from granite_jax.parallel.plan import ShardingPlan, current_mesh
from granite_jax.parallel.sequence import layout_order


def context_order(length: int, plan: ShardingPlan) -> np.ndarray | None:
    """The token order of a row of `length` under the plan's context layout on the current mesh (row[order] is
    in the layout), or None when rows stay in order (contiguous layout, or no split sequence)."""
    mesh = current_mesh()
    if mesh is None or plan.context_layout == "contiguous" or plan.sequence_shards(mesh) == 1:
        return None
    return layout_order(length, plan.sequence_shards(mesh), plan.context_layout)


def in_context_layout(batch: dict, plan: ShardingPlan) -> dict:
    """The batch as the model takes it under a non-contiguous context layout (`parallel/sequence.py`): positions
    counted in row order, then every per-token array (ids, segment ids, positions, targets, weights) permuted
    into the layout. Applied once per step, to integer and weight arrays only; the loss is a sum over tokens,
    so the order does not change it. The batch itself under the contiguous layout or an unsplit sequence."""
    ids = batch["input_ids"]
    order = context_order(ids.shape[1], plan)
    if order is None:
        return batch
    if batch.get("positions") is None:
        batch = {**batch, "positions": positions_within_documents(document_runs(batch.get("segment_ids"), ids.shape))}
    return {name: (value if value is None else jnp.take(value, order, axis=1)) for name, value in batch.items()}
