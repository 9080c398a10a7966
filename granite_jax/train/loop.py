"""The training loop: config → model → data → jitted step → metrics / evaluation / checkpoints.

Resumes automatically from the newest checkpoint of `run_dir` (params, optimizer state, step and the data
iterator's position, so the losses continue exactly as if never interrupted). SIGTERM and SIGINT save a
checkpoint before exiting. A non-finite loss stops the run with a message; the last good checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

from granite_jax import storage
from granite_jax.data.chat_template import chat_format
from granite_jax.data.pipeline import interleave_streams, pretraining_dataset
from granite_jax.data.preference import load_preference_samples, preference_dataset
from granite_jax.data.sft import load_sft_samples, sft_dataset
from granite_jax.data.sources import BadLines, load_documents
from granite_jax.data.tokenizer import changed_tokenizer_files, load_tokenizer
from granite_jax.formats.run import IMPORTED_FROM
from granite_jax.model.flops import mean_keys_per_query, peak_tflops
from granite_jax.parallel.distributed import process_block
from granite_jax.run_dir import RunDir
from granite_jax.train.checkpoint import DATA_POSITION, RunCheckpoints, abstract_like
from granite_jax.train.config import RunConfig, RunConfigError, resume_differences, save_run_config
from granite_jax.train.hooks import (
    CheckpointEvery,
    EvaluateEvery,
    Hook,
    MetricsLog,
    StepDone,
    StopOnSignal,
    StopSignal,
)
from granite_jax.train.metrics import print_line
from granite_jax.train.optim import learning_rate_at
from granite_jax.train.setup import build_run, checked_source

log = logging.getLogger("granite_jax.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


def _peak_tflops(config: RunConfig) -> float | None:
    return config.peak_tflops if config.peak_tflops is not None else peak_tflops(jax.devices()[0])


def resolve_tokenizer(config: RunConfig) -> str:
    """`data.tokenizer`, or when it is null the tokenizer that came with `init_from`."""
    if config.data.tokenizer is not None:
        return config.data.tokenizer
    source = checked_source(config)
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise RunConfigError(f"data.tokenizer is null (the tokenizer of init_from) but init_from={str(source)!r} "
                             "holds no tokenizer (no tokenizer.json; a run made by an earlier version keeps no copy): "
                             "give data.tokenizer")
    return tokenizer


def process_streams(rows: slice, batch_size: int, streams: int, *, saved: bool = False) -> range:
    """The data streams this process reads: those whose rows of every global batch (`batch_size / streams`
    each, stream k holding rows k*R..(k+1)*R-1) make up `rows`, the process's share. `saved`: `streams` is the
    count a checkpoint's data position was saved with, which a resume must keep (the message then says which
    process layouts can)."""
    held = rows.stop - rows.start
    per_stream = batch_size // streams if batch_size % streams == 0 else 0
    if per_stream and rows.start % per_stream == 0 and held % per_stream == 0:
        return range(rows.start // per_stream, rows.stop // per_stream)
    where = (f"this process holds rows {rows.start}..{rows.stop - 1} of each batch of {batch_size} (from the mesh "
             f"and the {jax.process_count()} processes)")
    if saved:
        splits = [n for n in range(1, streams + 1) if streams % n == 0]
        raise RunConfigError(
            f"the checkpoint's data position has {streams} stream{'s' if streams > 1 else ''} of "
            f"{batch_size // streams} rows, and {where}: a process must read whole streams to keep the data order. "
            f"Resume on a number of processes (or of groups of processes sharing rows along context) that divides "
            f"{streams}: {splits}; or, to go on in a new data order, start a new run from this one "
            "(init_from=run:RUN_DIR, another run_dir)")
    raise RunConfigError(
        f"data.streams={streams} must divide data.batch_size={batch_size} into streams of whole rows that this "
        f"process's share of each batch consists of, and {where}; use a multiple of {batch_size // held} that "
        f"divides {batch_size}")


def build_datasets(config: RunConfig, vocab_size: int, rows: slice | None = None, saved_streams: int | None = None):
    """(training batches, validation batches or None) of this process, as the config's data format says.

    The data is split into `data.streams` independent streams, each reading its own shard of the files and
    giving batch_size / streams rows of every global batch. A process reads the streams of `rows`, the rows of
    the global batch its devices hold (`process_block`; all rows by default). By default there is one stream
    per distinct block of rows: one per process, or one per group of processes that share rows because the
    context axis spans them (each then keeps its slice of the positions, `global_batch`). A global batch
    depends on the stream count, not on how many processes share it: one process with data.streams=2 sees
    exactly the batches of a two-process run. `saved_streams`: the stream count of the checkpoint being resumed,
    kept whatever the process count now (data.streams must then be null or equal to it).
    """
    tokenizer = load_tokenizer(config.data.tokenizer)
    data = config.data
    rows = rows or slice(0, data.batch_size)
    if saved_streams is not None and data.streams not in (None, saved_streams):
        raise RunConfigError(f"data.streams={data.streams}, but the checkpoint's data position has "
                             f"{saved_streams} streams: resume with data.streams={saved_streams} (or null)")
    streams = saved_streams or data.streams or data.batch_size // (rows.stop - rows.start)
    mine = process_streams(rows, data.batch_size, streams, saved=saved_streams is not None)
    per_stream = data.batch_size // streams
    stream_rows = dict(seq_len=data.seq_len, batch_size=per_stream, shard_count=streams)
    if data.format in ("chat", "preference"):
        chat = chat_format(data.chat_template, data.tokenizer)
        print_line(f"chat format: {chat.origin}")
        read, packed = ((load_sft_samples, sft_dataset) if data.format == "chat" else
                        (load_preference_samples, preference_dataset))

        def load(paths, split):
            samples, stats = read(paths, chat, tokenizer, seq_len=data.seq_len, vocab_size=vocab_size,
                                  bad_lines=data.bad_lines, overlong=data.overlong, progress=print_line)
            print_line(f"{split} data: {stats.summary(data.seq_len)}")
            for line in stats.bad_lines[:10]:
                log.warning("skipped %s", line)
            return samples

        def make(samples, seed):
            return interleave_streams([packed(samples, seed=seed, shard_index=i, packing_bins=data.packing_bins,
                                              **stream_rows) for i in mine], mine.start, streams)

        train_data = make(load(data.train, "train"), data.shuffle_seed)
        eval_data = make(load(data.validation, "validation"), 0) if data.validation else None
        return train_data, eval_data

    def make(documents, seed):
        return interleave_streams([pretraining_dataset(documents, tokenizer, vocab_size=vocab_size, seed=seed,
                                                       shard_index=i, **stream_rows) for i in mine],
                                  mine.start, streams)

    def documents(paths, split):
        bad = BadLines(data.bad_lines)
        docs = load_documents(paths, data.text_field, bad)
        if bad.skipped:
            print_line(f"{split} data: {bad.summary()}")
            for line in bad.skipped[:10]:
                log.warning("skipped %s", line)
        return docs

    train_data = make(documents(data.train, "train"), data.shuffle_seed)
    eval_data = make(documents(data.validation, "validation"), 0) if data.validation else None
    return train_data, eval_data


def global_batch(local: dict, sharding, shape: tuple[int, int], positions: slice) -> dict:
    """This process's rows of a batch of `shape` (rows, positions) → arrays over the whole mesh.

    Every process passes the whole rows it read and keeps `positions`, those its devices hold (all of them
    unless the context axis spans processes; `process_block`). The rows were packed whole, so documents and
    loss targets are the row's.
    """
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)[:, positions], shape)
            for k, v in local.items()}


def _to_host(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def evaluate(run, params, dataset, batches: int, should_stop=lambda: False) -> dict[str, float] | int:
    """Metrics over `batches` batches of `dataset`: {"loss": mean token loss}, or for DPO the pair metrics
    (`train/dpo.py`: PAIR_METRICS), means over all pairs of those batches. `should_stop()` is asked before
    every batch: when it says so the evaluation is abandoned and the number of batches done is returned (a
    signal must not wait for hundreds of batches before the checkpoint is saved)."""
    block = process_block(run.data_sharding, run.batch_shape)
    totals, count = {}, 0.0
    iterator = iter(dataset)
    for done in range(batches):
        if should_stop():
            return done
        batch = global_batch(next(iterator), run.data_sharding, run.batch_shape, block[1])
        sums, n = run.eval_step(params, batch)
        for name, value in _to_host(sums).items():
            totals[name] = totals.get(name, 0.0) + value
        count += float(n)
    return {name: value / max(count, 1.0) for name, value in totals.items()}


def train(config: RunConfig, *, restart: bool = False) -> list[float]:
    """Run (or resume) training; returns the per-step training losses of the steps run in this call.

    The run directory is locked while it trains (RunLock). A directory with checkpoints resumes from the
    newest one that restores, after checking that the settings it depends on (RESUME_FIELDS) are unchanged;
    when none restores, or the settings differ, the run is refused: `restart` moves the earlier run to
    RUN_DIR/previous/ and starts over. Raises TrainingStopped after a signal, NonFiniteLossError on a
    non-finite loss."""
    # Saved resolved and absolute, so that what the run read does not depend on the directory of a later command.
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, tokenizer=storage.absolute(resolve_tokenizer(config))))
    run_dir = RunDir(config.run_dir)
    lock = run_dir.lock() if jax.process_index() == 0 else None
    try:
        if restart:
            _move_earlier_run_aside(run_dir)
        return _train(config, run_dir)
    finally:
        if lock:
            lock.release()


def _move_earlier_run_aside(run_dir: RunDir) -> None:
    if jax.process_index() == 0:
        moved = run_dir.move_aside("moved aside by train.py --restart")
        print_line(f"--restart: moved the earlier run to {moved}" if moved else
                   f"--restart: {run_dir.path} holds no earlier run")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("granite_jax: --restart")


def _check_resumable(checkpoints: RunCheckpoints, config: RunConfig) -> dict | None:
    """Refuse to resume from a checkpoint saved with other data or optimizer settings, or past `steps`; returns
    the metadata of the checkpoint to resume from (None when there is none)."""
    latest = checkpoints.latest_meta()
    if latest is None:
        return None
    step, meta = latest
    where = f"run_dir {config.run_dir!r} holds a checkpoint at step {step}"
    if meta.get(IMPORTED_FROM):  # parameters only: restoring a train state from it would fail
        raise RunConfigError(f"{where} imported from {meta[IMPORTED_FROM]} (parameters only, no optimizer "
                             f"state): train from it with init_from=run:{config.run_dir} and a new run_dir")
    # a data position saved per stream carries its stream count, which build_datasets checks against data.streams
    differences = resume_differences(meta.get("run", {}), config,
                                     ignore=("data.streams",) if DATA_POSITION in meta else ())
    kept = RunDir(config.run_dir).tokenizer_dir
    if storage.isdir(kept) and (changed := changed_tokenizer_files(config.data.tokenizer, kept)):
        differences.append(f"the tokenizer's {', '.join(changed)} differ from the copy the run trained with "
                           f"({kept}): data.tokenizer={config.data.tokenizer!r} was changed since")
    if differences:
        raise RunConfigError(
            f"{where} saved with other settings: {'; '.join(differences)}. Resume with the checkpoint's "
            "settings, use a new run_dir, or pass --restart to move the earlier run to "
            f"{os.path.join(config.run_dir, 'previous')}/ and start over")
    if step > config.steps:
        raise RunConfigError(f"{where}, beyond steps={config.steps}: give steps > {step} to train further")
    return meta


def _train(config: RunConfig, run_dir: RunDir) -> list[float]:
    with RunCheckpoints(config.run_dir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                        save_timeout_s=config.checkpoint.save_timeout_s) as checkpoints:
        return _train_with(checkpoints, config, run_dir)


def _train_with(checkpoints: RunCheckpoints, config: RunConfig, run_dir: RunDir) -> list[float]:
    """Resume or start the run and train it; `checkpoints` is closed by the caller (after the last save)."""
    resumed_meta = _check_resumable(checkpoints, config)
    run = build_run(config)
    model_config = run.model_config
    rows, positions = process_block(run.data_sharding, run.batch_shape)  # this process's block of every batch
    saved_streams = (resumed_meta or {}).get(DATA_POSITION, {}).get("count")
    train_data, eval_data = build_datasets(config, model_config.vocab_size, rows=rows, saved_streams=saved_streams)
    state, run.state = run.state, None  # from here the loop owns the state (donated to every step)
    iterator = iter(train_data)
    restored = checkpoints.restore_latest(abstract_like(state))
    if restored is not None:
        step, state, data_state, _ = restored
        iterator.set_state(data_state)
        print_line(f"resumed from {checkpoints.directory}/{step}")
    elif checkpoints.steps:
        raise RuntimeError(
            f"none of the checkpoints in {checkpoints.directory} (steps {checkpoints.steps}) restores (see the "
            "warnings above); refusing to start over in the same directory. Pass --restart to move them to "
            f"{os.path.join(config.run_dir, 'previous')}/ and start over, or use a new run_dir")
    if jax.process_index() == 0:  # only once the run is known to go ahead: a refused resume changes nothing
        save_run_config(config, run_dir.path)
        if restored is None or not storage.isdir(run_dir.tokenizer_dir):
            run_dir.keep_tokenizer(config.data.tokenizer)
        run_dir.open_logs()
    start = int(state.step)
    if start == config.steps:
        print_line(f"{config.run_dir} is already at step {start} = steps: nothing to train (raise steps to go on)")
        return []

    tokens_per_step = config.data.batch_size * config.data.seq_len
    losses: list[float] = []
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    frozen = ("" if run.frozen is None else
              f", LoRA adapters; {sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.frozen)):,} frozen")
    print_line(f"training {config.weight_source} "
               f"({n_params:,} trained parameters{frozen}) for steps {start + 1}..{config.steps}; "
               f"batch {config.data.batch_size} x {config.data.seq_len} tokens; run dir {config.run_dir}")

    with StopSignal() as stop, run.activate():
        checkpoint, hooks = _hooks(config, run, run_dir, checkpoints, iterator, eval_data, stop, tokens_per_step)
        try:
            for step in range(start + 1, config.steps + 1):
                batch = next(iterator)
                model_flops = tokens_per_step * run.flops_per_token(mean_keys_per_query(batch.get("segment_ids")))
                state, metrics = run.train_step(
                    state, global_batch(batch, run.data_sharding, run.batch_shape, positions))
                metrics = _to_host(metrics)
                if not np.isfinite(metrics["loss"]):
                    raise NonFiniteLossError(
                        f"loss is {metrics['loss']} at step {step}; stopping. The last good checkpoint is kept "
                        f"in {checkpoints.directory}; lower optimizer.lr or check the data.")
                losses.append(metrics["loss"])
                done = StepDone(step, state, metrics, model_flops)
                for hook in hooks:
                    hook.after_step(done)
            checkpoint.save(config.steps, state)
        finally:
            for hook in hooks:
                hook.close()
    return losses


def _hooks(config: RunConfig, run, run_dir: RunDir, checkpoints: RunCheckpoints, iterator, eval_data,
           stop: StopSignal, tokens_per_step: int) -> tuple[CheckpointEvery, list[Hook]]:
    """What follows every step, in this order: the metrics log, the checkpoint every N steps, the evaluation
    every N steps (with validation data), the stop on a signal; and the checkpoint hook (which saves the last
    step too)."""
    logs = jax.process_index() == 0
    log = MetricsLog(metrics_file=run_dir.metrics_file if logs else None,
                     tensorboard_dir=run_dir.tensorboard if logs else None,
                     upload=run_dir.upload_logs if logs else None, log_every=config.log_every, steps=config.steps,
                     tokens_per_step=tokens_per_step,
                     learning_rate=lambda step: learning_rate_at(config.optimizer, config.steps, step),
                     peak_tflops=_peak_tflops(config))
    meta = dict(model=run.model_config.to_hf(), run=config.to_dict())
    checkpoint = CheckpointEvery(checkpoints, config.checkpoint.every_steps, iterator.get_state, meta,
                                 after_save=log.upload)
    hooks = [log, checkpoint]
    if eval_data is not None:
        hooks.append(EvaluateEvery(
            lambda params, should_stop: evaluate(run, params, eval_data, config.eval_batches, should_stop),
            every=config.eval_every, steps=config.steps, batches=config.eval_batches, log=log, should_stop=stop.agreed))
    hooks.append(StopOnSignal(stop, checkpoint, checkpoints))
    return checkpoint, hooks
