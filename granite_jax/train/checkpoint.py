"""Orbax checkpoints of a run: train state (params, optimizer state, step), data-iterator state and metadata.

Saves are asynchronous every N steps, the last K kept. Resuming takes the latest checkpoint that restores;
one that fails (truncated, corrupted) is reported and the one before it is tried.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from granite_jax import storage
from granite_jax.formats.run import quiet_orbax, read_meta
from granite_jax.model import GraniteForCausalLM
from granite_jax.parallel.distributed import allgather_json
from granite_jax.run_dir import RunDir
from granite_jax.tree import path_names

log = logging.getLogger("granite_jax.checkpoint")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model being trained (a different shape or parameter set)."""


DATA_POSITION = "data_position"  # meta key: every data stream's position, {"count": S, "streams": {"0": ...}}


def merge_data_positions(positions: list[dict]) -> dict:
    """The data positions of every process (`{"count": S, "streams": {index: state}}` each, processes sharing a
    stream giving the same state) as one map covering all S streams: a position that does not depend on how
    many processes read the streams, so that a resume on another process count or mesh continues each stream
    where it stopped."""
    count = positions[0]["count"]
    streams = {}
    for position in positions:
        streams.update(position["streams"])
    if sorted(streams, key=int) != [str(i) for i in range(count)]:
        raise CheckpointSaveError(f"the processes' data positions cover streams {sorted(streams, key=int)}, not "
                                  f"0..{count - 1}")
    return {"count": count, "streams": streams}


class _LegacyDataPosition:
    """The per-process data position (`data/process_{i}-of-{n}.json`, Grain's Orbax handler) that checkpoints
    of earlier versions hold instead of DATA_POSITION: read only, and only on the process count that wrote it."""

    def __init__(self):
        self.state = None

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:
        pass


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written, or its write did not finish within the configured time."""


class RunCheckpoints:
    """The checkpoints of one run directory. Saves are bounded in time (`wait`); checkpoints that do not restore
    are moved to RUN_DIR/corrupt/ once a good one has restored, so their steps are saved again."""

    def __init__(self, run_dir: str, *, keep: int, async_save: bool, save_timeout_s: float = 3600.0):
        self.run_dir = RunDir(run_dir)
        self.directory = self.run_dir.checkpoints
        self.save_timeout_s = save_timeout_s
        _check_writable(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True))

    @property
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_position: dict, meta: dict) -> None:
        """Start saving `step` (the caller decides when); returns before the write finishes if async.

        `data_position`: this process's data streams' positions (the iterator's state; {} for a checkpoint of
        parameters only). Every process calls `save` at the same step: the positions are gathered and saved,
        whole, in the metadata (DATA_POSITION)."""
        if step in self.manager.all_steps():
            return
        if data_position:
            meta = {**meta, DATA_POSITION: merge_data_positions(allgather_json(data_position))}
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except OSError as e:
            raise CheckpointSaveError(f"checkpoint {self.directory}/{step} could not be written: {e}") from None

    def wait(self) -> None:
        """Wait for the save in flight, at most `save_timeout_s` (a write that hangs, e.g. on a storage
        mount gone away, is an error, not a run that never ends)."""
        errors: list[BaseException] = []

        def finish():
            try:
                self.manager.wait_until_finished()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                errors.append(e)

        waiter = threading.Thread(target=finish, daemon=True)
        waiter.start()
        waiter.join(self.save_timeout_s)
        if waiter.is_alive():
            raise CheckpointSaveError(f"saving a checkpoint to {self.directory} did not finish within "
                                      f"checkpoint.save_timeout_s={self.save_timeout_s:g} s")
        if errors:
            raise CheckpointSaveError(f"saving a checkpoint to {self.directory} failed: "
                                      f"{type(errors[0]).__name__}: {_first_line(errors[0])}") from None

    def latest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint whose metadata reads (the run config it was saved with)."""
        steps = self.steps
        for step in reversed(steps):
            try:
                with quiet_orbax():
                    return read_meta(self.manager, steps, step)
            except Exception as e:  # noqa: BLE001 - unreadable: the restore will report it
                log.debug("could not read the metadata of step %d: %s", step, e)
        return None

    def restore_latest(self, abstract_state):
        """(step, state, data position, meta) of the newest checkpoint that restores, or None if none does.

        The state is restored onto `abstract_state`'s shardings, whatever mesh saved it. A checkpoint that fails
        (truncated, corrupted) is reported and the one before it is tried; once one restores, the failed ones are
        moved to RUN_DIR/corrupt/ (by process 0)."""
        failed = []
        for step in reversed(self.steps):
            try:
                self._check_parameters_fit(step, abstract_state)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - unreadable metadata: let the restore below report it
                log.debug("could not read the metadata of step %d: %s", step, e)
            legacy = self._legacy_data_position(step)
            items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
            if legacy:
                items["data"] = grain.checkpoint.CheckpointRestore(_LegacyDataPosition())
            try:
                with quiet_orbax():
                    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any failure to read one checkpoint means: try the previous
                log.warning("checkpoint at step %d could not be restored (%s: %s); trying the previous one",
                            step, type(e).__name__, _first_line(e))
                failed.append(step)
                continue
            self._set_aside(failed)
            meta = restored["meta"]
            position = restored["data"].state if legacy else meta.get(DATA_POSITION)
            return step, restored["state"], position, meta
        return None

    def _legacy_data_position(self, step: int) -> bool:
        """Whether checkpoint `step` keeps its data position per process (an earlier version's layout); such a
        checkpoint restores only on the process count that saved it."""
        directory = storage.join(self.directory, str(step), "data")
        if not storage.isdir(directory):
            return False
        saved = sorted(name for name in storage.listdir(directory) if name.startswith("process_"))
        mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if saved and mine not in saved:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} was saved by an earlier version, which kept the data position "
                f"per process ({', '.join(saved)}): resume it on the process count that saved it")
        return True

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                log.warning("moved the unreadable checkpoint of step %d to %s", step, self.run_dir.move_corrupt(step))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("granite_jax: unreadable checkpoints moved")
        self.manager.reload()

    def _check_parameters_fit(self, step: int, abstract_state) -> None:
        """Compare the stored parameter names and shapes with the model's, naming the first difference."""
        with quiet_orbax():  # Orbax warns that state/ has no _CHECKPOINT_METADATA of its own: it is the step's
            metadata = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
        stored = _parameter_shapes(getattr(metadata, "item_metadata", metadata))
        if not stored:  # unreadable metadata (e.g. a truncated checkpoint): the restore will report it
            return
        expected = _parameter_shapes(abstract_state)
        where = f"checkpoint {self.directory}/{step} does not fit this model"
        for name in sorted(set(expected) | set(stored)):
            if name not in stored:
                raise CheckpointMismatchError(f"{where}: it has no parameter {name}")
            if name not in expected:
                raise CheckpointMismatchError(f"{where}: it has a parameter {name} that the model does not")
            if tuple(stored[name]) != tuple(expected[name]):
                raise CheckpointMismatchError(f"{where}: parameter {name} has shape {tuple(stored[name])} in the "
                                              f"checkpoint, {tuple(expected[name])} in the model")

    def close(self) -> None:
        """Wait for the save in flight (bounded, `wait`), then release Orbax's manager."""
        self.wait()
        self.manager.close()

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_writable(directory: str) -> None:
    """Create `directory` and write a file in it: an unwritable checkpoint directory is found at the start,
    not by an asynchronous save that never returns."""
    problem = storage.checkpoint_location_problem(directory)
    if problem:
        raise CheckpointSaveError(f"checkpoint directory {directory!r}: {problem}")
    try:
        if storage.is_url(directory):
            probe = storage.join(directory, f".write-test-{jax.process_index()}-{os.getpid()}")
            with storage.open_file(probe, "wb") as f:
                f.write(b"")
            storage.remove(probe)
            return
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CheckpointSaveError(f"checkpoint directory {directory!r} is not writable ({e.strerror or e}); "
                                  "choose a run_dir this user can write") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _parameter_shapes(tree) -> dict[str, tuple]:
    """{"model.layers.0.mamba.in_proj.kernel": shape} for the `params` part of a train-state tree."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = path_names(path)
        if names and names[0] == "params" and hasattr(leaf, "shape"):
            shapes[".".join(n for n in names[1:] if n != "value")] = leaf.shape
    return shapes


def save_parameters(run_dir: str, model: GraniteForCausalLM, meta: dict) -> str:
    """Write `model`'s parameters alone (no optimizer state) as RUN_DIR's checkpoint at step 0, in the layout
    `granite_jax.sources.RunDirectory` loads (`state` = {"params": ...}); returns the checkpoint's directory."""
    with RunCheckpoints(run_dir, keep=1, async_save=False) as checkpoints:
        checkpoints.save(0, {"params": nnx.state(model, nnx.Param)}, {}, meta)
    return os.path.join(checkpoints.directory, "0")


def abstract_like(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
