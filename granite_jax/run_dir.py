"""A training run's directory: the one place that knows its layout.

    RUN_DIR/config.yaml           the resolved run configuration (written when the run starts)
    RUN_DIR/tokenizer/            a copy of the run's tokenizer files (made when the run starts)
    RUN_DIR/checkpoints/STEP/     Orbax: state (params, optimizer state, step), data (per-process positions), meta
    RUN_DIR/metrics.jsonl         every step's metrics (process 0)
    RUN_DIR/tensorboard/          TensorBoard event files (process 0)
    RUN_DIR/run.lock              held by the process that trains in the directory (process 0 of a run)
    RUN_DIR/corrupt/STEP/         checkpoints found unreadable on resume, moved out of the way (never deleted)
    RUN_DIR/previous/TIME/        what `--restart` moved aside: the earlier run's config, metrics, checkpoints
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import socket

import yaml

log = logging.getLogger("granite_jax.run_dir")


class RunDirError(RuntimeError):
    """A run directory cannot be used: another process holds it, or it cannot be written."""


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: str

    @property
    def checkpoints(self) -> str:
        return os.path.abspath(os.path.join(self.path, "checkpoints"))

    @property
    def config_file(self) -> str:
        return os.path.join(self.path, "config.yaml")

    @property
    def metrics_file(self) -> str:
        return os.path.join(self.path, "metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.path, "tensorboard")

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.path, "tokenizer")

    @property
    def lock_file(self) -> str:
        return os.path.join(self.path, "run.lock")

    def has_checkpoints(self) -> bool:
        return os.path.isdir(self.checkpoints)

    def saved_config(self) -> dict:
        """The run configuration written when the run started (a dict of the YAML)."""
        with open(self.config_file) as f:
            return yaml.safe_load(f)

    def save_config(self, config: dict) -> str:
        os.makedirs(self.path, exist_ok=True)
        with open(self.config_file, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        return self.config_file

    def tokenizer(self) -> str | None:
        """The run's copy of its tokenizer (`keep_tokenizer`): the directory, or the sentencepiece `.model` in it;
        None for a run made before runs kept a copy (paths recorded in the run's files are never followed: they
        may name anything, relative to any directory)."""
        if not os.path.isdir(self.tokenizer_dir):
            return None
        names = sorted(os.listdir(self.tokenizer_dir))
        models = [n for n in names if n.endswith(".model")]
        return os.path.join(self.tokenizer_dir, models[0]) if models and "tokenizer.json" not in names \
            else self.tokenizer_dir

    def keep_tokenizer(self, source: str) -> str:
        """Copy the tokenizer at `source` (its files only, not a checkpoint's weights) into the run directory,
        so that export and evaluation read the run's own copy, whatever directory they are started from and
        whatever happens to `source` later. Returns the copy as `tokenizer()` names it."""
        from granite_jax.data.tokenizer import tokenizer_files

        os.makedirs(self.tokenizer_dir, exist_ok=True)
        for path in tokenizer_files(source):
            target = os.path.join(self.tokenizer_dir, os.path.basename(path))
            if not (os.path.exists(target) and os.path.samefile(path, target)):  # the run's copy named as source
                shutil.copy2(path, target)
        return self.tokenizer()

    def lock(self) -> "RunLock":
        """Take the run directory for this process (see RunLock); fails if it cannot be written."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"run_dir {self.path!r} cannot be created: {e.strerror}") from None
        return RunLock(self.lock_file).acquire()

    def move_aside(self, reason: str) -> str | None:
        """Move the earlier run's config, metrics, TensorBoard files and checkpoints to previous/TIME/ (for
        `--restart`): nothing is deleted. Returns where they went, or None if there was nothing."""
        names = [n for n in ("config.yaml", "metrics.jsonl", "tensorboard", "checkpoints", "corrupt")
                 if os.path.exists(os.path.join(self.path, n))]
        if not names:
            return None
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = os.path.join(self.path, "previous", stamp)
        os.makedirs(target)
        for name in names:
            os.rename(os.path.join(self.path, name), os.path.join(target, name))
        with open(os.path.join(target, "REASON"), "w") as f:
            f.write(reason + "\n")
        return target

    def move_corrupt(self, step: int) -> str:
        """Move an unreadable checkpoint to corrupt/STEP (so the step can be saved again); returns where."""
        target = os.path.join(self.path, "corrupt", str(step))
        if os.path.exists(target):
            target += datetime.datetime.now(datetime.timezone.utc).strftime("-%Y%m%dT%H%M%S.%fZ")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(os.path.join(self.checkpoints, str(step)), target)
        return target


class RunLock:
    """`run.lock`: the pid and host of the process training in a run directory, created exclusively.

    A second run on the same directory is refused with the holder's pid and host. A lock left by a process
    that no longer runs on this host is taken over (with a warning); one from another host cannot be checked
    and is refused with what to do."""

    def __init__(self, path: str):
        self.path = path

    def acquire(self) -> "RunLock":
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise RunDirError(f"run_dir {os.path.dirname(self.path)!r} is not writable ({e.strerror}): "
                                  "choose a run_dir this user can write") from None
            with os.fdopen(fd, "w") as f:
                json.dump(holder, f)
            return self
        raise RunDirError(f"could not take {self.path} (another process took it at the same time)")

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            raise RunDirError(f"{self.path} exists but cannot be read: if no run uses this directory, "
                              "delete the file") from None
        if host != socket.gethostname():
            raise RunDirError(f"run_dir {os.path.dirname(self.path)!r} is in use by process {pid} on {host} "
                              f"(since {holder.get('since')}); if that run has ended, delete {self.path}")
        if _alive(pid):
            raise RunDirError(f"run_dir {os.path.dirname(self.path)!r} is in use by process {pid} on this host "
                              f"(since {holder.get('since')}): wait for it to finish, or use another run_dir")
        log.warning("taking over %s from process %d, which no longer runs", self.path, pid)
        os.remove(self.path)

    def release(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

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
