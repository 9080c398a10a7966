"""Our own format: a training run's Orbax checkpoints, read side.

RUN_DIR/checkpoints/STEP/ holds `state` (the train state: `{"params", "opt_state", "step"}`, or `{"params"}`
alone for a checkpoint of parameters only) and `meta` (JSON: the model's HF config.json as `model`, the run
config as `run`, the data position). Writing is `granite_jax.train.checkpoint.RunCheckpoints`; this module
reads the metadata and the parameters without the optimizer state, for every reader that is not resuming a
run (evaluation, export, `init_from=run:`).
"""

from __future__ import annotations

import contextlib
import logging
import os

import jax
import orbax.checkpoint as ocp

from granite_jax import storage
from granite_jax.run_dir import RunDir

IMPORTED_FROM = "imported_from"  # meta key of a parameters-only checkpoint written by `convert import`


@contextlib.contextmanager
def quiet_orbax():
    """Silence Orbax's own logging of a failed read (thousands of lines of asyncio / TensorStore traceback for
    one truncated file): the caller reports the failure in one line."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def open_run(run_dir: str) -> tuple[ocp.CheckpointManager, list[int]]:
    """An Orbax manager over RUN_DIR's checkpoints and their steps (at least one, else FileNotFoundError)."""
    directory = RunDir(run_dir).checkpoints
    if not storage.isdir(directory):
        raise FileNotFoundError(f"{run_dir!r} has no checkpoints directory")
    manager = ocp.CheckpointManager(directory)
    steps = sorted(manager.all_steps())
    if not steps:
        manager.close()
        raise FileNotFoundError(f"{directory!r} holds no checkpoint")
    return manager, steps


def read_meta(manager: ocp.CheckpointManager, steps: list[int], step: int | None) -> tuple[int, dict]:
    """(step, metadata) of checkpoint `step` (None: the newest of `steps`) of an open manager."""
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"--step {step}: the run has checkpoints at steps {steps}")
    return step, manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def checkpoint_meta(run_dir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, metadata) of a run's checkpoint (newest unless `step`): its model and run configs; no weights are
    read."""
    manager, steps = open_run(run_dir)
    try:
        return read_meta(manager, steps, step)
    finally:
        manager.close()


def restore_params(run_dir: str, step: int, target):
    """The `params` of a checkpoint's train state, shaped and placed like `target` (a tree of
    `jax.ShapeDtypeStruct`s, with shardings to read each onto its devices); the optimizer state is not read."""
    target = {"params": target}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(RunDir(run_dir).checkpoints, str(step), "state"),
        args=ocp.args.PyTreeRestore(target, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    return restored["params"]


def with_shardings(abstract, shardings):
    """`abstract` (a tree of shapes) with each leaf a `jax.ShapeDtypeStruct` carrying the matching leaf of
    `shardings` (a tree of the same structure, e.g. from `parameter_shardings`)."""
    leaves, treedef = jax.tree.flatten(abstract)
    sharding_leaves = jax.tree.leaves(shardings)
    if len(sharding_leaves) != len(leaves):
        raise ValueError(f"{len(sharding_leaves)} shardings for {len(leaves)} parameters")
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                        for x, s in zip(leaves, sharding_leaves)])
