"""A training run's directory: the one place that knows its layout.

    RUN_DIR/config.yaml           the resolved run configuration (written when the run starts)
    RUN_DIR/tokenizer/            a copy of the run's tokenizer files (made when the run starts)
    RUN_DIR/checkpoints/STEP/     Orbax: state (params, optimizer state, step), data (per-process positions), meta
    RUN_DIR/metrics.jsonl         every step's metrics (process 0)
    RUN_DIR/tensorboard/          TensorBoard event files (process 0)
    RUN_DIR/run.lock              held by the process that trains in the directory (process 0 of a run)
    RUN_DIR/corrupt/STEP/         checkpoints found unreadable on resume, moved out of the way (never deleted)
    RUN_DIR/previous/TIME/        what `--restart` moved aside: the earlier run's config, metrics, checkpoints

RUN_DIR may be an object-storage URL (`gs://bucket/run`; see `granite_jax.storage`). Object stores cannot
append, so metrics.jsonl and the TensorBoard files are then written in a local staging directory (`logs_dir`)
and uploaded whole by `upload_logs` (at every checkpoint save and when the run ends).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile

import yaml

from granite_jax import storage

log = logging.getLogger("granite_jax.run_dir")


class RunDirError(RuntimeError):
    """A run directory cannot be used: another process holds it, or it cannot be written."""


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: str

    @property
    def checkpoints(self) -> str:
        return storage.absolute(storage.join(self.path, "checkpoints"))

    @property
    def config_file(self) -> str:
        return storage.join(self.path, "config.yaml")

    @property
    def logs_dir(self) -> str:
        """Where metrics.jsonl and tensorboard/ are written: the run directory itself, or for a URL a local
        staging directory named after it (uploaded by `upload_logs`)."""
        if not storage.is_url(self.path):
            return self.path
        return os.path.join(tempfile.gettempdir(), "granite_jax-logs",
                            hashlib.sha256(self.path.rstrip("/").encode()).hexdigest()[:16])

    @property
    def metrics_file(self) -> str:
        return os.path.join(self.logs_dir, "metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.logs_dir, "tensorboard")

    @property
    def tokenizer_dir(self) -> str:
        return storage.join(self.path, "tokenizer")

    @property
    def lock_file(self) -> str:
        return storage.join(self.path, "run.lock")

    def has_checkpoints(self) -> bool:
        return storage.isdir(self.checkpoints)

    def saved_config(self) -> dict:
        """The run configuration written when the run started (a dict of the YAML)."""
        with storage.open_file(self.config_file) as f:
            return yaml.safe_load(f)

    def save_config(self, config: dict) -> str:
        storage.makedirs(self.path)
        with storage.open_file(self.config_file, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        return self.config_file

    def open_logs(self) -> None:
        """Make `logs_dir` ready to append to: for a URL, a fresh staging directory holding the run's
        metrics.jsonl so far (TensorBoard writes a new events file per start, so those are not fetched)."""
        if not storage.is_url(self.path):
            return
        shutil.rmtree(self.logs_dir, ignore_errors=True)
        os.makedirs(self.logs_dir)
        remote = storage.join(self.path, "metrics.jsonl")
        if storage.exists(remote):
            storage.copy_file(remote, self.metrics_file)

    def upload_logs(self) -> None:
        """For a URL run directory, upload metrics.jsonl and the TensorBoard files (whole: object stores cannot
        append); nothing to do for a local one."""
        if not storage.is_url(self.path) or not os.path.isdir(self.logs_dir):
            return
        for directory, _, names in os.walk(self.logs_dir):
            relative = os.path.relpath(directory, self.logs_dir)
            for name in names:
                target = storage.join(self.path, *([] if relative == "." else relative.split(os.sep)), name)
                storage.copy_file(os.path.join(directory, name), target)

    def tokenizer(self) -> str | None:
        """The run's copy of its tokenizer (`keep_tokenizer`): the directory, or the sentencepiece `.model` in it;
        None for a run made before runs kept a copy (paths recorded in the run's files are never followed: they
        may name anything, relative to any directory)."""
        if not storage.isdir(self.tokenizer_dir):
            return None
        names = storage.listdir(self.tokenizer_dir)
        models = [n for n in names if n.endswith(".model")]
        return storage.join(self.tokenizer_dir, models[0]) if models and "tokenizer.json" not in names \
            else self.tokenizer_dir

    def keep_tokenizer(self, source: str) -> str:
        """Copy the tokenizer at `source` (its files only, not a checkpoint's weights) into the run directory,
        so that export and evaluation read the run's own copy, whatever directory they are started from and
        whatever happens to `source` later. Returns the copy as `tokenizer()` names it."""
        from granite_jax.data.tokenizer import tokenizer_files

        storage.makedirs(self.tokenizer_dir)
        for path in tokenizer_files(source):
            target = storage.join(self.tokenizer_dir, storage.basename(path))
            if storage.absolute(target) == storage.absolute(path) or (
                    not storage.is_url(target) and os.path.exists(target) and os.path.samefile(path, target)):
                continue  # the run's copy named as the source
            storage.copy_file(path, target)
        return self.tokenizer()

    def lock(self) -> "RunLock":
        """Take the run directory for this process (see RunLock); fails if it cannot be written."""
        problem = storage.checkpoint_location_problem(self.path)
        if problem:
            raise RunDirError(f"run_dir {self.path!r}: {problem}")
        try:
            storage.makedirs(self.path)
        except OSError as e:
            raise RunDirError(f"run_dir {self.path!r} cannot be created: {e.strerror}") from None
        return RunLock(self.lock_file).acquire()

    def move_aside(self, reason: str) -> str | None:
        """Move the earlier run's config, metrics, TensorBoard files and checkpoints to previous/TIME/ (for
        `--restart`): nothing is deleted. Returns where they went, or None if there was nothing."""
        names = [n for n in ("config.yaml", "metrics.jsonl", "tensorboard", "checkpoints", "corrupt")
                 if storage.exists(storage.join(self.path, n))]
        if not names:
            return None
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = storage.join(self.path, "previous", stamp)
        if not storage.is_url(target):
            os.makedirs(target)
        for name in names:
            storage.move(storage.join(self.path, name), storage.join(target, name))
        with storage.open_file(storage.join(target, "REASON"), "w") as f:
            f.write(reason + "\n")
        return target

    def move_corrupt(self, step: int) -> str:
        """Move an unreadable checkpoint to corrupt/STEP (so the step can be saved again); returns where."""
        target = storage.join(self.path, "corrupt", str(step))
        if storage.exists(target):
            target += datetime.datetime.now(datetime.timezone.utc).strftime("-%Y%m%dT%H%M%S.%fZ")
        storage.makedirs(storage.dirname(target))
        storage.move(storage.join(self.checkpoints, str(step)), target)
        return target


class RunLock:
    """`run.lock`: the pid and host of the process training in a run directory, created exclusively.

    A second run on the same directory is refused with the holder's pid and host. A lock left by a process
    that no longer runs on this host is taken over (with a warning); one from another host cannot be checked
    and is refused with what to do. Under a URL the lock is a create-only write (GCS: `ifGenerationMatch=0`)."""

    def __init__(self, path: str):
        self.path = path

    def acquire(self) -> "RunLock":
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                created = storage.create_exclusive(self.path, json.dumps(holder).encode())
            except OSError as e:
                raise RunDirError(f"run_dir {storage.dirname(self.path)!r} is not writable "
                                  f"({e.strerror or e}): choose a run_dir this user can write") from None
            if created:
                return self
            self._take_over_if_stale()
        raise RunDirError(f"could not take {self.path} (another process took it at the same time)")

    def _take_over_if_stale(self) -> None:
        try:
            with storage.open_file(self.path) as f:
                holder = json.load(f)
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            raise RunDirError(f"{self.path} exists but cannot be read: if no run uses this directory, "
                              "delete the file") from None
        if host != socket.gethostname():
            raise RunDirError(f"run_dir {storage.dirname(self.path)!r} is in use by process {pid} on {host} "
                              f"(since {holder.get('since')}); if that run has ended, delete {self.path}")
        if _alive(pid):
            raise RunDirError(f"run_dir {storage.dirname(self.path)!r} is in use by process {pid} on this host "
                              f"(since {holder.get('since')}): wait for it to finish, or use another run_dir")
        log.warning("taking over %s from process %d, which no longer runs", self.path, pid)
        storage.remove(self.path)

    def release(self) -> None:
        storage.remove(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
