"""Orbax checkpoints of a run: train state (params, optimizer state, step), data-iterator state and metadata.

Saves are asynchronous every N steps, the last K kept. Resuming takes the latest checkpoint that restores;
one that fails (truncated, corrupted) is reported and the one before it is tried.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("granite_jax.checkpoint")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model being trained (a different shape or parameter set)."""


class RunCheckpoints:
    def __init__(self, run_dir: str, *, keep: int, every_steps: int, async_save: bool):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                                 enable_async_checkpointing=async_save, create=True))

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
            force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state):
        """(step, state, data_state, meta) of the newest checkpoint that restores, or None if there is none."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
            except (ValueError, KeyError) as e:
                if _is_shape_mismatch(e):
                    raise CheckpointMismatchError(
                        f"checkpoint {self.directory}/{step} does not fit this model: {_first_line(e)}") from None
                log.warning("checkpoint at step %d could not be restored (%s); trying the previous one",
                            step, _first_line(e))
                continue
            except Exception as e:  # noqa: BLE001 - any failure to read one checkpoint means: try the previous
                log.warning("checkpoint at step %d could not be restored (%s: %s); trying the previous one",
                            step, type(e).__name__, _first_line(e))
                continue
            return step, restored["state"], restored["data"], restored["meta"]
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _is_shape_mismatch(e: Exception) -> bool:
    text = str(e)
    return "shape" in text.lower() and ("mismatch" in text.lower() or "expected" in text.lower())


def abstract_like(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
