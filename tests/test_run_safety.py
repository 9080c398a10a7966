"""Nothing lost, nothing hung: the run-directory lock, resume checks, `--restart`, bounded checkpoint saves,
unreadable checkpoints set aside, skipped non-finite updates, the learning rate under gradient accumulation,
exit codes. (A run killed in the middle of an asynchronous save: tests/test_train.py.)"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from conftest import TINY_RUN, TOKENIZER, checkpoint_steps, train_cli, train_process, train_tiny

from granite_jax.run_dir import RunDir, RunDirError
from granite_jax.train.config import OptimizerConfig


def _run(run_dir, *overrides):
    """train.py on the tiny run, in this process; what it did (any exit code)."""
    return train_cli(f"run_dir={run_dir}", *TINY_RUN, *overrides)


# ----------------------------------------------------------------------------- resume checks, restart
@pytest.mark.slow
def test_changed_settings_are_refused_and_restart_moves_the_earlier_run_aside(tmp_path):
    """A resume with other data or optimizer settings than the checkpoint's (here seq_len, gradient
    accumulation, whose optimizer state no longer restores, and the shuffle seed) is refused with every
    difference named, before anything in the run directory changes; `steps` below the checkpoint is refused.
    The run keeps its own tokenizer copy and its config names the tokenizer by absolute path; a tokenizer whose
    files no longer equal that copy is refused. When no checkpoint restores, training refuses to start again at
    step 1 (its saves would rotate the unreadable checkpoints away). `--restart` moves the earlier run to
    previous/ (nothing deleted, the unreadable checkpoints kept) and starts over at step 1, here with another
    shuffle seed, which a resume refuses (a setting that leaves the train step's program as it was, so the
    restart compiles nothing new). (One trained run for all of it.)"""
    run_dir = str(tmp_path / "run")
    train_tiny(run_dir, "steps=4", "checkpoint.every_steps=2", "data.tokenizer=data/tokenizer")  # relative
    config_before = open(os.path.join(run_dir, "config.yaml")).read()

    changed = _run(run_dir, "steps=6", "data.seq_len=32", "optimizer.grad_accum_steps=2", "data.shuffle_seed=1")
    error = changed.error_line()
    assert "data.seq_len: 64 in the checkpoint, 32 now" in error and "optimizer.grad_accum_steps: 1" in error
    assert "data.shuffle_seed: 0 in the checkpoint, 1 now" in error
    assert "--restart" in error
    assert open(os.path.join(run_dir, "config.yaml")).read() == config_before  # a refused resume changes nothing
    assert checkpoint_steps(run_dir) == [2, 4]

    assert "beyond steps=3: give steps > 4" in _run(run_dir, "steps=3").error_line()

    # The same tokenizer path with other bytes (as if edited in place since the run started): its ids changed.
    kept_json = os.path.join(RunDir(run_dir).tokenizer_dir, "tokenizer.json")
    original = open(kept_json, "rb").read()
    open(kept_json, "wb").write(original + b" ")
    error = _run(run_dir, "steps=6").error_line()
    assert "the tokenizer's tokenizer.json differ from the copy the run trained with" in error, error
    open(kept_json, "wb").write(original)

    # No checkpoint restores (the same settings): refused, not started over.
    for step in (2, 4):
        _truncate_state(run_dir, step)
    refused = _run(run_dir, "steps=6")
    assert "none of the checkpoints" in refused.error_line() and "steps [2, 4]" in refused.stderr
    assert checkpoint_steps(run_dir) == [2, 4]
    assert open(os.path.join(run_dir, "config.yaml")).read() == config_before

    restarted = _run(run_dir, "steps=4", "data.shuffle_seed=1", "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert "for steps 1..4" in restarted.stdout and "moved the earlier run to" in restarted.stdout
    (previous,) = os.listdir(os.path.join(run_dir, "previous"))
    kept = os.path.join(run_dir, "previous", previous)
    assert sorted(os.listdir(os.path.join(kept, "checkpoints"))) == ["2", "4"]
    assert open(os.path.join(kept, "config.yaml")).read() == config_before
    assert checkpoint_steps(run_dir) == [4]  # checkpoint.every_steps=4: the new run's, not the earlier [2, 4]

    assert yaml.safe_load(config_before)["data"]["tokenizer"] == TOKENIZER  # given as data/tokenizer
    assert RunDir(run_dir).tokenizer() == RunDir(run_dir).tokenizer_dir
    assert sorted(os.listdir(RunDir(run_dir).tokenizer_dir)) == ["tokenizer.json", "tokenizer_config.json"]


def _truncate_state(run_dir, step):
    state_dir = os.path.join(run_dir, "checkpoints", str(step), "state")
    for name in os.listdir(state_dir):
        path = os.path.join(state_dir, name)
        if os.path.isfile(path):
            open(path, "w").close()


# ------------------------------------------------------------------------------------------- the lock
def test_the_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    with run.lock():
        with pytest.raises(RunDirError, match=rf"in use by process {os.getpid()} on this host"):
            run.lock()
    assert not os.path.exists(run.lock_file)  # released

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(run.lock_file, "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)
    run.lock().release()  # a lock of a process that has ended is taken over

    with open(run.lock_file, "w") as f:
        json.dump({"pid": 1, "host": "another-host"}, f)
    with pytest.raises(RunDirError, match="in use by process 1 on another-host.*delete"):
        run.lock()


def test_a_second_train_on_a_locked_run_dir_is_refused(tmp_path):
    run = RunDir(str(tmp_path))
    with run.lock():  # held by this (live) process
        proc = _run(str(tmp_path), "steps=2")
    assert f"in use by process {os.getpid()}" in proc.error_line()
    assert not os.path.exists(run.config_file) and not os.path.exists(run.metrics_file)


# --------------------------------------------------------------------------------- unwritable places
def _unwritable_directory(tmp_path) -> str:
    """An existing directory this process cannot create files in (root ignores permission bits: then an empty
    sysfs directory)."""
    if os.geteuid() != 0:
        path = tmp_path / "read-only"
        path.mkdir()
        path.chmod(0o555)
        return str(path)
    for candidate in ("/sys/kernel/software_nodes", "/sys/kernel/iommu_groups", "/sys/fs"):
        try:
            open(os.path.join(candidate, "probe"), "w").close()
        except OSError:
            if os.path.isdir(candidate) and not [n for n in os.listdir(candidate) if n.isdigit()]:
                return candidate
    pytest.skip("no directory that this (root) process cannot write to")


def test_an_unwritable_run_dir_or_checkpoint_directory_is_one_error_line(tmp_path):
    unwritable = _unwritable_directory(tmp_path)
    assert "run_dir" in _run(os.path.join(unwritable, "run"), "steps=2").error_line()

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(unwritable, run_dir / "checkpoints")  # the checkpoints live on storage this user cannot write
    started = time.monotonic()  # a subprocess: a checkpoint that cannot be written ends the process (os._exit)
    proc = train_process(str(run_dir), "steps=2", "checkpoint.every_steps=1")
    assert "checkpoint directory" in proc.error_line() and "is not writable" in proc.stderr
    assert time.monotonic() - started < 600


def test_a_save_that_does_not_finish_is_an_error_not_a_hang(tmp_path):
    from granite_jax.train.checkpoint import CheckpointSaveError, RunCheckpoints

    checkpoints = RunCheckpoints(str(tmp_path), keep=1, async_save=True, save_timeout_s=0.5)
    hung = lambda: time.sleep(60)  # noqa: E731 - a write blocked on storage that has gone away
    checkpoints.manager.wait_until_finished = hung
    started = time.monotonic()
    with pytest.raises(CheckpointSaveError, match="did not finish within checkpoint.save_timeout_s=0.5 s"):
        checkpoints.wait()
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- checkpoints and signals
# ------------------------------------------------------------------------------------------ optimizer
def _applied_learning_rates(config: OptimizerConfig, micro_steps: int) -> list[float]:
    """The learning rate each optimizer update applied, read off a scalar parameter under a constant gradient
    (Adam's normalised step is then exactly 1 per update; scalars get no weight decay)."""
    from granite_jax.train.optim import make_optimizer

    tx = make_optimizer(config, micro_steps)
    update = jax.jit(tx.update)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    applied = []
    for micro_step in range(1, micro_steps + 1):
        updates, state = update({"w": jnp.asarray(0.5)}, state, params)
        if micro_step % config.grad_accum_steps == 0:  # an update (the micro-steps before it give zeros)
            applied.append(-float(updates["w"]))
        params = optax.apply_updates(params, updates)
    return applied


def test_gradient_accumulation_runs_the_whole_schedule():
    """With 4 micro-steps per update the schedule still runs from warmup to its floor over the run's micro-steps
    (optax's MultiSteps counts updates: before, the last update used 0.92 x peak instead of about 0.1 x), and
    the console's lr is the one applied."""
    from granite_jax.train.optim import learning_rate_at

    config = OptimizerConfig(lr=1.0, warmup_steps=8, min_lr_ratio=0.1, eps=1e-12, grad_accum_steps=4)
    applied = _applied_learning_rates(config, 80)
    assert len(applied) == 20 and applied[0] == 0.0  # the warmup starts at 0
    assert applied[-1] == pytest.approx(0.1, abs=0.02) and max(applied) == pytest.approx(1.0, abs=0.02)
    assert applied[-1] == pytest.approx(learning_rate_at(config, 80, 80), rel=1e-4)
    np.testing.assert_allclose(applied, _applied_learning_rates(OptimizerConfig(
        lr=1.0, warmup_steps=8, min_lr_ratio=0.1, eps=1e-12), 80)[::4], rtol=1e-4)


def test_a_non_finite_update_is_skipped_and_counted():
    """A finite loss whose update is not finite (an overflowing gradient) leaves the parameters and the
    optimizer state as they were, so no checkpoint can hold non-finite weights; the step still advances."""
    from granite_jax.train.step import TrainState, apply_finite_update

    tx = optax.adam(0.1)
    params = {"w": jnp.ones((2,))}
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    for grad, skipped in [(jnp.asarray([jnp.inf, 1.0]), 1.0), (jnp.asarray([1.0, 1.0]), 0.0)]:
        before = state
        state, metrics = apply_finite_update(tx, state, {"w": grad}, {"grad_norm": optax.global_norm(grad)})
        assert float(metrics["skipped_update"]) == skipped
        assert bool(jnp.all(jnp.isfinite(state.params["w"])))
        same = bool(jnp.all(state.params["w"] == before.params["w"]))
        assert same == bool(skipped)
    assert int(state.step) == 2
