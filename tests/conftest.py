"""The suite's one harness: paths, the canonical tiny run, the transformers oracle, and the ways a test runs
the command-line tools (in this process, or in a subprocess where a process must die or see other devices).

Test files import from here only (`from conftest import ...`), never from each other.

How the suite stays fast on 2 cores:
- one spelling of "a small training run" (`TINY_RUN`), so that the persistent XLA compilation cache below hits;
- the CLIs run in-process through their `main(argv)` unless a process has to die (SIGKILL, SIGTERM, a kill
  during a save), several processes must join, or the run needs several (virtual) devices;
- the checks that need 8 virtual CPU devices run together in two subprocesses per pytest run, one per worker
  (`eight_devices`), each check reported under its own name;
- XLA:CPU's backend compiles at -O0 in the test processes (below);
- tests that take 12 s or more, and the multi-process and 8-device ones, are marked `slow`: `pytest -m "not slow"`
  is the edit loop (2.3 minutes; 4.5 on a slow day), the test command runs everything;
- reference runs (the losses an interrupted or sharded run must repeat) are computed once per pytest run and
  shared by every worker (`reference_losses`), keyed by their overrides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Set before JAX is imported, for this process and every subprocess it starts (they inherit the environment):
# - one persistent XLA compilation cache for the suite (executables read from it give the same results, memory
#   analysis and HLO text);
# - XLA:CPU's LLVM backend at -O0: most of the suite's time is compiling small programs, and this cuts it by
#   about a fifth (test_packing + test_parity + test_generate: 160 s -> 129 s); the HLO, its buffers and the
#   values the tests compare are those of the default level within the tests' tolerances.
ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax-compilation"))
# Every program, however quick to compile (JAX's default keeps those over 1 s): the suite's processes compile the
# same small programs (the tiny run's init, eval and optimizer steps) again and again. test_train.py +
# test_model.py without the slow tests, empty cache: 69 s -> 65 s.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The YNNPACK fusions are off in every test process, as granite_jax turns them off for virtual devices
# (runtime.py), so that one-device references and multi-device runs round their dots alike.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
                  " --xla_cpu_experimental_ynn_fusion_type=")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

from granite_jax.runtime import configure_process  # noqa: E402

configure_process()  # what train.py does at its start (our CPU defaults), for this process and its subprocesses

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402
from flax import nnx  # noqa: E402

from granite_jax.model.lora import LORA_TARGETS  # noqa: E402

TOKENIZER = str(ROOT / "data" / "tokenizer")
KJV_TRAIN = str(ROOT / "data" / "kjv" / "kjv.jsonl.gz")
KJV_VALIDATION = str(ROOT / "data" / "kjv" / "kjv-validation.jsonl.gz")
CHAT_TRAIN = str(ROOT / "data" / "chat" / "train.jsonl.gz")
PREFERENCE_TRAIN = str(ROOT / "data" / "preferences" / "train.jsonl.gz")
PREFERENCE_VALIDATION = str(ROOT / "data" / "preferences" / "validation.jsonl.gz")


def first_lines(path: str, count: int) -> list[str]:
    """The first `count` lines of a gzipped JSON-lines file (a small corpus cut from a bundled one)."""
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [next(f) for _ in range(count)]

# ------------------------------------------------------------------------------------ the tiny run
# The model every small training run uses: 2 layers of the tiny hybrid MoE (Mamba, attention).
TINY_LAYERS = {"num_hidden_layers": 2, "layer_types": ["mamba", "attention"], "mamba_chunk_size": 32}
TINY_MODEL = "model_overrides={num_hidden_layers: 2, layer_types: [mamba, attention], mamba_chunk_size: 32}"
# The one small pretraining run of the suite (configs/pretrain-tiny.yaml with these overrides): 2 rows of 64
# tokens per step, a checkpoint every 4 steps. Tests add `steps=` and what their property needs.
TINY_RUN = (TINY_MODEL, f"data.train=[{KJV_TRAIN}]", f"data.tokenizer={TOKENIZER}", "data.seq_len=64",
            "data.batch_size=2", "log_every=4", "eval_every=1000", "data.validation=[]", "optimizer.warmup_steps=2",
            "checkpoint.every_steps=4", "checkpoint.keep=10")
# The same run as a RunConfig mapping (for `train(config)` in-process and the multi-device modules), with
# batch 8 so that every mesh of 8 devices gets a row per device.
TINY_MESH_RUN = dict(model_overrides=TINY_LAYERS, steps=2, log_every=1, eval_every=1000,
                     data={"seq_len": 64, "batch_size": 8, "validation": []}, optimizer={"warmup_steps": 1},
                     checkpoint={"every_steps": 100})


def tiny_config(*overrides, config: str | None = "configs/pretrain-tiny.yaml"):
    """The RunConfig of `TINY_RUN` + overrides (paths resolved against the repository)."""
    from granite_jax.train.config import load_run_config

    with contextlib.chdir(ROOT):
        return load_run_config(config, [*TINY_RUN, *overrides])


# ------------------------------------------------------------------------------- running the CLIs
@dataclasses.dataclass
class Ran:
    """What a command did: its exit code and output (in-process or from a finished subprocess)."""
    returncode: int
    stdout: str
    stderr: str

    def __iter__(self):  # code, stdout, stderr = convert_cli(...)
        return iter((self.returncode, self.stdout, self.stderr))

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def ok(self) -> Ran:
        assert self.returncode == 0, self.stdout[-3000:] + self.stderr[-3000:]
        return self

    def error_line(self) -> str:
        """The command's one `error:` line (exit code 2, no traceback)."""
        assert self.returncode == 2, self.output[-3000:]
        assert "Traceback" not in self.stderr, self.stderr
        errors = [line for line in self.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, self.stderr
        return errors[0]


def run_main(main, argv, cwd=ROOT) -> Ran:
    """`main(argv)` of a command-line tool in this process, from `cwd`, with its stdout, stderr and the
    warnings logged meanwhile (formatted as train.py's logging.basicConfig formats them) captured."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    package_log = logging.getLogger()  # the root logger: what train.py's logging.basicConfig prints
    package_log.addHandler(handler)
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 2
    finally:
        package_log.removeHandler(handler)
    return Ran(code, out.getvalue(), err.getvalue())


def _root_script(name: str):
    """A script at the repository root (train.py, eval.py) as a module."""
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT))


def train_cli(*argv, cwd=ROOT) -> Ran:
    """`python train.py ARGV` in this process."""
    return run_main(_root_script("train").main, argv, cwd)


def eval_cli(*argv) -> Ran:
    """`python eval.py ARGV` in this process."""
    return run_main(_root_script("eval").main, argv)


def convert_cli(*argv) -> Ran:
    """`python -m granite_jax.convert ARGV` in this process."""
    from granite_jax.convert.__main__ import main

    return run_main(main, argv)


def train_tiny(run_dir, *overrides) -> Ran:
    """The tiny run (`TINY_RUN` + overrides) in `run_dir`, in this process; it must succeed."""
    return train_cli(f"run_dir={run_dir}", *TINY_RUN, *overrides).ok()


def virtual_cpu_devices(devices: int) -> dict:
    """The environment of a subprocess whose JAX sees `devices` CPU devices. Their collectives wait for each other
    up to 10 minutes: XLA:CPU's default (40 s) aborts the process when a busy 2-core machine runs one device's
    thread that much later than the others."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
                         " --xla_cpu_collective_call_terminate_timeout_seconds=600"
                         " --xla_cpu_collective_timeout_seconds=600"}


def python_process(*argv, env=None, **popen) -> subprocess.Popen:
    """`python ARGV` from the repository root, stdout and stderr piped apart."""
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 900) -> Ran:
    out, err = proc.communicate(timeout=timeout)
    return Ran(proc.returncode, out, err)


# A wrapper that runs train.py and acts on itself when Orbax is about to commit a checkpoint (every file written
# to its temporary directory, the rename to STEP not yet done), or just after it committed one. Deterministic,
# unlike a signal sent from outside at a moment the test polls for.
_ACT_ON_CHECKPOINT = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
step, when, signum = {step}, {when!r}, {signum}
commit = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
    ours = os.path.basename(str(self._final_path)) == str(step)
    if ours and when == "before":
        os.kill(os.getpid(), signum)
    result = await commit(self, *args, **kwargs)
    if ours and when == "after":
        os.kill(os.getpid(), signum)
    return result
atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train_process(run_dir, *overrides, signal_at: tuple[int, str, int] | None = None, env=None,
                  timeout: float = 900) -> Ran:
    """`python train.py` on the tiny run in a subprocess; with `signal_at=(step, "before" | "after", signum)`
    the process sends itself `signum` just before or just after checkpoint `step` is committed."""
    script = [] if signal_at is None else ["-c", _ACT_ON_CHECKPOINT.format(
        step=signal_at[0], when=signal_at[1], signum=int(signal_at[2]))]
    proc = python_process(*script, ROOT / "train.py", f"run_dir={run_dir}", *TINY_RUN, *overrides,
                          env={**os.environ, **(env or {})})
    return finish(proc, timeout)


SIGKILL, SIGTERM = signal.SIGKILL, signal.SIGTERM


# What every `launch_processes` run adds to its settings. Its one-process reference is
# `reference_losses(f"steps={n}", *settings_but_the_mesh, *LAUNCH_RUN)`: the same run on this process's device.
LAUNCH_RUN = ("data.validation=[]", "log_every=1", "eval_every=1000", "optimizer.warmup_steps=1",
              "checkpoint.every_steps=2", "checkpoint.async_save=false")


# Two data streams of 4 rows: the rows of a two-process job, read by one process too (test_parallel, test_launch).
TWO_STREAMS = ["data.streams=2", "data.batch_size=8", "data.seq_len=64", TINY_MODEL]


def launch_processes(run_dir, steps: int, processes: int, settings, devices: int = 8, launcher=None) -> list[str]:
    """`train.py` as `processes` processes sharing `devices` virtual CPU devices. They join with the
    --coordinator-address flags, or, with `launcher` (process index -> environment variables), with no flags
    and the variables a cluster launcher would set. Returns each process's output; all must succeed."""
    from granite_jax.parallel.distributed import free_local_port

    args = [f"run_dir={run_dir}", f"steps={steps}", *settings, *LAUNCH_RUN]
    env = virtual_cpu_devices(devices // processes)
    port = free_local_port()
    distributed = (lambda i: [f"--coordinator-address=127.0.0.1:{port}", f"--num-processes={processes}",
                              f"--process-id={i}"]) if processes > 1 and launcher is None else (lambda i: [])
    launcher = launcher or (lambda i: {})
    procs = [python_process("train.py", *distributed(i), *args, env={**env, **launcher(i)})
             for i in range(processes)]
    outputs = [finish(p, timeout=1200).ok().output for p in procs]
    if processes > 1:  # only process 0 logs
        assert "| loss " in outputs[0] and "| loss " not in outputs[1]
    return outputs


# --------------------------------------------------------------------------------- reading a run
def metrics(run_dir, name: str = "loss") -> list[float]:
    """One metric of a run's metrics.jsonl, by step (a resumed run's repeated steps: the latest record)."""
    values = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if name in record:
                values[record["step"]] = record[name]
    return [values[s] for s in sorted(values)]


def data_position(run_dir, step: int) -> dict:
    """The data position saved with checkpoint `step` of a run (every process's streams, saved by process 0)."""
    from granite_jax.formats.run import checkpoint_meta
    from granite_jax.train.checkpoint import DATA_POSITION

    return checkpoint_meta(str(run_dir), step)[1][DATA_POSITION]


def copy_of_run(run_dir, into):
    """A copy of a shared run directory (a reference run: its DONE marker left out) to train or refuse in."""
    import shutil

    shutil.copytree(run_dir, into, ignore=shutil.ignore_patterns("DONE"), dirs_exist_ok=True)
    return into


def checkpoint_steps(run_dir) -> list[int]:
    """The steps of a run's committed checkpoints."""
    return sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit())


def wait_for_checkpoint(run_dir, step, proc, timeout=300):
    """Wait until checkpoint `step` of the training process `proc` is committed."""
    path = os.path.join(run_dir, "checkpoints", str(step))
    deadline = time.time() + timeout
    while not (os.path.isdir(path) and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, f"no checkpoint {path}"
        time.sleep(0.05)


# ----------------------------------------------------------------------- shared across the workers
def _shared_dir(tmp_path_factory) -> Path:
    """A directory every pytest-xdist worker of this run sees (the parent of the workers' base temp dirs)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _trained_once(run_dir: Path, key: str, train_into) -> tuple[list[float], Path]:
    """`train_into(run_dir)` once per pytest run, whichever worker asks first (the others wait on its lock and
    read the result); a directory left by a worker that died while training is trained again."""
    with FileLock(str(run_dir) + ".lock"):
        done = run_dir / "DONE"
        if not done.exists():
            if run_dir.exists():
                import shutil
                shutil.rmtree(run_dir)
            train_into(run_dir)
            done.write_text(key)
    return metrics(run_dir), run_dir


@pytest.fixture(scope="session")
def reference_losses(tmp_path_factory):
    """`reference_losses(*overrides)`: (losses, run_dir) of the tiny run with these overrides trained straight
    through in-process; computed once per pytest run whichever worker asks first, then read by all."""
    shared = _shared_dir(tmp_path_factory) / "reference-runs"
    shared.mkdir(exist_ok=True)

    def get(*overrides) -> tuple[list[float], Path]:
        key = json.dumps(overrides)
        return _trained_once(shared / hashlib.sha1(key.encode()).hexdigest()[:12], key,
                             lambda run_dir: train_tiny(run_dir, *overrides))

    return get


@pytest.fixture(scope="session")
def reference_train(tmp_path_factory):
    """`reference_train(config_mapping)`: (losses, run_dir) of `train(config)` in-process on this process's one
    device, for a RunConfig given as a mapping of overrides (as the multi-device modules take it); once per run."""
    shared = _shared_dir(tmp_path_factory) / "reference-train"
    shared.mkdir(exist_ok=True)

    def train_into(overrides: dict, run_dir: Path) -> None:
        from granite_jax.train import train
        from granite_jax.train.config import RunConfig, apply_overrides

        config = apply_overrides(RunConfig(), {**overrides, "run_dir": str(run_dir)})
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(io.StringIO()):
            train(config)

    def get(overrides: dict) -> tuple[list[float], Path]:
        key = json.dumps(overrides, sort_keys=True)
        return _trained_once(shared / hashlib.sha1(key.encode()).hexdigest()[:12], key,
                             lambda run_dir: train_into(overrides, run_dir))

    return get


# ------------------------------------------------------------------------------ multi-device checks
def run_multidevice(jobs: dict, devices: int, timeout: float = 1800, times: Path | None = None) -> dict:
    """Run multi-device check modules in one subprocess on `devices` virtual CPU devices.

    `jobs`: {job name: (module name under tests/multidevice, JSON argument)}. Returns {job name: result}, where
    a failed job's result is a `MultideviceFailure` carrying its traceback (the other jobs still ran). `times`:
    a file to write each job's seconds to (pytest reports only the process's total, under its first test)."""
    proc = subprocess.run([sys.executable, "-m", "tests.multidevice", json.dumps(jobs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=virtual_cpu_devices(devices))
    if times is not None:
        times.write_text("".join(f"{line}\n" for line in proc.stderr.splitlines() if line.startswith("job ")))
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            name, value = json.loads(line[len("RESULT "):])
            results[name] = value
        elif line.startswith("FAILED "):
            name, trace = json.loads(line[len("FAILED "):])
            results[name] = MultideviceFailure(trace)
    for name in jobs:
        results.setdefault(name, MultideviceFailure(
            f"no result (exit code {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"))
    return results


class MultideviceFailure:
    def __init__(self, trace: str):
        self.trace = trace


def multidevice_result(results: dict, name: str):
    result = results[name]
    if isinstance(result, MultideviceFailure):
        pytest.fail(f"multi-device job {name!r} failed:\n{result.trace}", pytrace=False)
    return result


def eight_device_job(name: str):
    """Mark a test as reading job `name` of a shared 8-device process (see `eight_devices`); such a test is
    also marked slow."""
    return pytest.mark.eight_devices(name)


# The 8-device jobs: name -> a function of a scratch directory giving (module, JSON argument).
# Every axis of data / fsdp / expert / tensor in two meshes (fsdp x tensor and data x expert alone were dropped
# for suite time: their axes are in these; the LoRA mesh is fsdp x expert x tensor too).
MESHES = {"data x fsdp": {"data": 2, "fsdp": 4}, "fsdp x expert x tensor": {"fsdp": 2, "expert": 2, "tensor": 2}}
# Context parallelism: the tiny model with chunks of 16. The attention model on context 8 (contiguous) and on
# expert 2 x context 4 (zigzag); the hybrid on expert 2 x tensor 2 x context 2 (zigzag, whole rows: half-pieces
# of one chunk) and fsdp 2 x context 4 (zigzag, sub-pieces: half-pieces shorter than a chunk). Contiguous pieces
# of Mamba: the context ops job (values and gradients), the scoring job (context 8).
CONTEXT_MESHES = {"context 8": {"context": 8},
                  "expert 2 x context 4 zigzag": {"mesh": {"expert": 2, "context": 4}, "context_layout": "zigzag"},
                  "expert 2 x tensor 2 x context 2 zigzag": {"mesh": {"expert": 2, "tensor": 2, "context": 2},
                                                             "context_layout": "zigzag"}}


def context_run(model: str) -> dict:
    """The tiny mesh run of `model` (tiny-hybrid-moe: Mamba + attention; tiny-dense-rope: 2 attention layers)
    with chunks of 16."""
    layers = ["mamba", "attention"] if model == "tiny-hybrid-moe" else ["attention", "attention"]
    return {**TINY_MESH_RUN, "model": model,
            "model_overrides": {"num_hidden_layers": 2, "layer_types": layers, "mamba_chunk_size": 16}}


def context_meshes(model: str) -> dict:
    """tiny-hybrid-moe: expert 2 x tensor 2 x context 2 (zigzag, whole rows) and the layers in sub-pieces of 4
    tokens per device on fsdp 2 x context 4 (zigzag). tiny-dense-rope: RoPE positions carried by the pieces, in
    both layouts: context 8 (contiguous) and expert 2 x context 4 (zigzag)."""
    if model == "tiny-dense-rope":
        return {name: CONTEXT_MESHES[name] for name in ("context 8", "expert 2 x context 4 zigzag")}
    subpieces = {"mesh": {"fsdp": 2, "context": 4}, "context_layout": "zigzag",
                 "model_overrides": {**context_run(model)["model_overrides"], "subpiece_tokens": 4}}
    return {"expert 2 x tensor 2 x context 2 zigzag": CONTEXT_MESHES["expert 2 x tensor 2 x context 2 zigzag"],
            "fsdp 2 x context 4 zigzag in sub-pieces": subpieces}


LORA_MESH = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
LORA_ON_A_MESH = {"lora": {"rank": 4, "alpha": 8.0, "targets": list(LORA_TARGETS)}}


def _sharded_hf_load_job(root: Path):
    """An HF checkpoint (untied head, Mamba projection biases) and its `convert import` as a run."""
    from granite_jax.convert.__main__ import import_checkpoint

    directory = root / "hf"
    make_hf_model(0, tie_word_embeddings=False, mamba_proj_bias=True).save_pretrained(directory)
    import_checkpoint(str(directory), str(root / "imported"))
    return "sharded_hf_load", {"directory": str(directory), "run_dir": str(root / "imported"), "meshes": {
        "fsdp8": [{"fsdp": 8}, "fsdp"], "fsdp2_tensor2_expert2": [{"fsdp": 2, "tensor": 2, "expert": 2}, "fsdp_tp"]}}


def _train_meshes(meshes: dict, overrides: dict):
    return lambda root: ("train_meshes", {"meshes": meshes, "root": str(root), "overrides": overrides})


EIGHT_DEVICE_JOBS = {
    "sharded_state": lambda root: ("sharded_state", None),
    "loop_collectives": lambda root: ("loop_collectives", None),
    "loss_chunks": lambda root: ("loss_chunks", None),
    "splash_mesh": lambda root: ("splash_mesh", None),
    "pallas_ssd_mesh": lambda root: ("pallas_ssd_mesh", None),
    "expert_parallel": lambda root: ("expert_parallel", None),
    "ragged_exchange": lambda root: ("ragged_exchange", None),
    "tensor_parallel_mamba": lambda root: ("tensor_parallel_mamba", None),
    "two_plans": lambda root: ("two_plans", None),
    "sharded_hf_load": _sharded_hf_load_job,
    "train meshes": _train_meshes(MESHES, TINY_MESH_RUN),
    "context meshes tiny-hybrid-moe": _train_meshes(context_meshes("tiny-hybrid-moe"), context_run("tiny-hybrid-moe")),
    "context meshes tiny-dense-rope": _train_meshes(context_meshes("tiny-dense-rope"), context_run("tiny-dense-rope")),
    "context ops 8 shards": lambda root: ("context_parallel_ops", {"shards": 8}),
    "context_parallel_program": lambda root: ("context_parallel_program", {"seq_len": 65536}),
    "long_row_memory": lambda root: ("long_row_memory", {"config": str(ROOT / "configs" / "pretrain-512k.yaml")}),
    "scoring_mesh": lambda root: ("scoring_mesh", None),
    "lora_mesh": lambda root: ("lora_mesh", {**TINY_MESH_RUN, **LORA_ON_A_MESH, "mesh": LORA_MESH,
                                             "run_dir": str(root / "specs")}),
    "lora mesh training": _train_meshes({"lora mesh": LORA_MESH}, {**TINY_MESH_RUN, **LORA_ON_A_MESH}),
}


# The 8-device jobs run in two processes, one per pytest worker, balanced by their measured times (2.2-2.3
# minutes each on the 2-core machine on 2026-12-08): the training on meshes in one, everything else in the other.
EIGHT_DEVICE_PROCESS = {name: "eight-devices-training" if name in (
    "train meshes", "context meshes tiny-hybrid-moe", "context meshes tiny-dense-rope", "lora mesh training",
    "lora_mesh", "sharded_state", "two_plans", "loss_chunks") else "eight-devices-ops" for name in EIGHT_DEVICE_JOBS}


@pytest.fixture(scope="session")
def eight_devices(request, tmp_path_factory):
    """`eight_devices(name)`: the result of the 8-device job `name`; `eight_devices.root(name)`: its scratch
    directory (a training job's run directories are ROOT/MESH-NAME-WITHOUT-SPACES). The jobs that the selected
    tests name (`@eight_device_job(name)`) run once per pytest run, in the process EIGHT_DEVICE_PROCESS gives
    them, on 8 virtual CPU devices: the tests of one process share an xdist group, so one worker holds them."""
    wanted = sorted({mark.args[0] for item in request.session.items
                     for mark in item.iter_markers("eight_devices")})
    base = tmp_path_factory.mktemp("eight-devices")
    cache: dict = {}

    def root(name: str) -> Path:
        return base / name.replace(" ", "-")

    def get(name: str):
        process = EIGHT_DEVICE_PROCESS[name]
        if process not in cache:
            jobs = {}
            for job in wanted:
                if EIGHT_DEVICE_PROCESS[job] == process:
                    root(job).mkdir()
                    jobs[job] = EIGHT_DEVICE_JOBS[job](root(job))
            cache[process] = run_multidevice(jobs, devices=8, times=base / f"{process}.times")
        return multidevice_result(cache[process], name)

    get.root = root
    return get


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the xdist_group marks into node ids
def pytest_collection_modifyitems(config, items):
    """The tests of each 8-device process go to one worker together (`--dist loadgroup`), and first: the
    scheduler hands out work in collection order, so each worker starts with one long unit and the rest fills
    in around them, instead of a worker reaching an 8-device process last while the other one idles. The other
    slow tests come next, the quick ones last."""
    for item in items:
        jobs = {mark.args[0] for mark in item.iter_markers("eight_devices")}
        processes = {EIGHT_DEVICE_PROCESS[job] for job in jobs}
        assert len(processes) <= 1, f"{item.nodeid} reads jobs of two 8-device processes: {sorted(jobs)}"
        if processes:
            item.add_marker(pytest.mark.xdist_group(processes.pop()))
            item.add_marker(pytest.mark.slow)  # an 8-device process takes minutes
    # Then the other slow tests, the quick ones last: neither worker is left idle while the other finishes a
    # minute-long test at the end.
    items.sort(key=lambda item: (item.get_closest_marker("eight_devices") is None,
                                 item.get_closest_marker("slow") is None))  # stable


# ------------------------------------------------------------------------ the transformers oracle
def checkpoint_tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of an HF safetensors checkpoint directory (one file or shards), by name."""
    from safetensors.numpy import load_file

    from granite_jax.formats.hf import safetensors_files

    out = {}
    for path in safetensors_files(str(directory)):
        out.update(load_file(path))
    return out


# A tiny hybrid MoE in transformers' field names. Tests override fields per case.
TINY_HF = dict(
    vocab_size=128, hidden_size=64, intermediate_size=32, shared_intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, layer_types=["mamba", "attention", "mamba"],
    mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=8,
    num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0, logits_scaling=2.0,
    residual_multiplier=0.3, attention_multiplier=0.1, rms_norm_eps=1e-5, tie_word_embeddings=True,
    position_embedding_type="nope", pad_token_id=None,
)


def make_hf_model(seed: int = 0, **overrides):
    """A random `GraniteMoeHybridForCausalLM` whose Mamba constants and norm weights are perturbed away from
    their init values (ones / log(1..n)), so that mistakes in how they are read cannot hide."""
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    torch.manual_seed(seed)
    config = GraniteMoeHybridConfig(**{**TINY_HF, **overrides})
    model = GraniteMoeHybridForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-2:]
            if leaf[-1] in ("A_log", "dt_bias", "D", "bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a random transformers model to a fresh directory; returns (directory, torch model)."""

    def make(seed: int = 0, name: str = "hf", **overrides):
        model = make_hf_model(seed, **overrides)
        directory = tmp_path / name
        model.save_pretrained(directory)
        return str(directory), model

    return make


def hf_logits(model, input_ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(input_ids)), use_cache=False).logits.float().numpy()


@nnx.jit
def forward(model, input_ids, segment_ids=None, positions=None):
    return model(input_ids, segment_ids, positions)


def max_rel_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def random_ids(seed: int, shape, vocab: int = 128):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)
