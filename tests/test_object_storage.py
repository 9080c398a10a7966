"""Run directories, data and checkpoints on object storage, against local fakes only: a fake
GCS server (tests/gcs_fake.py) for `gs://` end to end, and fsspec's in-memory filesystem (`memory://`, the same
fsspec code path as `s3://`) for the storage layer and data sources."""

import json
import os
import shutil

import fsspec
import jax
import numpy as np
import pytest
from conftest import ROOT, checkpoint_tensors, metrics, train_tiny
from flax import nnx

from granite_jax import storage
from granite_jax.data.sources import DataError, load_documents, read_documents
from granite_jax.eval.checkpoints import load_for_eval
from granite_jax.run_dir import RunDir, RunDirError
from granite_jax.train import load_run_config
from granite_jax.train.config import RunConfigError
from tests.gcs_fake import BUCKET, fake_gcs


@pytest.fixture(scope="module")
def gcs():
    pytest.importorskip("gcsfs")  # both in requirements-test.txt
    pytest.importorskip("gcp_storage_emulator")
    with fake_gcs() as env:
        yield env


def _upload(local: str, url: str) -> None:
    fs, path = storage.filesystem(url)
    fs.put(local, path, recursive=os.path.isdir(local))


@pytest.mark.slow
def test_a_run_on_gcs_trains_resumes_and_evaluates_like_a_local_run(gcs, tmp_path):
    """run_dir, training data and tokenizer all on gs://: the run trains 4 steps, stops, resumes to 6 from its
    gs:// checkpoint, and its 6 losses equal those of a local run trained straight through 6 steps. (A constant
    learning rate after the warmup: with the default cosine schedule, whose length is `steps`, a 4-step and a
    6-step run would be two programs to compile and 4 steps then 6 another run than 6 straight.) Its
    config, metrics (all 6 steps, uploaded whole), TensorBoard events, tokenizer copy and checkpoints are in
    the bucket, its lock is released, and evaluation loads the model from the gs:// run directory with the
    local run's parameters."""
    data = f"gs://{BUCKET}/corpus/kjv.jsonl.gz"
    tokenizer = f"gs://{BUCKET}/tokenizer"
    _upload(os.path.join(ROOT, "data/kjv/kjv.jsonl.gz"), data)
    _upload(os.path.join(ROOT, "data/tokenizer"), tokenizer)
    run_dir = f"gs://{BUCKET}/runs/tiny"
    constant = ["optimizer.schedule=constant", "checkpoint.every_steps=2"]
    remote = [f"data.train=[{data}]", f"data.tokenizer={tokenizer}", *constant]

    train_tiny(run_dir, "steps=4", *remote)  # in this process, which runs the fake server and has its variables
    out = train_tiny(run_dir, "steps=6", *remote).stdout
    assert f"resumed from {run_dir}/checkpoints/4" in out
    local = str(tmp_path / "local")
    train_tiny(local, "steps=6", *constant)

    fs, root = storage.filesystem(run_dir)
    with fs.open(f"{root}/metrics.jsonl") as f:
        steps = [json.loads(line) for line in f]
    remote_losses = {m["step"]: m["loss"] for m in steps}
    assert sorted(remote_losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([remote_losses[s] for s in range(1, 7)], metrics(local), rtol=1e-6)
    names = set(storage.listdir(run_dir))
    assert {"config.yaml", "metrics.jsonl", "tensorboard", "tokenizer", "checkpoints"} <= names
    assert "run.lock" not in names
    assert storage.listdir(f"{run_dir}/tokenizer") == ["tokenizer.json", "tokenizer_config.json"]
    assert len(storage.listdir(f"{run_dir}/tensorboard")) == 2  # one events file per start
    assert {"2", "4", "6"} <= set(storage.listdir(f"{run_dir}/checkpoints"))
    assert RunDir(run_dir).saved_config()["data"]["tokenizer"] == tokenizer  # a URL is not made "absolute"

    remote_model, remote_tokenizer, _ = load_for_eval(run_dir)
    local_model, local_tokenizer, _ = load_for_eval(local)
    assert remote_tokenizer.encode("In the beginning") == local_tokenizer.encode("In the beginning")
    remote_params, local_params = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (remote_model, local_model))
    assert len(remote_params) == len(local_params)
    for remote_value, local_value in zip(remote_params, local_params):
        np.testing.assert_allclose(np.asarray(remote_value), np.asarray(local_value), rtol=1e-6, atol=1e-7)


def test_the_run_lock_holds_on_gcs(gcs):
    """A second lock on a gs:// run directory is refused while the first is held, and can be taken once it is
    released."""
    run = RunDir(f"gs://{BUCKET}/runs/locked")
    with run.lock():
        with pytest.raises(RunDirError, match="is in use by process"):
            run.lock()
    run.lock().release()


# ------------------------------------------------------------------------- storage layer on memory://
@pytest.fixture
def memory():
    fs = fsspec.filesystem("memory")
    yield "memory://bucket"
    for path in fs.ls("/", detail=False):
        fs.rm(path, recursive=True)


def test_storage_operations_on_a_url_match_local_ones(memory, tmp_path):
    """The operations RunDir and the data readers use behave alike on a local directory and under a URL."""
    for root in (str(tmp_path / "local"), memory):
        storage.makedirs(storage.join(root, "a"))
        with storage.open_file(storage.join(root, "a", "f.txt"), "w") as f:
            f.write("hello")
        assert storage.exists(storage.join(root, "a", "f.txt")) and storage.isfile(storage.join(root, "a", "f.txt"))
        assert storage.isdir(storage.join(root, "a")) and storage.listdir(root) == ["a"]
        assert storage.create_exclusive(storage.join(root, "lock"), b"1")
        assert not storage.create_exclusive(storage.join(root, "lock"), b"2")
        storage.move(storage.join(root, "a"), storage.join(root, "b"))
        assert storage.listdir(root) == ["b", "lock"] and storage.listdir(storage.join(root, "b")) == ["f.txt"]
        storage.remove(storage.join(root, "lock"))
        storage.remove(storage.join(root, "lock"))  # removing what is not there is fine
        assert storage.listdir(root) == ["b"]
        copy = storage.local_copy(storage.join(root, "b"))
        assert open(os.path.join(copy, "f.txt")).read() == "hello"
    assert storage.absolute("gs://b/run") == "gs://b/run" and storage.absolute("run") == os.path.abspath("run")
    assert storage.join("gs://b/run/", "checkpoints") == "gs://b/run/checkpoints"


def test_data_sources_read_urls_as_local_files(memory, tmp_path):
    """JSONL (gzipped), text and Parquet documents read from a URL equal those read from local files; a
    missing URL, and an .arrayrecord URL (array_record reads local files only), are one DataError each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = tmp_path / "docs"
    local.mkdir()
    shutil.copy(os.path.join(ROOT, "data/kjv/kjv-validation.jsonl.gz"), local / "v.jsonl.gz")
    (local / "t.txt").write_text("first paragraph\nline two\n\nsecond paragraph\n")
    pq.write_table(pa.table({"text": ["a parquet document", "another"]}), local / "p.parquet")
    _upload(str(local), f"{memory}/docs")
    for name in ("v.jsonl.gz", "t.txt", "p.parquet"):
        assert list(read_documents(f"{memory}/docs/{name}")) == list(read_documents(str(local / name)))
    assert load_documents([f"{memory}/docs/v.jsonl.gz"]) == load_documents([str(local / "v.jsonl.gz")])

    with pytest.raises(DataError, match="does not exist"):
        list(read_documents(f"{memory}/docs/missing.jsonl"))
    with pytest.raises(DataError, match="local paths only"):
        load_documents([f"{memory}/docs/x.arrayrecord"])


def test_unsupported_locations_are_refused_naming_the_field():
    """Checkpoints cannot go to s3:// (Orbax writes local paths and gs:// only), and init_from=hf: reads local
    directories only: each is refused before anything runs, naming the field and what to do instead."""
    with pytest.raises(RunConfigError, match=r"run_dir='s3://b/run': checkpoints cannot be written to s3://"):
        load_run_config(None, ["run_dir=s3://b/run"])
    with pytest.raises(RunConfigError, match=r"init_from='hf:gs://b/model': HF checkpoint directories are read "
                                             "from local paths only"):
        load_run_config(None, ["init_from=hf:gs://b/model", "data.tokenizer=data/tokenizer"])
    with pytest.raises(RunDirError, match="mount the bucket"):
        RunDir("s3://b/run").lock()


def test_convert_import_into_gcs_and_export_from_it(gcs, hf_checkpoint, tmp_path):
    """`convert import HF_DIR gs://.../run` (the route the hf: refusal points to) writes the step-0 checkpoint
    and the tokenizer copy into the bucket; `convert export gs://.../run OUT` gives back every tensor
    byte-identical, with the tokenizer files."""
    from granite_jax.convert.__main__ import export, import_checkpoint

    directory, _ = hf_checkpoint(tie_word_embeddings=False)
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        f.write('{"from": "hf"}')
    run_dir = f"gs://{BUCKET}/runs/imported"
    import_checkpoint(directory, run_dir)
    assert storage.listdir(f"{run_dir}/tokenizer") == ["generation_config.json", "tokenizer.json"]
    assert storage.listdir(f"{run_dir}/checkpoints") == ["0"]
    export(run_dir, str(tmp_path / "exported"))
    original, written = checkpoint_tensors(directory), checkpoint_tensors(tmp_path / "exported")
    assert sorted(original) == sorted(written)
    for name, value in original.items():
        assert written[name].tobytes() == value.tobytes(), name
    assert (tmp_path / "exported" / "tokenizer.json").read_text() == '{"from": "hf"}'
