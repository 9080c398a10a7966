"""What the training loop does after each step, one job per hook: log the metrics, save a checkpoint every N
steps, evaluate every N steps, stop on a signal.

The loop (`train/loop.py`) runs the step and hands every hook the `StepDone`, in the order it was given them
(logging first: a step's metrics are on disk before its checkpoint exists; the signal last: the checkpoint it
saves holds the step whose metrics were logged). A hook that raises ends the run (`StopOnSignal` raises
`TrainingStopped`); `close()` runs whatever happened.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Callable, Protocol

import jax
import numpy as np

from granite_jax.train.metrics import TensorBoardWriter, console_line, eval_line, print_line


@dataclasses.dataclass(frozen=True)
class StepDone:
    """A step just taken: its number, the train state after it, its metrics (host floats, as metrics.jsonl
    records them) and the model FLOPs of its batch (for MFU)."""

    step: int
    state: object
    metrics: dict[str, float]
    model_flops: float


def due(step: int, every: int, last: int) -> bool:
    """Whether a hook that acts every `every` steps and at the run's last step acts after `step`."""
    return step % every == 0 or step == last


class Hook(Protocol):
    def after_step(self, done: StepDone) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """Every step's metrics appended to metrics.jsonl (process 0; across resumptions, the last line of a step
    wins); every `log_every` steps and at the last one, a console line and TensorBoard scalars with the
    learning rate, the updates skipped so far, tokens/s and MFU over the steps since the last line. `upload`
    copies the logs to a run directory in object storage (`RunDir.upload_logs`) after each checkpoint and at
    the end. Processes other than 0 give no file, directory or upload: they log nothing."""

    def __init__(self, *, metrics_file: str | None, tensorboard_dir: str | None, upload: Callable[[], None] | None,
                 log_every: int, steps: int, tokens_per_step: int, learning_rate: Callable[[int], float],
                 peak_tflops: float | None):
        self._file = open(metrics_file, "a") if metrics_file else None
        self._writer = TensorBoardWriter(tensorboard_dir) if tensorboard_dir else None
        self._upload = upload
        self._every, self._steps, self._tokens = log_every, steps, tokens_per_step
        self._learning_rate, self._peak = learning_rate, peak_tflops
        self._skipped_updates = 0
        self.restart_window()

    def restart_window(self) -> None:
        """Start a new throughput window (after work that is not training, such as an evaluation)."""
        self._window_start, self._window_steps, self._window_flops = time.perf_counter(), 0, 0.0

    def after_step(self, done: StepDone) -> None:
        metrics = dict(done.metrics)
        self._skipped_updates += int(metrics["skipped_update"])
        self._window_steps += 1
        self._window_flops += done.model_flops
        if self._file:
            self._file.write(json.dumps(dict(step=done.step, **metrics)) + "\n")
            self._file.flush()
        if not due(done.step, self._every, self._steps):
            return
        elapsed = time.perf_counter() - self._window_start
        metrics["lr"] = self._learning_rate(done.step)
        metrics["skipped_updates"] = self._skipped_updates
        metrics["tokens_per_s"] = self._window_steps * self._tokens / elapsed
        if self._peak:  # the model FLOPs of the window's batches (attention over their documents)
            metrics["mfu"] = self._window_flops / elapsed / (self._peak * 1e12)
        eta = (self._steps - done.step) * elapsed / self._window_steps
        self.scalars(done.step, metrics, prefix="train/")
        print_line(console_line(done.step, self._steps, metrics, eta))
        self.restart_window()

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self._writer:
            self._writer.scalars(step, values, prefix=prefix)

    def upload(self) -> None:
        if self._upload:
            self._upload()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
        if self._file:
            self._file.close()
        self.upload()


class CheckpointEvery:
    """A checkpoint (train state, data position, run metadata) every `every` steps, then `after_save()`."""

    def __init__(self, checkpoints, every: int, data_position: Callable[[], dict], meta: dict,
                 after_save: Callable[[], None]):
        self._checkpoints, self._every, self._data_position, self._meta = checkpoints, every, data_position, meta
        self._after_save = after_save

    def save(self, step: int, state) -> None:
        self._checkpoints.save(step, state, self._data_position(), self._meta)

    def after_step(self, done: StepDone) -> None:
        if done.step % self._every == 0:
            self.save(done.step, done.state)
            self._after_save()

    def close(self) -> None:
        pass


class EvaluateEvery:
    """The validation metrics every `every` steps and at the last one (`evaluate(params, should_stop)`: the
    metrics, or the number of batches done when `should_stop()` cut it short), printed and logged; the
    evaluation's time is left out of the throughput window."""

    def __init__(self, evaluate, *, every: int, steps: int, batches: int, log: MetricsLog,
                 should_stop: Callable[[], bool]):
        self._evaluate, self._every, self._steps, self._batches = evaluate, every, steps, batches
        self._log, self._should_stop = log, should_stop

    def after_step(self, done: StepDone) -> None:
        if not due(done.step, self._every, self._steps):
            return
        metrics = self._evaluate(done.state.params, self._should_stop)
        if isinstance(metrics, int):
            print_line(f"eval step {done.step}: stopped after {metrics} of {self._batches} batches by the signal")
        else:
            self._log.scalars(done.step, metrics, prefix="eval/")
            print_line(f"eval step {done.step}: {eval_line(metrics)} ({self._batches} batches)")
        self._log.restart_window()

    def close(self) -> None:
        pass


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped the run between two steps, after it saved a checkpoint. `exit_code` is the shell's
    128 + the signal's number (130 for SIGINT, 143 for SIGTERM), so schedulers can tell it from a run that
    finished."""

    def __init__(self, signum: int, step: int, where: str):
        super().__init__(f"received signal {signum}: saved step {step} to {where}")
        self.exit_code = 128 + signum


DUPLICATE_S = 1.0  # a repeat of the same signal within this is the same request, delivered twice


class StopSignal:
    """Remembers SIGTERM/SIGINT so the loop can checkpoint and exit between steps. A second signal to this
    process stops it at once (exit 128 + signal), whatever it is waiting on; the same signal again within
    DUPLICATE_S is the first one delivered twice (a launcher that signals every process of a job reaches a
    supervised process directly and through its parent, `parallel/supervise.py`)."""

    def __init__(self):
        self.received: int | None = None  # the signal that stops the run (this process's or another's)
        self._own_at: float | None = None  # when this process itself received it
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def agreed(self) -> bool:
        """Whether to stop now: this process received a signal, or (several processes) any of them did — they
        must all stop at the same step, or the ones going on would wait in the next step's collectives. The
        signal of the process that received one sets the exit code."""
        if jax.process_count() == 1:
            return self.received is not None
        from jax.experimental import multihost_utils

        received = int(np.max(multihost_utils.process_allgather(np.int32(self.received or 0))))
        if received and self.received is None:
            self.received = received
        return received != 0

    def _handle(self, signum, _frame):
        if self._own_at is not None:
            if signum == self.received and time.monotonic() - self._own_at < DUPLICATE_S:
                return
            print(f"received signal {signum} again: stopping now, without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self._own_at = time.monotonic()
        self.received = self.received or signum
        print_line(f"received signal {signum}: stopping after this step (send it again to stop at once)")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopOnSignal:
    """After a step, when `stop` agrees a signal arrived (on any process): save the step, wait for the save to
    be committed and raise `TrainingStopped`."""

    def __init__(self, stop: StopSignal, checkpoint: CheckpointEvery, checkpoints):
        self._stop, self._checkpoint, self._checkpoints = stop, checkpoint, checkpoints

    def after_step(self, done: StepDone) -> None:
        if self._stop.agreed():
            self._checkpoint.save(done.step, done.state)
            self._checkpoints.wait()
            raise TrainingStopped(self._stop.received, done.step, self._checkpoints.directory)

    def close(self) -> None:
        pass
