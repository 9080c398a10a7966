"""A training run's directory: the one place that knows its layout.

    RUN_DIR/config.yaml           the resolved run configuration (written when the run starts)
    RUN_DIR/tokenizer/            a copy of the run's tokenizer files (made when the run starts)
    RUN_DIR/checkpoints/STEP/     Orbax: state (params, optimizer state, step), data (per-process positions), meta
    RUN_DIR/metrics.jsonl         every step's metrics (process 0)
    RUN_DIR/tensorboard/          TensorBoard event files (process 0)
    RUN_DIR/run.lock              held by the process that trains in the directory (process 0 of a run)
    RUN_DIR/run.lock.takeover     there only while a process takes over a stale run.lock (local run directories)
    RUN_DIR/corrupt/STEP/         checkpoints found unreadable on resume, moved out of the way (never deleted)
    RUN_DIR/previous/TIME/        what `--restart` moved aside: the earlier run's config, metrics, checkpoints

RUN_DIR may be an object-storage URL (`gs://bucket/run`; see `granite_jax.storage`). Object stores cannot
append, so metrics.jsonl and the TensorBoard files are then written in a local staging directory (`logs_dir`)
and uploaded whole by `upload_logs` (at every checkpoint save and when the run ends).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time

import yaml

from granite_jax import storage

log = logging.getLogger("granite_jax.run_dir")

_UNWRITTEN_LOCK_WAIT_S = 1.0  # how long a lock file that is not yet JSON may be in the middle of its creation


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
        if storage.isfile(self.path):
            raise RunDirError(f"run_dir {self.path!r} is a file, not a directory: choose a directory path")
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
    and is refused with what to do. Under a URL the lock is a create-only write (GCS: `ifGenerationMatch=0`).

    Taking over a stale lock is read, check, delete, create: for a local path those steps run under an exclusive
    `flock` of `run.lock.takeover` beside it (`_takeover_guard`), so that of several processes taking over the same
    stale lock at once exactly one gets it, and none deletes the fresh lock of another (whoever gets the guard
    second reads the winner's lock, alive, and is refused). Under a URL there is no such guard: object stores
    (through fsspec) have no lock to hold and no delete-if-unchanged, so two processes that read the same stale lock
    at the same moment can both take it over. Starting only one run at a time on a URL run directory whose lock
    is stale avoids that; a live lock is never taken over, there or here."""

    def __init__(self, path: str):
        self.path = path

    def acquire(self) -> "RunLock":
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        for _ in range(3):
            if self._create(holder.encode()):
                return self
            stale = self._stale_holder()  # refuses a live holder
            if stale is None:  # released meanwhile: try again
                continue
            if storage.is_url(self.path):  # no guard (see the class docstring)
                self._remove_stale(stale)
                continue
            with self._takeover_guard():
                stale = self._stale_holder()  # read again under the guard: nobody took it over meanwhile?
                if stale is not None:
                    self._remove_stale(stale)
                if self._create(holder.encode()):
                    return self
        raise RunDirError(f"could not take {self.path}: other processes took and released it repeatedly "
                          "while this one tried; try again, or use another run_dir")

    def _create(self, data: bytes) -> bool:
        try:
            return storage.create_exclusive(self.path, data)
        except OSError as e:
            raise RunDirError(f"run_dir {storage.dirname(self.path)!r} is not writable "
                              f"({e.strerror or e}): choose a run_dir this user can write") from None

    @contextlib.contextmanager
    def _takeover_guard(self):
        """Hold an exclusive `flock` of `LOCK.takeover` (local paths): takeovers of the lock run one at a time. The
        kernel releases a flock when its holder dies, so a guard cannot go stale. The file is deleted by the holder
        before it lets go; whoever then gets the flock of the deleted file sees that it is no longer the file at
        that path and opens the new one."""
        guard = storage.local_path(self.path) + ".takeover"
        while True:
            try:
                fd = os.open(guard, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as e:
                raise RunDirError(f"run_dir {storage.dirname(self.path)!r} is not writable "
                                  f"({e.strerror or e}): choose a run_dir this user can write") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                opened = os.fstat(fd)
                try:
                    current = os.stat(guard)
                    same = (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)  # the previous holder deleted the file this one locked: open the path again
        try:
            yield
        finally:
            try:
                os.remove(guard)
            except FileNotFoundError:
                pass
            os.close(fd)

    def _stale_holder(self) -> int | None:
        """The pid in the lock if its holder no longer runs on this host; None if there is no lock (its holder
        released it). A live holder, one on another host, or a lock that cannot be read, is refused. A lock that is
        not (yet) JSON is read again for a while: its creator may be between creating it and writing it."""
        unreadable = RunDirError(f"{self.path} exists but cannot be read: if no run uses this directory, "
                                 "delete the file")
        deadline = time.monotonic() + _UNWRITTEN_LOCK_WAIT_S
        while True:
            try:
                with storage.open_file(self.path) as f:
                    holder = json.load(f)
                pid, host = int(holder["pid"]), str(holder["host"])
                break
            except FileNotFoundError:
                return None
            except ValueError:
                if time.monotonic() >= deadline:
                    raise unreadable from None
            except (OSError, KeyError, TypeError):
                raise unreadable from None
            time.sleep(0.02)
        if host != socket.gethostname():
            raise RunDirError(f"run_dir {storage.dirname(self.path)!r} is in use by process {pid} on {host} "
                              f"(since {holder.get('since')}); if that run has ended, delete {self.path}")
        if _alive(pid):
            raise RunDirError(f"run_dir {storage.dirname(self.path)!r} is in use by process {pid} on this host "
                              f"(since {holder.get('since')}): wait for it to finish, or use another run_dir")
        return pid

    def _remove_stale(self, pid: int) -> None:
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
